"""Human shoppers in one headless Chromium: many tabs, each a visitor from its own source address.

One browser process is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: the browser reads commands on its fd 3 and writes
answers and events on its fd 4, each a JSON message ended by a NUL byte), with
flat sessions: every command for a tab carries that tab's sessionId on the one
shared connection. A tab's visit follows `lab.journeys.plan_visit`: the home
page is a real navigation, every later step a `fetch()` run in the page, and
each request is one `lab.records` record. Each tab has a browser context of
its own (its own cookies and connections, as another person's browser would),
whose cookies are cleared before each visit, so one visit is one session.

Chromium cannot bind a source address, so routing picks it (`route_sources`):
each source gets an alias address of the server (a /32 on the server's `lo`,
where nginx listens on 0.0.0.0), and the client namespace routes that alias
via the server with the source as preferred source address. Tab k opens
https://shop-k.botwall.test/, which --host-resolver-rules maps to its alias;
the server sees the tab's own source address.

    client ns                                       server ns
    tab 1  -> shop-1.botwall.test = 10.202.0.1      lo: 10.202.0.1/32, 10.202.0.2/32, ...
              route 10.202.0.1/32 via 10.201.0.1    nginx 0.0.0.0:443
                    src 10.201.1.5  ==veth==>       peer 10.201.1.5

Errors::

    LabError (lab.netns)
     └── BrowserError        Chromium would not start, or misbehaved
          ├── BrowserClosed  the browser went away: every pending command gets this
          ├── CdpError       a DevTools command answered with an error
          └── CdpTimeout     a DevTools command got no answer in time
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import ipaddress
import itertools
import json
import os
import queue
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from lab.journeys import PRODUCTS, Step, plan_visit, think_time
from lab.netns import IFA_F_NODAD, LabError, Topology
from lab.records import RequestRecord, emit

SCENARIO = "human_browser"
STACK = "chromium"
# Server aliases, one per source: a pool apart from the link's 10.201.0.0/16.
ALIAS_POOL_V4 = ipaddress.IPv4Network("10.202.0.0/16")
ALIAS_POOL_V6 = ipaddress.IPv6Network("fd00:b0:2::/64")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HOST_TEMPLATE = "shop-{n}.botwall.test"  # tab n (from 1) opens this name
CHROMIUM = "chromium"
# The flags that matter on this machine (see lab.clients.chromium_client);
# background networking is off, so every connection is a tab's own.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-breakpad", "--ignore-certificate-errors", "--mute-audio",
)  # fmt: skip
ACCEPT_LANGUAGE = "en-US,en"  # Chromium sends "en-US,en;q=0.9", a desktop browser's usual
START_TIMEOUT_S = 30.0  # Chromium answers its first command in ~0.6 s here
COMMAND_TIMEOUT_S = 10.0  # DevTools housekeeping (contexts, targets): milliseconds normally
REQUEST_TIMEOUT_S = 5.0  # a botwall drop shows as this timeout
# Chromium's DevTools pipe, as the browser numbers its ends.
_PIPE_IN_FD = 3
_PIPE_OUT_FD = 4

# Runs in the page: one request, answered with its status or what stood in for
# one. fetch() reports every network failure as the same TypeError; only our
# own abort (a dropped connection, an answer that never came) is told apart.
_FETCH_FUNCTION = """async ({method, path, body, timeoutMs}) => {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  const started = performance.now();
  const headers = {"Accept": "application/json"};
  if (body !== null) headers["Content-Type"] = "application/json";
  try {
    const response = await fetch(path, {method, headers, body, signal: abort.signal});
    await response.arrayBuffer();
    return {status: response.status, elapsed: (performance.now() - started) / 1000};
  } catch (error) {
    return {error: error.name, elapsed: (performance.now() - started) / 1000};
  } finally {
    clearTimeout(timer);
  }
}"""
_FETCH_ERRORS = {"AbortError": "timeout", "TypeError": "network"}
# The navigation's own timing: the home page's status and when its answer was in.
_NAVIGATION_ENTRY = "performance.getEntriesByType('navigation')[0]?.toJSON() ?? null"
# Chromium's net error names (Page.navigate's errorText) in the records' words.
_NET_ERRORS = {
    "CONNECTION_REFUSED": "refused",
    "CONNECTION_RESET": "reset",
    "CONNECTION_CLOSED": "reset",
    "EMPTY_RESPONSE": "reset",
    "CONNECTION_TIMED_OUT": "timeout",
    "TIMED_OUT": "timeout",
    "ADDRESS_UNREACHABLE": "unreachable",
    "NETWORK_UNREACHABLE": "unreachable",
}


class BrowserError(LabError):
    """Chromium would not start, or misbehaved."""


class BrowserClosed(BrowserError):
    """The browser went away (its DevTools pipe closed)."""


class CdpError(BrowserError):
    """A DevTools command answered with an error."""


class CdpTimeout(BrowserError):
    """A DevTools command got no answer in time."""


# -- source addresses -----------------------------------------------------------


def route_sources(topo: Topology, sources: Sequence[str]) -> list[str]:
    """Give each source address a server alias of its own; return the aliases, in order.

    Each alias is a host address (/32, /128) on the server namespace's `lo`,
    and the client namespace routes it via the server with `src` the source,
    so whatever connects to the alias, even a program that cannot bind an
    address (Chromium, hydra, wrk), leaves from that source. The sources must
    be addresses of the client namespace (`topo.add_client_addresses`).
    Repeated calls hand out aliases after the ones already there.
    """
    families = [ipaddress.ip_address(s).version for s in sources]
    with topo.iproute(topo.server_ns) as server, topo.iproute(topo.client_ns) as client:
        (lo,) = server.link_lookup(ifname="lo")
        taken = {ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in server.get_addr(index=lo)}
        fresh = {
            4: _free_hosts(ALIAS_POOL_V4, taken),
            6: _free_hosts(ALIAS_POOL_V6, taken),
        }
        aliases = []
        for source, family in zip(sources, families, strict=True):
            alias = str(next(fresh[family]))
            if family == 4:
                server.addr("add", index=lo, address=alias, prefixlen=32)
                client.route("add", dst=f"{alias}/32", gateway=topo.server_v4, prefsrc=source)
            else:
                server.addr("add", index=lo, address=alias, prefixlen=128, flags=IFA_F_NODAD)
                client.route(
                    "add",
                    family=socket.AF_INET6,
                    dst=f"{alias}/128",
                    gateway=topo.server_v6,
                    prefsrc=source,
                )
            aliases.append(alias)
    return aliases


def _free_hosts(pool: IPNetwork, taken: set[IPAddress]) -> Iterator[IPAddress]:
    """The pool's host addresses after the highest one already taken."""
    base = pool.network_address
    first = max((int(a) - int(base) for a in taken if a in pool), default=0) + 1
    for offset in range(first, pool.num_addresses - 1):
        yield base + offset
    raise LabError(f"server alias pool {pool} exhausted")


