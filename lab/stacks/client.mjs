// A minimal Node.js HTTPS client for the lab: one GET, the status on stdout.
//
//   node client.mjs [--mode https|fetch] [--connect IP] [--timeout-ms 10000] URL
//
// https: https.get, the ClientHello of node's own TLS (no ALPN).
// fetch: the global fetch (undici), which offers ALPN http/1.1.
// Certificates are not checked (the lab's CA is in no store). --connect sends
// the connection to IP whatever the URL's host resolves to, so the URL keeps
// the real server name and with it the SNI. No packages beyond node itself.
import dns from 'node:dns';
import https from 'node:https';
import { parseArgs } from 'node:util';

const { values: opts, positionals } = parseArgs({
  options: {
    mode: { type: 'string', default: 'https' },
    connect: { type: 'string' },
    'timeout-ms': { type: 'string', default: '10000' },
  },
  allowPositionals: true,
});
if (positionals.length !== 1 || !['https', 'fetch'].includes(opts.mode)) {
  console.error('usage: node client.mjs [--mode https|fetch] [--connect IP] [--timeout-ms N] URL');
  process.exit(2);
}
const url = new URL(positionals[0]);
const timeoutMs = Number(opts['timeout-ms']);

// A hung server must not hang the caller; unref'd, so a finished run exits at once.
setTimeout(() => {
  console.error(`timeout after ${timeoutMs} ms`);
  process.exit(3);
}, timeoutMs).unref();

const realLookup = dns.lookup;
// Resolves the URL's host to --connect; any other name resolves as usual.
function lookup(hostname, options, callback) {
  const name = opts.connect && hostname === url.hostname ? opts.connect : hostname;
  return realLookup(name, options, callback);
}

function finish(status, body) {
  process.stdout.write(`${status}\n${body}`);
  process.exit(status === 200 ? 0 : 1);
}

function fail(err) {
  console.error(String(err && err.cause ? `${err.message}: ${err.cause}` : err));
  process.exit(1);
}

if (opts.mode === 'https') {
  const request = https.get(
    url,
    { servername: url.hostname, lookup, rejectUnauthorized: false },
    (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('end', () => finish(res.statusCode, Buffer.concat(chunks).toString()));
    },
  );
  request.on('error', fail);
} else {
  // fetch takes no lookup or TLS options without the undici package's
  // dispatcher, which node does not expose; net.connect reads dns.lookup
  // and tls.connect this variable at connect time, so both apply to it.
  dns.lookup = lookup;
  process.env.NODE_TLS_REJECT_UNAUTHORIZED = '0';
  process.removeAllListeners('warning'); // the warning that variable triggers
  fetch(url)
    .then(async (res) => finish(res.status, await res.text()))
    .catch(fail);
}
