"""Compiles bpf/ with BCC, attaches it to interfaces and detaches it cleanly.

XDP goes on ingress (native, generic or auto), the tc programs on clsact egress
and ingress (behind XDP), all through pyroute2 so an interface in another
network namespace is reached without moving the agent there. Verdict maps
are pinned under the pin dir, so a restarted agent finds the verdicts it left
and the kernel keeps enforcing them while it is away.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sensor import abi
from sensor.errors import AttachError, CompileError, ConfigError, MapError, SensorError
from sensor.libbpf import prog_name

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
SOURCE = BPF_DIR / "xdp_sensor.c"
DEFAULT_PIN_DIR = "/sys/fs/bpf/botwall"

XDP_PROGRAM = "botwall_xdp"
# Tail-called by XDP_PROGRAM (bpf/xdp_sensor.c), by their index in enum tail_call
# (bpf/maps.h).
TAIL_CALLS = {"botwall_hello": 0}
TC_PROGRAM = "botwall_tc_egress"
TC_INGRESS_PROGRAM = "botwall_tc_ingress"
# The kernel keeps 15 characters of a program's name.
OWN_PROGRAM_PREFIX = "botwall_"

# Maps that outlive the agent (see bpf/maps.h); the rest is recreated per load.
PINNED_MAPS = (
    "allow_addr",
    "allow_cidr",
    "block_addr",
    "block_cidr",
    "block_flow",
    "throttle",
    "tarpit",
    "block_hello",
    "hello_exempt",
    "config",
)

XdpMode = Literal["auto", "native", "generic"]
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
_ATTACHED_MODE_NAMES = {1: "native", 2: "generic", 3: "offload", 4: "multi"}

TC_EGRESS_PARENT = 0xFFFFFFF3  # clsact egress hook
TC_INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress hook
TC_FILTER_PRIO = 49152  # arbitrary, fixed so detach finds our filter
CLSACT_HANDLE = 0xFFFF0000


@dataclass(frozen=True)
class SensorSettings:
    """Compile-time sizes (-D flags) and the ports to watch."""

    tls_ports: tuple[int, ...] = (443,)
    http_ports: tuple[int, ...] = ()
    pin_dir: str = DEFAULT_PIN_DIR
    flow_table_size: int = 262_144
    source_table_size: int = 262_144
    verdict_table_size: int = 262_144
    cidr_table_size: int = 65_536
    ringbuf_pages: int = 1024  # 4 MiB; a power of two
    # More -D switches, e.g. -DBOTWALL_ABI_CHECK for tests/test_abi.py.
    extra_cflags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for port in (*self.tls_ports, *self.http_ports):
            if not 0 < port < 65536:
                raise ConfigError(f"port {port} is not a TCP port (1-65535)")
        if not self.tls_ports and not self.http_ports:
            raise ConfigError("no ports to watch: give at least one TLS or HTTP port")
        if self.ringbuf_pages & (self.ringbuf_pages - 1):
            raise ConfigError(f"ringbuf_pages {self.ringbuf_pages} is not a power of two")
        if not self.pin_dir.startswith("/sys/fs/bpf/"):
            raise ConfigError(f"pin dir {self.pin_dir} is not under /sys/fs/bpf/")

    def cflags(self) -> list[str]:
        return [
            f"-I{BPF_DIR}",
            f'-DPIN_DIR="{self.pin_dir}"',
            f"-DFLOW_TABLE_SIZE={self.flow_table_size}",
            f"-DSOURCE_TABLE_SIZE={self.source_table_size}",
            f"-DVERDICT_TABLE_SIZE={self.verdict_table_size}",
            f"-DCIDR_TABLE_SIZE={self.cidr_table_size}",
            f"-DRINGBUF_PAGES={self.ringbuf_pages}",
            # BCC's headers trip these on clang 14; they are not ours.
            "-Wno-unused-value",
            "-Wno-pointer-sign",
            "-Wno-compare-distinct-pointer-types",
            *self.extra_cflags,
        ]

    def watch_flags(self) -> dict[int, int]:
        flags: dict[int, int] = {}
        for port in self.tls_ports:
            flags[port] = flags.get(port, 0) | abi.WatchFlag.TLS
        for port in self.http_ports:
            flags[port] = flags.get(port, 0) | abi.WatchFlag.HTTP
        return flags


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """BCC prints compiler and verifier logs from C straight to fd 2: capture
    them so errors can quote the tail."""
    sink: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))


def _tail(log: str, lines: int = 25) -> str:
    kept = [line for line in log.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def require_root() -> None:
    if os.geteuid() != 0:
        raise SensorError(
            "the kernel sensor needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON): "
            "run botwall as root, or use `botwall replay` on a capture instead"
        )


def _ensure_bpffs(pin_dir: str) -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        raise SensorError("/sys/fs/bpf is not a BPF filesystem: mount -t bpf bpf /sys/fs/bpf")
    os.makedirs(pin_dir, exist_ok=True)


@dataclass
class Attachment:
    """Where one interface's programs are attached, to undo it exactly."""

    ifname: str
    ifindex: int
    netns: str | None
    xdp_mode: str  # "native" or "generic"
    created_clsact: bool