# -- the browser ------------------------------------------------------------------


@functools.cache
def chromium_major(binary: str = CHROMIUM) -> int:
    """The major version of the installed Chromium, from `chromium --version`."""
    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError:
        raise BrowserError(f"{binary} not found: install the Debian package chromium") from None
    match = re.search(r"(\d+)\.\d+\.\d+\.\d+", done.stdout)
    if match is None:
        raise BrowserError(f"cannot tell the version of {binary}: {done.stdout.strip()!r}")
    return int(match[1])


def desktop_user_agent(major: int) -> str:
    """Desktop Chrome's User-Agent for this major version.

    Headless Chromium says "HeadlessChrome/<major>.0.0.0"; a desktop browser
    says "Chrome" there, and nothing else in the (reduced) string differs.
    Its Client Hints (sec-ch-ua) already name Chromium, not a headless brand.
    """
    return (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
        f"(KHTML, like Gecko) Chrome/{major}.0.0.0 Safari/537.36"
    )


def _high_fd(fd: int) -> int:
    """`fd` moved to 10 or above (close-on-exec), clear of the child's 3 and 4."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class DevToolsPipe:
    """The client end of --remote-debugging-pipe: commands out, answers and events in.

    Thread-safe: any thread may `call`; one reader thread hands each answer to
    the caller waiting for its id and each event to the queue of its session.
    """

    def __init__(self, commands_fd: int, messages_fd: int) -> None:
        self._out = commands_fd
        self._in = messages_fd
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # _pending, _queues, _closed
        self._write_lock = threading.Lock()
        self._pending: dict[int, _Answer] = {}
        self._queues: dict[str, queue.Queue[dict[str, Any] | None]] = {}
        self._closed: str | None = None
        self._fds_closed = False
        self._reader = threading.Thread(target=self._read, name="devtools-reader", daemon=True)
        self._reader.start()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Send one command and wait for its result."""
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        answer = _Answer()
        with self._lock:
            if self._closed is not None:
                raise BrowserClosed(f"{method}: {self._closed}")
            self._pending[message["id"]] = answer
        try:
            self._write(json.dumps(message).encode() + b"\0")
            if not answer.done.wait(timeout):
                raise CdpTimeout(f"{method}: no answer after {timeout:.1f}s")
        finally:
            with self._lock:
                self._pending.pop(message["id"], None)
        if answer.message is None:
            raise BrowserClosed(f"{method}: {self._closed}")
        if "error" in answer.message:
            error = answer.message["error"]
            raise CdpError(f"{method}: {error.get('message')} ({error.get('code')})")
        result: dict[str, Any] = answer.message.get("result", {})
        return result

    def subscribe(self, session: str) -> queue.Queue[dict[str, Any] | None]:
        """The queue that receives `session`'s events from now on (None: the browser is gone)."""
        events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        with self._lock:
            if self._closed is not None:
                events.put(None)
            self._queues[session] = events
        return events

    def unsubscribe(self, session: str) -> None:
        with self._lock:
            self._queues.pop(session, None)

    def close(self, timeout: float = 2.0) -> None:
        """Close our ends, once the browser is gone (the reader has seen end of file)."""
        self._reader.join(timeout)
        if self._reader.is_alive() or self._fds_closed:
            return  # someone still holds the browser's end: leave the fds to the daemon reader
        self._fds_closed = True
        for fd in (self._out, self._in):
            os.close(fd)

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._out, view) :]
            except OSError as exc:  # EPIPE: the browser is gone
                raise BrowserClosed(f"writing to the DevTools pipe: {exc}") from None

    def _read(self) -> None:
        buffered = bytearray()
        reason = "the browser closed its DevTools pipe"
        try:
            while chunk := os.read(self._in, 1 << 16):
                scan_from = len(buffered)
                buffered += chunk
                while (end := buffered.find(b"\0", scan_from)) >= 0:
                    self._dispatch(json.loads(bytes(buffered[:end])))
                    del buffered[: end + 1]
                    scan_from = 0
        except (OSError, ValueError) as exc:
            reason = f"reading the DevTools pipe: {exc}"
        finally:
            with self._lock:
                self._closed = reason
                for answer in self._pending.values():
                    answer.done.set()
                for events in self._queues.values():
                    events.put(None)

    def _dispatch(self, message: dict[str, Any]) -> None:
        with self._lock:
            if "id" in message:
                answer = self._pending.get(message["id"])
                if answer is not None:  # else its caller gave up waiting
                    answer.message = message
                    answer.done.set()
                return
            events = self._queues.get(message.get("sessionId", ""))
        if events is not None:
            events.put(message)


