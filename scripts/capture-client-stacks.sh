#!/usr/bin/env bash
# Captures the TCP SYN and TLS ClientHello of real client stacks on this
# machine, one pcap per client, for the known-client-stacks table.
#
# Usage (as root: tcpdump on lo needs it):
#   scripts/capture-client-stacks.sh [OUT_DIR] [CLIENT ...]
#
# OUT_DIR defaults to tests/fixtures/clients. With no CLIENT, every client
# found on this machine is captured; `--list` prints the client names.
# Each client connects over loopback only, to an `openssl s_server` on
# 127.0.0.1:$PORT (default 8443) with a self-signed certificate made at run
# time, always with the server name botwall.test (JA4 records whether SNI was
# sent) and with the client's own default ALPN. Certificate checks are
# disabled or fail after the ClientHello: only the ClientHello matters.
#
# After capturing, it prints a client_stacks.toml entry per ClientHello seen,
# computed by `botwall fingerprint`; review them and paste new ones into
# sensor/fingerprint/client_stacks.toml (docs/fingerprints.md says how).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$repo/.venv/bin/python
port=${PORT:-8443}
host=botwall.test
url=https://$host:$port/

clients=(curl openssl-s_client gnutls-cli python-ssl python-urllib python-requests
  python-httpx node-https node-fetch go-net-http chromium firefox wget)

if [[ ${1:-} == --list ]]; then
  printf '%s\n' "${clients[@]}"
  exit 0
fi
out=${1:-$repo/tests/fixtures/clients}
shift || true
(($#)) && clients=("$@")

if ((EUID != 0)); then
  echo "capture-client-stacks: run as root (tcpdump on lo)" >&2
  exit 1
fi
mkdir -p "$out"
work=$(mktemp -d)
server_pid=
capture_pid=
cleanup() {
  [[ -n $capture_pid ]] && kill "$capture_pid" 2>/dev/null || true
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=$host" \
  -addext "subjectAltName=DNS:$host" -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
# -www answers any HTTP request with a status page, so HTTP clients finish cleanly.
openssl s_server -accept "127.0.0.1:$port" -cert "$work/cert.pem" -key "$work/key.pem" \
  -www -quiet >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

# Python clients: name resolution is pointed at loopback in-process, so the
# library builds its ClientHello exactly as it would for a real host name.
python_client() {
  "$py" - "$1" "$host" "$port" <<'EOF'
import socket, ssl, sys, warnings
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
_real = socket.getaddrinfo
socket.getaddrinfo = lambda h, *a, **k: _real("127.0.0.1" if h == host else h, *a, **k)
url = f"https://{host}:{port}/"
warnings.simplefilter("ignore")
if kind == "python-ssl":
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port)) as s, ctx.wrap_socket(s, server_hostname=host):
        pass
elif kind == "python-urllib":
    import urllib.request
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    urllib.request.urlopen(url, context=ctx, timeout=5).read()
elif kind == "python-requests":
    import requests
    requests.get(url, verify=False, timeout=5)
elif kind == "python-httpx":
    import httpx
    httpx.get(url, verify=False, timeout=5)
EOF
}

# Node and Go: the lab's clients (lab/stacks/), whose --connect/-connect send
# the connection to loopback while the URL, and so SNI, keep the host name.
node_client() {
  node "$repo/lab/stacks/client.mjs" --mode "${1#node-}" --connect 127.0.0.1 \
    --timeout-ms 5000 "$url" >/dev/null
}

go_client() {
  # Standard library only: builds offline, without a go.mod; no cgo, so no C
  # toolchain is needed (crypto/tls is pure Go either way).
  CGO_ENABLED=0 GOPROXY=off GOTOOLCHAIN=local \
    go build -o "$work/go-client" "$repo/lab/stacks/client.go" &&
    "$work/go-client" -connect 127.0.0.1 -timeout 5s "$url" >/dev/null
}

# For clients with no way to resolve a name to an address of our choosing: a
# private mount namespace sees an /etc/hosts that maps the name to loopback.
with_hosts() {
  printf '127.0.0.1 %s\n' "$host" >"$work/hosts"
  unshare --mount sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$work/hosts" "$@"
}

browser_flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync
  --ignore-certificate-errors)