# Compiles bpf/parsing.h's PROVEN_SIZE for verifiers that need it.
PROVEN_SIZES_CFLAG = "-DBOTWALL_PROVEN_SIZES"


class _Refused(CompileError):
    """The kernel's verifier refused a program that compiled."""


class Sensor:
    """The compiled sensor: its two programs, its maps, its attachments."""

    def __init__(self, settings: SensorSettings | None = None) -> None:
        from bcc import BPF  # Debian's python3-bpfcc; imported here so replay needs no BCC

        self.settings = settings or SensorSettings()
        require_root()
        _ensure_bpffs(self.settings.pin_dir)
        self.proven_sizes = False  # whether this kernel needed bpf/parsing.h's PROVEN_SIZE
        try:
            self._compile_and_load(BPF, self.settings.cflags())
        except _Refused as refused:
            # An older verifier (Debian 12's 6.1) cannot follow the helper
            # sizes as written; the same program with sizes it can prove.
            self.bpf.cleanup()
            try:
                self._compile_and_load(BPF, [*self.settings.cflags(), PROVEN_SIZES_CFLAG])
            except _Refused as again:
                # Both logs: the second is the one an older verifier judged.
                raise CompileError(
                    f"{refused}\n\nrecompiled with {PROVEN_SIZES_CFLAG}, again refused: {again}"
                ) from None
            self.proven_sizes = True
        self.attachments: list[Attachment] = []
        self._set_watched_ports()

    def _compile_and_load(self, BPF: Any, cflags: list[str]) -> None:
        with _captured_stderr() as log:
            try:
                self.bpf = BPF(src_file=str(SOURCE).encode(), cflags=cflags)
            except Exception as exc:  # BCC raises bare Exception
                failure: Exception | None = exc
            else:
                failure = None
        if failure is not None:
            raise CompileError(f"BCC could not compile {SOURCE}: {failure}\n{_tail(log[0])}")
        self.xdp_fn = self._load(XDP_PROGRAM, BPF.XDP)
        self.tc_fn = self._load(TC_PROGRAM, BPF.SCHED_CLS)
        self.tc_ingress_fn = self._load(TC_INGRESS_PROGRAM, BPF.SCHED_CLS)
        tail_calls = self.table("tail_calls")
        for name, index in TAIL_CALLS.items():
            tail_calls[ctypes.c_int(index)] = ctypes.c_int(self._load(name, BPF.XDP).fd)

    def _load(self, name: str, prog_type: int) -> Any:
        with _captured_stderr() as log:
            try:
                fn = self.bpf.load_func(name.encode(), prog_type)
            except Exception as exc:
                failure: Exception | None = exc
            else:
                failure = None
        if failure is not None:
            raise _Refused(
                f"the kernel refused program {name}: {failure}\n"
                f"verifier log (tail):\n{_tail(log[0])}"
            )
        return fn

    def _set_watched_ports(self) -> None:
        ports = self.table("watched_ports")
        for port, flags in self.settings.watch_flags().items():
            ports[ctypes.c_uint32(port)] = ctypes.c_uint8(flags)

    # ---- maps ----

    def table(self, name: str) -> Any:
        try:
            return self.bpf[name]
        except KeyError:
            raise MapError(f"no map named {name} in {SOURCE.name}") from None

    def counters(self) -> dict[abi.Counter, int]:
        """Per-CPU counters summed over CPUs."""
        table = self.table("counters")
        totals: dict[abi.Counter, int] = {}
        for counter in abi.Counter:
            if counter is abi.Counter.MAX:
                continue
            per_cpu = table[ctypes.c_uint32(counter)]
            totals[counter] = int(sum(per_cpu))
        return totals

    # ---- attach / detach ----

    def attach(self, ifname: str, mode: XdpMode = "auto", netns: str | None = None) -> Attachment:
        """XDP on ingress and tc on egress of one interface.

        Our own program left attached by an earlier agent is replaced; anyone
        else's XDP program is an error, never silently replaced."""
        with _netlink(netns) as ipr:
            ifindex = _ifindex(ipr, ifname, netns)
            self._refuse_foreign_xdp(ipr, ifindex, ifname)
            xdp_mode = self._attach_xdp(ipr, ifindex, ifname, mode)
            created = self._attach_tc(ipr, ifindex, ifname)
        attachment = Attachment(ifname, ifindex, netns, xdp_mode, created)
        self.attachments.append(attachment)
        return attachment

    def _refuse_foreign_xdp(self, ipr: Any, ifindex: int, ifname: str) -> None:
        prog_id, _ = _attached_xdp(ipr, ifindex)
        if prog_id:
            name = prog_name(prog_id) or f"id {prog_id}"
            if not name.startswith(OWN_PROGRAM_PREFIX):
                raise AttachError(
                    f"{ifname}: another XDP program ({name}, id {prog_id}) is already "
                    f"attached; botwall will not replace it. Detach it first "
                    f"(ip link set dev {ifname} xdp off)"
                )

    def _attach_xdp(self, ipr: Any, ifindex: int, ifname: str, mode: XdpMode) -> str:
        from pyroute2 import NetlinkError

        # An earlier botwall in the other mode must go first: the kernel
        # refuses to mix native and generic on one interface.
        _, attached_mode = _attached_xdp(ipr, ifindex)
        if attached_mode and attached_mode != mode:
            _set_xdp(ipr, ifindex, -1, _MODE_FLAGS.get(attached_mode, 0))
        tried = ["native", "generic"] if mode == "auto" else [mode]
        errors = []
        for candidate in tried:
            try:
                _set_xdp(ipr, ifindex, self.xdp_fn.fd, _MODE_FLAGS[candidate])
                return candidate
            except NetlinkError as exc:
                errors.append(f"{candidate}: {os.strerror(exc.code)}")
        raise AttachError(
            f"{ifname}: could not attach XDP program {XDP_PROGRAM} ({'; '.join(errors)})"
        )

    def _attach_tc(self, ipr: Any, ifindex: int, ifname: str) -> bool:
        from pyroute2 import NetlinkError

        created = False
        try:
            ipr.tc("add", "clsact", ifindex)
            created = True
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST: someone's clsact is there; share it
                raise AttachError(f"{ifname}: could not add clsact qdisc: {exc}") from exc
        for parent, fn, name in (
            (TC_EGRESS_PARENT, self.tc_fn, TC_PROGRAM),
            (TC_INGRESS_PARENT, self.tc_ingress_fn, TC_INGRESS_PROGRAM),
        ):
            with contextlib.suppress(NetlinkError):
                ipr.tc("del-filter", "bpf", ifindex, parent=parent, prio=TC_FILTER_PRIO)
            try:
                ipr.tc(
                    "add-filter",
                    "bpf",
                    ifindex,
                    ":1",
                    fd=fn.fd,
                    name=name,
                    parent=parent,
                    prio=TC_FILTER_PRIO,
                    classid=1,
                    direct_action=True,
                )
            except NetlinkError as exc:
                raise AttachError(f"{ifname}: could not attach tc program {name}: {exc}") from exc
        return created

    def detach(self, attachment: Attachment) -> None:
        detach_interface(attachment.ifname, attachment.netns, attachment.created_clsact)
        self.attachments.remove(attachment)

    def detach_all(self) -> None:
        for attachment in list(self.attachments):
            self.detach(attachment)

    def close(self) -> None:
        """Detaches and frees the programs; pinned verdict maps stay."""
        self.detach_all()
        self.bpf.cleanup()