class _Answer:
    __slots__ = ("done", "message")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.message: dict[str, Any] | None = None


def wait_event(
    events: queue.Queue[dict[str, Any] | None], method: str, timeout: float
) -> dict[str, Any] | None:
    """The next event named `method` within `timeout` seconds, or None; others are skipped."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = events.get(timeout=left)
        except queue.Empty:
            return None
        if message is None:
            raise BrowserClosed(f"waiting for {method}: the browser went away")
        if message.get("method") == method:
            return message
    return None


class Chromium:
    """One headless Chromium with its DevTools pipe, in `ns` if given.

    `start()` returns once the browser answers; `stop()` kills its whole
    process group (it runs in a session of its own, helpers included) and
    removes its profile. Use as a context manager.
    """

    def __init__(
        self,
        flags: Sequence[str],
        *,
        ns: str | None = None,
        binary: str = CHROMIUM,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.flags = list(flags)
        self.ns = ns
        self.binary = binary
        self.start_timeout = start_timeout
        self.pid: int | None = None
        self.devtools: DevToolsPipe | None = None
        self.version: dict[str, Any] = {}
        self._workdir: Path | None = None

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> Chromium:
        self._workdir = Path(tempfile.mkdtemp(prefix="botwall-chromium-"))
        argv = [
            self.binary,
            *self.flags,
            f"--user-data-dir={self._workdir / 'profile'}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        if self.ns is not None:
            # As Topology.popen does: ip remounts /sys for the namespace, then execs.
            argv = ["ip", "netns", "exec", self.ns, *argv]
        commands_r, commands_w = map(_high_fd, os.pipe())
        messages_r, messages_w = map(_high_fd, os.pipe())
        log = os.open(
            self._workdir / "chromium.log", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            # posix_spawn rather than Popen: pass_fds keeps a descriptor's
            # number, and the browser wants its pipe at exactly 3 and 4.
            self.pid = os.posix_spawnp(
                argv[0],
                argv,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, commands_r, _PIPE_IN_FD),
                    (os.POSIX_SPAWN_DUP2, messages_w, _PIPE_OUT_FD),
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log, 1),  # never our stdout: the records go there
                    (os.POSIX_SPAWN_DUP2, log, 2),
                ],
                setsid=True,
            )
        except OSError:
            for fd in (commands_w, messages_r):
                os.close(fd)
            self.stop()
            raise
        finally:
            for fd in (commands_r, messages_w, log):
                os.close(fd)
        self.devtools = DevToolsPipe(commands_w, messages_r)
        try:
            self.version = self.devtools.call("Browser.getVersion", timeout=self.start_timeout)
        except BaseException as exc:
            tail = self.log_tail()
            self.stop()
            if isinstance(exc, BrowserError):
                raise BrowserError(f"{self.binary} did not start: {exc}\n{tail}") from None
            raise
        return self

    def stop(self) -> None:
        """Kill the browser and its helpers, reap it, remove the profile. Safe to call twice."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = None
        if self.devtools is not None:
            self.devtools.close()
            self.devtools = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def log_tail(self, limit: int = 1500) -> str:
        """The end of the browser's own output, for error messages."""
        if self._workdir is None:
            return ""
        try:
            return (self._workdir / "chromium.log").read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""


