"""A real network on one machine: a server and a client namespace joined by a veth pair.

Layout (the same in every run; the namespaces keep runs apart)::

    client ns  <prefix>-cli-<pid>-<tok>         server ns  <prefix>-srv-<pid>-<tok>
    <prefix>c-<tok>  10.201.0.2/24  ==veth==  <prefix>s-<tok>  10.201.0.1/24
                     fd00:b0::2/64                             fd00:b0::1/64
    extra sources    10.201.1.0 ...  (/32)     default route -> the client
                     fd00:b0:0:1::1 ... (/128)

The server reaches every client address through one default route via the
client's link address rather than on-link: the ARP/ND table is shared by all
namespaces of the host (gc_thresh3 is 1024 by default), so a thousand on-link
clients would overflow it, and a thousand clients behind one router is what an
API server sees anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, TracebackType
from typing import Any, TypeVar, cast

from pyroute2 import IPRoute, netns

T = TypeVar("T")

SERVER_V4 = "10.201.0.1"
CLIENT_V4 = "10.201.0.2"
LINK_V4_PREFIXLEN = 24
SERVER_V6 = "fd00:b0::1"
CLIENT_V6 = "fd00:b0::2"
LINK_V6_PREFIXLEN = 64
# Extra client source addresses come from these pools; they stay inside our namespaces.
CLIENT_POOL_V4 = ipaddress.IPv4Network("10.201.0.0/16")
CLIENT_POOL_V4_FIRST = ipaddress.IPv4Address("10.201.1.0")
CLIENT_POOL_V6 = ipaddress.IPv6Network("fd00:b0:0:1::/64")

# The peer lands at ifindex 2 in the fresh client namespace (after lo). If the
# server end got 2 as well, the kernel's linkwatch would take ifindex == iflink
# for a non-stacked device and rate-limit its carrier event to one a second;
# a distinct index brings the link up in milliseconds.
SERVER_IFINDEX = 10

# Policy-routing priorities: our drop rules go ahead of local delivery.
DROP_RULE_PRIORITY = 100
LOCAL_RULE_PRIORITY = 1000

IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40

_NS_PATTERN = r"^{prefix}-(?:srv|cli)-(?P<pid>\d+)-[0-9a-f]+$"


class LabError(RuntimeError):
    """The test bed could not be built, used or torn down."""


def enter_namespace(ns: str) -> None:
    """Move the calling thread (only it: netns membership is per thread) into `ns`."""
    # flags=0: never create a namespace by accident when the name is wrong.
    netns.setns(ns, flags=0)


@contextlib.contextmanager
def in_namespace(ns: str) -> Iterator[None]:
    """Run the body with the calling thread inside `ns`, then move it back.

    Only this thread moves. Threads started in the body inherit the namespace
    and keep it; sockets created in the body belong to `ns` for their lifetime.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter_namespace(ns)
        try:
            yield
        finally:
            netns.setns(home, flags=0)
    finally:
        os.close(home)


def call_in(ns: str, fn: Callable[..., T], *args: Any, timeout: float = 60.0, **kwargs: Any) -> T:
    """Call `fn(*args, **kwargs)` on a fresh thread inside `ns` and return its result.

    The thread dies afterwards, so the namespace switch cannot leak into other
    code; an exception raised by `fn` is re-raised here.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            enter_namespace(ns)
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns:{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(
            f"{getattr(fn, '__name__', fn)!r} in {ns} still running after {timeout}s"
        )
    if "error" in outcome:
        raise outcome["error"]
    return cast(T, outcome["value"])


def write_sysctl(key: str, value: str | int) -> None:
    """Write a sysctl of the calling thread's namespace (/proc/sys/net follows the thread)."""
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(f"{value}\n")