def detach_interface(ifname: str, netns: str | None = None, remove_clsact: bool = True) -> bool:
    """Removes botwall's XDP and tc programs from an interface; True if any was there.
    Works without the Sensor that attached them (`botwall detach`)."""
    from pyroute2 import NetlinkError

    removed = False
    with _netlink(netns) as ipr:
        ifindex = _ifindex(ipr, ifname, netns)
        prog_id, mode = _attached_xdp(ipr, ifindex)
        if prog_id and (prog_name(prog_id) or "").startswith(OWN_PROGRAM_PREFIX):
            _set_xdp(ipr, ifindex, -1, _MODE_FLAGS.get(mode or "", 0))
            removed = True
        for parent in (TC_EGRESS_PARENT, TC_INGRESS_PARENT):
            with contextlib.suppress(NetlinkError):
                ipr.tc("del-filter", "bpf", ifindex, parent=parent, prio=TC_FILTER_PRIO)
                removed = True
        if remove_clsact:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", ifindex)
    return removed


def remove_pins(pin_dir: str = DEFAULT_PIN_DIR) -> None:
    """Deletes the pinned verdict maps: every verdict is gone for good."""
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir)


@contextlib.contextmanager
def _netlink(netns: str | None) -> Iterator[Any]:
    from pyroute2 import IPRoute, NetNS

    try:
        ipr = NetNS(netns) if netns else IPRoute()
    except Exception as exc:  # pyroute2 raises OSError or its own errors
        raise AttachError(f"cannot open network namespace {netns!r}: {exc}") from exc
    try:
        yield ipr
    finally:
        ipr.close()


def _ifindex(ipr: Any, ifname: str, netns: str | None) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        where = f" in network namespace {netns}" if netns else ""
        raise AttachError(f"no such interface: {ifname}{where}")
    return int(found[0])


def _attached_xdp(ipr: Any, ifindex: int) -> tuple[int, str | None]:
    """The id and mode of the XDP program on an interface, (0, None) if none."""
    link = ipr.get_links(ifindex)[0]
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return 0, None
    prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    mode = attached if isinstance(attached, str) else _ATTACHED_MODE_NAMES.get(attached or 0)
    if mode == "xdp":
        mode = "native"
    elif mode == "xdpgeneric":
        mode = "generic"
    return int(prog_id), mode if prog_id else None


def _set_xdp(ipr: Any, ifindex: int, fd: int, flags: int) -> None:
    ipr.link(
        "set",
        index=ifindex,
        xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]},
    )