# -- the shoppers ---------------------------------------------------------------------


class BrowserHumans:
    """Human shoppers in tabs of one headless Chromium, one tab per source address.

    Each tab makes `visits_per_tab` visits (`lab.journeys.plan_visit`), one
    after another with a human pause between, and writes one record per
    request to `out`. `run()` blocks until every visit is done or
    `deadline_s` (from its start) has passed, and always ends Chromium.

    With `topo`, Chromium runs in `topo.client_ns` and, unless
    `server_aliases` is given, `run()` routes the sources itself
    (`route_sources`). Without it the caller is already inside the client
    namespace and has routed each source to its alias in `server_aliases`.
    All tabs talk to the shop on `base_port`. Tab n's plans depend on `seed`
    and n alone (`tab_seed`); a request gets `timeout_s` to be answered.
    """

    def __init__(
        self,
        topo: Topology | None,
        sources: Sequence[str],
        *,
        server_aliases: Sequence[str] | None = None,
        base_port: int = 443,
        visits_per_tab: int = 1,
        think_scale: float = 1.0,
        seed: int = 0,
        out: TextIO | None = None,
        deadline_s: float = 600.0,
        timeout_s: float = REQUEST_TIMEOUT_S,
        products: int = PRODUCTS,
        chromium: str = CHROMIUM,
    ) -> None:
        self.topo = topo
        self.sources = sources
        self.server_aliases = server_aliases
        self.base_port = base_port
        self.visits_per_tab = visits_per_tab
        self.think_scale = think_scale
        self.seed = seed
        self.out = out
        self.deadline_s = deadline_s
        self.timeout_s = timeout_s
        self.products = products
        self.chromium = chromium

    def run(self) -> BrowserHumans:
        """Run every tab's visits; raise BrowserError if a tab failed other than by the deadline.

        Afterwards: `server_aliases_` (per source), `plans_` (session -> the
        steps planned; a visit cut short by the deadline did fewer),
        `startup_s_` (until Chromium answered) and `elapsed_s_`.
        """
        started = time.monotonic()
        deadline = started + self.deadline_s
        if self.server_aliases is not None:
            aliases = list(self.server_aliases)
        elif self.topo is not None:
            aliases = route_sources(self.topo, self.sources)
        else:
            raise ValueError("without a topology, server_aliases must be given")
        if len(aliases) != len(self.sources):
            raise ValueError(f"{len(self.sources)} sources but {len(aliases)} server aliases")
        self.server_aliases_ = aliases
        self.plans_: dict[str, list[Step]] = {}
        self._errors: list[str] = []
        self._stop = threading.Event()
        hosts = [HOST_TEMPLATE.format(n=n) for n in range(1, len(aliases) + 1)]
        browser = Chromium(
            self._flags(hosts, aliases),
            ns=self.topo.client_ns if self.topo is not None else None,
            binary=self.chromium,
        )
        tabs: list[threading.Thread] = []
        try:
            browser.start()
            self.startup_s_ = time.monotonic() - started
            assert browser.devtools is not None
            for n, (source, host) in enumerate(zip(self.sources, hosts, strict=True)):
                tab = threading.Thread(
                    target=self._tab,
                    args=(browser.devtools, n, source, self._url(host)),
                    name=f"tab-{n + 1}",
                    daemon=True,
                )
                tab.start()
                tabs.append(tab)
            for tab in tabs:
                tab.join(max(0.0, deadline - time.monotonic()))
            # The deadline: no new requests; those under way get their answer or timeout.
            self._stop.set()
            grace = time.monotonic() + self.timeout_s + 1.0
            for tab in tabs:
                tab.join(max(0.0, grace - time.monotonic()))
        finally:
            self._stop.set()
            browser.stop()
            for tab in tabs:
                tab.join(1.0)
            self.elapsed_s_ = time.monotonic() - started
        if self._errors:
            raise BrowserError("; ".join(self._errors))
        return self

    def _flags(self, hosts: Sequence[str], aliases: Sequence[str]) -> list[str]:
        rules = [
            f"MAP {host} {_url_host(alias)}" for host, alias in zip(hosts, aliases, strict=True)
        ]
        # Any other name fails at once, so nothing else ever leaves the browser.
        rules.append("MAP * ~NOTFOUND")
        return [
            *CHROMIUM_FLAGS,
            f"--user-agent={desktop_user_agent(chromium_major(self.chromium))}",
            f"--accept-lang={ACCEPT_LANGUAGE}",
            f"--host-resolver-rules={', '.join(rules)}",
        ]

    def _url(self, host: str) -> str:
        port = "" if self.base_port == 443 else f":{self.base_port}"
        return f"https://{host}{port}/"

    def _tab(self, devtools: DevToolsPipe, n: int, source: str, url: str) -> None:
        # Streams of their own per tab: the plans depend on the seed alone,
        # not on thread timing nor on how long the pauses between visits were.
        plans = random.Random(tab_seed(self.seed, n))
        pauses = random.Random(f"{tab_seed(self.seed, n)}/arrivals")
        try:
            # Visitors arrive spread out (which also spreads the start of the
            # tabs' renderers), and each next one a while after the last.
            if self._stop.wait(think_time(pauses, think_scale=self.think_scale)):
                return
            with _Tab(devtools, url, source, self.timeout_s, self.out) as tab:
                for visit in range(self.visits_per_tab):
                    if visit and self._stop.wait(think_time(pauses, think_scale=self.think_scale)):
                        return
                    plan = plan_visit(plans, products=self.products, think_scale=self.think_scale)
                    session = f"hb-{secrets.token_hex(6)}"
                    self.plans_[session] = plan
                    tab.visit(plan, session, self._stop)
        except BrowserError as exc:
            if not self._stop.is_set():  # after the deadline, the browser is being ended
                self._errors.append(f"tab {n + 1} ({source}): {exc}")
        except Exception as exc:  # reported by run(), not lost on a dying thread
            self._errors.append(f"tab {n + 1} ({source}): {type(exc).__name__}: {exc}")