def _netns_inode(ns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.join(netns.NETNS_RUN_DIR, ns))
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def pids_in_namespace(ns: str) -> list[int]:
    """Processes whose network namespace is `ns`."""
    inode = _netns_inode(ns)
    if inode is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # exited meanwhile, or a kernel thread
        if (st.st_dev, st.st_ino) == inode:
            found.append(int(entry))
    return found


def _end_processes(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `grace` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie we cannot reap (not our child) is as good as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def remove_namespace(ns: str) -> None:
    """End the processes inside `ns` and remove it; the kernel then frees its interfaces."""
    # A namespace lives on, with its veth, while any process is still inside it.
    _end_processes(pids_in_namespace(ns))
    with contextlib.suppress(FileNotFoundError):
        netns.remove(ns)


def cleanup_stale(prefix: str = "bw", include_live: bool = False) -> list[str]:
    """Remove namespaces left behind by killed runs; return the names removed.

    The owner's pid is part of each name, so namespaces of a run that is still
    alive (a parallel test session, a running lab) are kept unless
    `include_live` is set.
    """
    pattern = re.compile(_NS_PATTERN.format(prefix=re.escape(prefix)))
    removed = []
    for ns in sorted(netns.listnetns()):
        match = pattern.match(ns)
        if match is None:
            continue
        if not include_live and _alive(int(match["pid"])):
            continue
        remove_namespace(ns)
        removed.append(ns)
    return removed


def _check_prefix(prefix: str) -> str:
    # Interface names are "<prefix>s-<4 hex>" and must fit IFNAMSIZ (15 chars + NUL).
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
        raise ValueError(f"prefix must be 1-8 lowercase letters or digits, got {prefix!r}")
    return prefix


class _SigtermGuard:
    """Turns SIGTERM into KeyboardInterrupt while any Topology is up.

    SIGTERM's default action kills the process without unwinding, which would
    leave the namespaces behind. Counted, so overlapping topologies share one
    handler and the previous one comes back only when the last is closed.
    Signal handlers belong to the main thread: elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: Any = None

    def acquire(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        with self._lock:
            if self._users == 0:
                if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                    return False  # the program handles SIGTERM itself
                self._saved = signal.signal(signal.SIGTERM, self._on_sigterm(os.getpid()))
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                signal.signal(signal.SIGTERM, self._saved)

    @staticmethod
    def _on_sigterm(owner: int) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            if os.getpid() != owner:
                # A forked child (pyroute2 forks helpers) inherits this handler:
                # give it the default action back and die as it was meant to.
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            # KeyboardInterrupt rather than SystemExit: pytest records a
            # SystemExit inside a test as one failure and carries on, while an
            # interrupt stops the session, as SIGTERM means to.
            raise KeyboardInterrupt(f"signal {signum}")

        return handler


_sigterm_guard = _SigtermGuard()


class Topology:
    """A server and a client namespace joined by a veth pair, torn down on exit.

    Use as a context manager (or `start()` / `close()`). Teardown also runs on
    exceptions, on Ctrl-C (KeyboardInterrupt) and on SIGTERM while the
    topology is up in the main thread. A run killed with SIGKILL leaves its
    namespaces behind: `cleanup_stale()` removes them.
    """

    def __init__(self, prefix: str = "bw", *, wire_frames: bool = True) -> None:
        self.prefix = _check_prefix(prefix)
        self.wire_frames = wire_frames
        token = secrets.token_hex(2)
        self.server_ns = f"{prefix}-srv-{os.getpid()}-{token}"
        self.client_ns = f"{prefix}-cli-{os.getpid()}-{token}"
        self.server_if = f"{prefix}s-{token}"
        self.client_if = f"{prefix}c-{token}"
        self.server_v4 = SERVER_V4
        self.client_v4 = CLIENT_V4
        self.server_v6 = SERVER_V6
        self.client_v6 = CLIENT_V6
        self.server_ifindex = 0
        self.client_ifindex = 0
        self.extra_v4: list[str] = []
        self.extra_v6: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._guarding = False

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Topology:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc is None)

    def start(self) -> Topology:
        """Build both namespaces and the veth; on any failure undo what was built."""
        check_root()
        self._guarding = _sigterm_guard.acquire()
        try:
            self._build()
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def close(self, raise_errors: bool = True) -> None:
        """Stop our processes, delete the veth and both namespaces. Safe to call twice."""
        errors: list[str] = []
        _end_processes([p.pid for p in self._processes if p.poll() is None])
        for proc in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)  # reap, so no zombie outlives the topology
        self._processes.clear()
        if self.server_ns in self._created:
            # Deleting the veth explicitly makes its removal synchronous (it also
            # detaches any XDP program); the namespace itself dies asynchronously.
            try:
                with self.iproute(self.server_ns) as ipr:
                    for index in ipr.link_lookup(ifname=self.server_if):
                        ipr.link("del", index=index)
            except Exception as exc:
                errors.append(f"deleting {self.server_if}: {exc}")
        for ns in reversed(self._created):
            try:
                remove_namespace(ns)
            except Exception as exc:
                errors.append(f"removing {ns}: {exc}")
        self._created.clear()
        if self._guarding:
            _sigterm_guard.release()
            self._guarding = False
        if errors and raise_errors:
            raise LabError("teardown incomplete: " + "; ".join(errors))

    def _build(self) -> None:
        for ns in (self.server_ns, self.client_ns):
            if ns in netns.listnetns():
                raise LabError(f"namespace {ns} already exists")
            netns.create(ns)
            self._created.append(ns)
            call_in(ns, self._tune_sysctls, timeout=10.0)

        # veth does segmentation offload: without a limit, a sender's TCP stack
        # hands it 64 KB super-packets and generic (skb-mode) XDP on the far end
        # sees them whole, unlike any NIC. One segment per skb makes every frame
        # wire-sized in every XDP mode (native mode on veth enforces it anyway).
        gso = {"gso_max_segs": 1} if self.wire_frames else {}
        with self.iproute(self.server_ns) as ipr:
            # Created inside the server namespace with the peer placed straight
            # into the client one: no interface ever appears in the host's namespace.
            ipr.link(
                "add",
                index=SERVER_IFINDEX,
                ifname=self.server_if,
                kind="veth",
                peer={"ifname": self.client_if, "net_ns_fd": self.client_ns, **gso},
                **gso,
            )
        self.server_ifindex = self._configure_end(
            self.server_ns,
            self.server_if,
            self.server_v4,
            self.server_v6,
            gateway_v4=self.client_v4,
            gateway_v6=self.client_v6,
        )
        self.client_ifindex = self._configure_end(
            self.client_ns,
            self.client_if,
            self.client_v4,
            self.client_v6,
            gateway_v4=self.server_v4,
            gateway_v6=self.server_v6,
        )
        for ns, ifname in ((self.server_ns, self.server_if), (self.client_ns, self.client_if)):
            self._wait_ready(ns, ifname)

    @staticmethod
    def _tune_sysctls() -> None:
        # No duplicate address detection at all, so link-local addresses are
        # usable at once too (global ones also get IFA_F_NODAD).
        for scope in ("all", "default"):
            write_sysctl(f"net/ipv6/conf/{scope}/accept_dad", 0)
            # IPv4 settings of a new namespace are copied from the host's
            # (net.core.devconf_inherit_init_net=0); a host with strict rp_filter
            # would drop the lab's spoofed-source traffic, so turn it off here.
            write_sysctl(f"net/ipv4/conf/{scope}/rp_filter", 0)
            # No router solicitations: fewer stray packets on a link the
            # sensor tests count packets on.
            write_sysctl(f"net/ipv6/conf/{scope}/router_solicitations", 0)

    def _configure_end(
        self, ns: str, ifname: str, v4: str, v6: str, *, gateway_v4: str, gateway_v6: str
    ) -> int:
        with self.iproute(ns) as ipr:
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")
            (index,) = ipr.link_lookup(ifname=ifname)
            ipr.link("set", index=index, state="up")
            ipr.addr("add", index=index, address=v4, prefixlen=LINK_V4_PREFIXLEN)
            ipr.addr("add", index=index, address=v6, prefixlen=LINK_V6_PREFIXLEN, flags=IFA_F_NODAD)
            # Each side is the other's default gateway: replies to any source
            # go back over the veth, and an address nobody owns is silently
            # dropped by the far side (forwarding is off), a real timeout.
            ipr.route("add", dst="0.0.0.0/0", gateway=gateway_v4)
            ipr.route("add", dst="::/0", gateway=gateway_v6, family=socket.AF_INET6)
            for family in (socket.AF_INET, socket.AF_INET6):
                # The "lookup local" rule sits at priority 0, ahead of any rule
                # we could add, so traffic to our own addresses would never
                # meet a drop rule. Move it behind room for ours (add, then
                # delete, so local delivery never has a gap).
                ipr.rule("add", family=family, priority=LOCAL_RULE_PRIORITY, table=255)
                ipr.rule("del", family=family, priority=0, table=255)
        return int(index)

    def _wait_ready(self, ns: str, ifname: str, timeout: float = 5.0) -> None:
        """Wait until the link is up with carrier and no IPv6 address is tentative."""
        deadline = time.monotonic() + timeout
        with self.iproute(ns) as ipr:
            while True:
                (link,) = ipr.get_links(ifname=ifname)
                tentative = [
                    a.get_attr("IFA_ADDRESS")
                    for a in ipr.get_addr(family=socket.AF_INET6)
                    if (a.get_attr("IFA_FLAGS") or a["flags"]) & IFA_F_TENTATIVE
                ]
                if link.get_attr("IFLA_OPERSTATE") == "UP" and not tentative:
                    return
                if time.monotonic() > deadline:
                    raise LabError(
                        f"{ifname} in {ns} not ready after {timeout}s: "
                        f"operstate {link.get_attr('IFLA_OPERSTATE')}, tentative {tentative}"
                    )
                time.sleep(0.02)

    # -- handles -----------------------------------------------------------

    def iproute(self, ns: str) -> IPRoute:
        """An rtnetlink handle inside `ns`; close it (use `with`)."""
        return IPRoute(netns=ns, flags=0)

    def server_iproute(self) -> IPRoute:
        """An rtnetlink handle in the server namespace, where `server_if` lives."""
        return self.iproute(self.server_ns)

    def in_server(self) -> contextlib.AbstractContextManager[None]:
        """Move the calling thread into the server namespace for the `with` body."""
        return in_namespace(self.server_ns)

    def in_client(self) -> contextlib.AbstractContextManager[None]:
        """Move the calling thread into the client namespace for the `with` body."""
        return in_namespace(self.client_ns)

    def call_in_server(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call_in(self.server_ns, fn, *args, **kwargs)

    def call_in_client(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call_in(self.client_ns, fn, *args, **kwargs)

    # -- processes ---------------------------------------------------------

    @staticmethod
    def _ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
        # `ip netns exec` rather than setns in preexec_fn: preexec_fn is unsafe
        # in a threaded parent (pyroute2 and pytest both run threads); ip also
        # remounts /sys for the namespace, and it execs the command, so the
        # pid we get is the command's own.
        return ["ip", "netns", "exec", ns, *argv]

    def run(
        self, ns: str, argv: Sequence[str], *, timeout: float, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run `argv` to completion inside `ns` (subprocess.run keywords pass through)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self._ns_argv(ns, argv), timeout=timeout, check=False, **kwargs)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside `ns`; the topology ends it at teardown if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self._ns_argv(ns, argv), **kwargs)
        self._processes.append(proc)
        return proc

    # -- addresses and drops -----------------------------------------------

    def add_client_addresses(self, n_v4: int, n_v6: int = 0) -> tuple[list[str], list[str]]:
        """Add source addresses to the client veth; return the new (IPv4, IPv6) ones.

        IPv4 addresses are /32s counting up from 10.201.1.0, IPv6 ones /128s
        from fd00:b0:0:1::1 (a /64 of their own, apart from the link's).
        Repeated calls continue where the last one stopped.
        """
        v4_start = int(CLIENT_POOL_V4_FIRST) + len(self.extra_v4)
        v4 = [str(ipaddress.IPv4Address(v4_start + i)) for i in range(n_v4)]
        v6_start = int(CLIENT_POOL_V6.network_address) + 1 + len(self.extra_v6)
        v6 = [str(ipaddress.IPv6Address(v6_start + i)) for i in range(n_v6)]
        if v4 and ipaddress.IPv4Address(v4[-1]) not in CLIENT_POOL_V4:
            raise LabError(f"client IPv4 pool {CLIENT_POOL_V4} exhausted")
        # One netlink socket for the whole batch: each add is a ~0.2 ms round trip.
        with self.iproute(self.client_ns) as ipr:
            for address in v4:
                ipr.addr("add", index=self.client_ifindex, address=address, prefixlen=32)
            for address in v6:
                ipr.addr(
                    "add",
                    index=self.client_ifindex,
                    address=address,
                    prefixlen=128,
                    flags=IFA_F_NODAD,
                )
        self.extra_v4.extend(v4)
        self.extra_v6.extend(v6)
        if v6:
            self._wait_ready(self.client_ns, self.client_if)
        return v4, v6

    def drop_inbound(self, port: int, *, priority: int = DROP_RULE_PRIORITY) -> None:
        """Make the server namespace silently drop TCP/UDP to `port` arriving on the veth.

        A blackhole policy-routing rule ahead of local delivery (no firewall
        needed, and it acts after XDP and tc, so a sensor on `server_if` still
        sees the packets): the input route lookup of a matching packet yields
        a blackhole route and the packet is discarded, so the client sees a
        connect timeout, not a refusal. Traffic the server sends itself over
        lo is not affected.
        """
        if not 0 < priority < LOCAL_RULE_PRIORITY:
            raise ValueError(f"priority must be in 1..{LOCAL_RULE_PRIORITY - 1}")
        with self.server_iproute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                ipr.rule(
                    "add",
                    family=family,
                    priority=priority,
                    iifname=self.server_if,
                    dport_range=f"{port}:{port}",
                    action="FR_ACT_BLACKHOLE",
                )

    def __repr__(self) -> str:
        return f"Topology(server_ns={self.server_ns!r}, client_ns={self.client_ns!r})"


def check_root() -> None:
    """Raise LabError unless we may create namespaces (root)."""
    if os.geteuid() != 0:
        raise LabError(
            f"network namespaces need root (euid {os.geteuid()}); "
            "run the netns tests as root, they are never skipped"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.netns up` holds a topology until Ctrl-C or SIGTERM;
    `python -m lab.netns cleanup` removes leftovers of killed runs."""
    parser = argparse.ArgumentParser(
        prog="python -m lab.netns", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--prefix", default="bw")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build a topology, print it as JSON, hold it until signalled")
    cleanup = sub.add_parser("cleanup", help="remove namespaces of runs that are gone")
    cleanup.add_argument("--all", action="store_true", help="also those of live runs")
    args = parser.parse_args(argv)
    check_root()
    if args.command == "cleanup":
        for ns in cleanup_stale(args.prefix, include_live=args.all):
            print(f"removed {ns}")
        return 0
    # Started in the background by a non-interactive shell, we inherit SIGINT
    # ignored, and Python then installs no KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Topology(args.prefix) as topo:
        names = ("server_ns", "client_ns", "server_if", "client_if", "server_ifindex")
        print(json.dumps({name: getattr(topo, name) for name in names}), flush=True)
        with contextlib.suppress(KeyboardInterrupt, SystemExit):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