# Runs one client; returns 127 when it is not installed here.
run_client() {
  case $1 in
  curl)
    command -v curl >/dev/null || return 127
    curl -sk --max-time 5 --resolve "$host:$port:127.0.0.1" "$url" -o /dev/null
    ;;
  openssl-s_client)
    openssl s_client -connect "127.0.0.1:$port" -servername "$host" </dev/null >/dev/null 2>&1
    ;;
  gnutls-cli)
    command -v gnutls-cli >/dev/null || return 127
    gnutls-cli --insecure --sni-hostname "$host" -p "$port" 127.0.0.1 </dev/null >/dev/null 2>&1
    ;;
  python-requests | python-httpx)
    "$py" -c "import ${1#python-}" 2>/dev/null || return 127
    python_client "$1"
    ;;
  python-*) python_client "$1" ;;
  node-*)
    command -v node >/dev/null || return 127
    node_client "$1"
    ;;
  go-net-http)
    command -v go >/dev/null || return 127
    go_client
    ;;
  chromium)
    command -v chromium >/dev/null || return 127
    chromium "${browser_flags[@]}" --user-data-dir="$(mktemp -d -p "$work")" \
      --host-resolver-rules="MAP $host 127.0.0.1" --dump-dom "$url" >/dev/null 2>&1
    ;;
  firefox)
    command -v firefox-esr >/dev/null || return 127
    with_hosts timeout 20 firefox-esr --headless --no-remote \
      --profile "$(mktemp -d -p "$work")" --screenshot "$work/ff.png" "$url" >/dev/null 2>&1 || true
    ;;
  wget)
    command -v wget >/dev/null || return 127
    with_hosts wget -q --no-check-certificate -O /dev/null --tries=1 --timeout=5 "$url" || true
    ;;
  *)
    echo "capture-client-stacks: unknown client $1 (see --list)" >&2
    return 2
    ;;
  esac
}

captured=()
for client in "${clients[@]}"; do
  pcap=$out/$client.pcap
  # Immediate mode: packets reach the file now, not when a kernel buffer block fills.
  tcpdump -i lo --immediate-mode -U -s 0 -w "$work/capture.pcap" "tcp port $port" 2>"$work/tcpdump.log" &
  capture_pid=$!
  # tcpdump writes "listening on" once its filter is attached.
  for _ in $(seq 50); do grep -q "listening on" "$work/tcpdump.log" && break; sleep 0.1; done
  rc=0
  timeout 60 bash -c "$(declare -f run_client python_client node_client go_client with_hosts); \
    $(declare -p repo py host port url work browser_flags); run_client $client" || rc=$?
  sleep 0.5
  kill "$capture_pid"
  wait "$capture_pid" 2>/dev/null || true
  capture_pid=
  if ((rc == 127)); then
    echo "capture-client-stacks: $client: not installed here, skipped" >&2
    continue
  fi
  ((rc == 0)) || echo "capture-client-stacks: $client exited $rc (the ClientHello may still be there)" >&2
  mv "$work/capture.pcap" "$pcap"
  chown --reference="$out" "$pcap"  # tcpdump wrote it as its own unprivileged user
  captured+=("$client")
  echo "capture-client-stacks: $client -> $pcap ($(stat -c %s "$pcap") bytes)" >&2
done

# One candidate table entry per distinct JA4 per client; family and version
# are for a person to fill in.
for client in "${captured[@]}"; do
  "$py" -m controlplane.cli fingerprint "$out/$client.pcap" --tls-port "$port" |
    "$py" -c '
import json, sys
client, seen = sys.argv[1], set()
for line in sys.stdin:
    row = json.loads(line)
    if "ja4" in row and row["ja4"] not in seen:
        seen.add(row["ja4"])
        print("# " + row["ja4_r"])
        print("[[stack]]")
        print("ja4 = " + json.dumps(row["ja4"]))
        print("family = \"?\"\nname = " + json.dumps(client) + "\nversion = \"?\"")
        print("pcaps = [" + json.dumps(client + ".pcap") + "]")
        print("captured = \"scripts/capture-client-stacks.sh\"\n")
' "$client" || echo "capture-client-stacks: $client: botwall fingerprint failed" >&2
done