class _Tab:
    """One tab in a browser context of its own, for all the visits from one source address.

    A context and its renderer process live as long as the tab: starting a
    renderer costs about half a second of CPU, too much for every visit on a
    two-core machine. Each visit starts with the context's cookies cleared, so
    it is a new session to the shop.
    """

    def __init__(
        self, devtools: DevToolsPipe, url: str, source: str, timeout_s: float, out: TextIO | None
    ) -> None:
        self.devtools = devtools
        self.url = url
        self.source = source
        self.timeout_s = timeout_s
        self.out = out
        self.context = ""  # DevTools ids, once open
        self.tab = ""
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.session = ""  # the visit's, for its records

    def __enter__(self) -> _Tab:
        call = self.devtools.call
        created = call("Target.createBrowserContext", {"disposeOnDetach": True})
        self.context = created["browserContextId"]
        try:
            target = call(
                "Target.createTarget", {"url": "about:blank", "browserContextId": self.context}
            )
            attached = call(
                "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
            )
            self.tab = attached["sessionId"]
            self.events = self.devtools.subscribe(self.tab)
            call("Page.enable", session=self.tab)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        if self.tab:
            self.devtools.unsubscribe(self.tab)
        with contextlib.suppress(BrowserError):
            self.devtools.call("Target.disposeBrowserContext", {"browserContextId": self.context})

    def visit(self, plan: Sequence[Step], session: str, stop: threading.Event) -> None:
        """The home page as a navigation, then each later step as a fetch() in it."""
        home, *steps = plan
        if (home.method, home.path) != ("GET", "/"):
            raise ValueError(f"a browser visit starts at GET /, not {home.method} {home.path}")
        self.session = session
        self.devtools.call("Storage.clearCookies", {"browserContextId": self.context})
        if self._navigate().status is None:
            return  # no home page: this visitor leaves
        think_s = home.think_s
        for step in steps:
            if stop.wait(think_s):
                return
            self._fetch(step)
            think_s = step.think_s

    def _navigate(self) -> RequestRecord:
        ts, started = time.time(), time.monotonic()
        try:
            # Page.navigate answers once the document's response is in (or failed).
            navigation = self.devtools.call(
                "Page.navigate", {"url": self.url}, session=self.tab, timeout=self.timeout_s
            )
        except CdpTimeout:
            with contextlib.suppress(BrowserError):
                self.devtools.call("Page.stopLoading", session=self.tab)
            return self._emit("GET", "/", None, "timeout", ts, time.monotonic() - started)
        if navigation.get("errorText"):
            error = _net_error(navigation["errorText"])
            return self._emit("GET", "/", None, error, ts, time.monotonic() - started)
        waited = time.monotonic() - started
        wait_event(self.events, "Page.loadEventFired", max(0.0, self.timeout_s - waited))
        entry = self._evaluate(_NAVIGATION_ENTRY, self.timeout_s) or {}
        status = int(entry.get("responseStatus") or 0) or None
        # The browser's own clock for when the answer was complete, else ours.
        elapsed = entry.get("responseEnd", 0) / 1000 or time.monotonic() - started
        return self._emit("GET", "/", status, None if status else "error", ts, elapsed)

    def _fetch(self, step: Step) -> RequestRecord:
        body = json.dumps(step.body) if step.body is not None else None
        args = {"method": step.method, "path": step.path, "body": body,
                "timeoutMs": round(self.timeout_s * 1000)}  # fmt: skip
        ts, started = time.time(), time.monotonic()
        try:
            # The page's timer ends the fetch; ours only guards against a stuck renderer.
            answer = self._evaluate(
                f"({_FETCH_FUNCTION})({json.dumps(args)})", self.timeout_s + 5.0
            )
        except CdpTimeout:
            answer = {"error": "timeout", "elapsed": time.monotonic() - started}
        if not isinstance(answer, dict):  # the page itself failed (navigated away, crashed)
            answer = {"error": "error", "elapsed": time.monotonic() - started}
        if "status" in answer:
            return self._emit(step.method, step.path, answer["status"], None, ts, answer["elapsed"])
        error = _FETCH_ERRORS.get(answer["error"], answer["error"])
        return self._emit(step.method, step.path, None, error, ts, answer["elapsed"])

    def _evaluate(self, expression: str, timeout: float) -> Any:
        """The value of `expression` in the tab (awaited when a promise); None when it threw."""
        result = self.devtools.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session=self.tab,
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            return None
        return result["result"].get("value")

    def _emit(
        self,
        method: str,
        path: str,
        status: int | None,
        error: str | None,
        ts: float,
        elapsed: float,
    ) -> RequestRecord:
        record = RequestRecord(
            scenario=SCENARIO, label="human", session=self.session, source=self.source,
            method=method, path=path, status=status, error=error, ts=ts,
            elapsed=round(elapsed, 4), stack=STACK,
        )  # fmt: skip
        emit(record, self.out)
        return record


def tab_seed(seed: int, tab: int) -> str:
    """The seed of tab `tab`'s (from 0) plans: its visits are `plan_visit` drawn in
    turn from `random.Random(tab_seed(seed, tab))`, whatever the timing."""
    return f"{seed}/{tab}"


def _net_error(text: str) -> str:
    """'net::ERR_CONNECTION_RESET' -> 'reset'; unknown names as 'connection_failed' etc."""
    name = text.removeprefix("net::ERR_")
    return _NET_ERRORS.get(name, name.lower())


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


# -- command line --------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM's default would kill us without unwinding, leaving Chromium running.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run inside the client namespace, with the sources already routed (`route_sources`)."""
    parser = argparse.ArgumentParser(
        prog="python -m lab.browser", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sources", required=True, help="comma-separated source addresses")
    parser.add_argument(
        "--server-aliases", required=True, help="comma-separated: the server alias of each source"
    )
    parser.add_argument("--port", type=int, default=443, help="the shop's HTTPS port")
    parser.add_argument("--visits-per-tab", type=int, default=1)
    parser.add_argument("--think-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline-s", type=float, default=600.0, help="hard stop for the run")
    parser.add_argument("--timeout-s", type=float, default=REQUEST_TIMEOUT_S, help="per request")
    parser.add_argument("--products", type=int, default=PRODUCTS)
    args = parser.parse_args(argv)
    # Started in the background by a non-interactive shell, we inherit SIGINT
    # ignored; ask for KeyboardInterrupt on both, so Chromium is always ended.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    humans = BrowserHumans(
        None,
        [s for s in args.sources.split(",") if s],
        server_aliases=[a for a in args.server_aliases.split(",") if a],
        base_port=args.port,
        visits_per_tab=args.visits_per_tab,
        think_scale=args.think_scale,
        seed=args.seed,
        out=sys.stdout,
        deadline_s=args.deadline_s,
        timeout_s=args.timeout_s,
        products=args.products,
    )
    try:
        humans.run()
    except KeyboardInterrupt:
        return 130
    except (BrowserError, ValueError) as exc:
        print(f"lab.browser: {exc}", file=sys.stderr)
        return 1
    print(
        f"lab.browser: {len(humans.plans_)} visits from {len(args.sources.split(','))} tabs, "
        f"Chromium up in {humans.startup_s_:.2f}s, {humans.elapsed_s_:.1f}s in all",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
