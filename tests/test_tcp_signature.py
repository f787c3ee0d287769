"""TCP SYN signatures and OS guesses, on constructed SYNs and on real captures."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from sensor.abi import SynQuirk
from sensor.events import Flow, SynEvent
from sensor.fingerprint.tcp import (
    FAMILIES,
    OsGuess,
    TcpSignature,
    initial_ttl,
    os_guess,
    os_signatures,
    syn_signature,
)
from sensor.replay import ReplaySource

TESTS = Path(__file__).resolve().parent
SHARED_TLS = Path(__file__).resolve().parents[2] / "shared/fixtures/tls"

MSS, NOP, WS, SACK, TS, EOL = 2, 1, 3, 4, 8, 0
LINUX_OPTS = (MSS, SACK, TS, NOP, WS)
WINDOWS_OPTS = (MSS, NOP, WS, NOP, NOP, SACK)
MACOS_OPTS = (MSS, NOP, WS, NOP, NOP, TS, SACK, EOL)
FREEBSD_OPTS = (MSS, NOP, WS, SACK, TS)
NO_QUIRKS = SynQuirk(0)


def syn(
    ttl: int,
    window: int,
    mss: int | None,
    wscale: int | None,
    options: tuple[int, ...],
    *,
    df: bool = True,
    quirks: SynQuirk = NO_QUIRKS,
    v6: bool = False,
) -> SynEvent:
    src, dst = ("2001:db8::1", "2001:db8::2") if v6 else ("198.51.100.7", "203.0.113.1")
    return SynEvent(
        ts_ns=1,
        flow=Flow(ipaddress.ip_address(src), 40000, ipaddress.ip_address(dst), 443),
        seq=1,
        ttl=ttl,
        df=df,
        ip_id=0 if v6 else 4242,
        window=window,
        mss=mss,
        wscale=wscale,
        options=options,
        options_len=20,
        quirks=quirks,
        tcp_flags=0x02,
        ip_total_len=60,
        payload_len=0,
    )


def test_linux_signature_fields_and_string() -> None:
    sig = syn_signature(syn(57, 64240, 1460, 7, LINUX_OPTS))
    assert sig == TcpSignature(
        ip_version=4,
        ttl=57,
        initial_ttl=64,
        hops=7,
        df=True,
        window=64240,
        window_mss=44,
        mss=1460,
        wscale=7,
        options="M,S,T,N,W",
        quirks=(),
    )
    assert sig.window_form == "mss*44"
    assert str(sig) == "4:64:1460:mss*44:7:M,S,T,N,W:df"


def test_window_not_a_multiple_of_mss_is_the_number() -> None:
    sig = syn_signature(syn(64, 65535, 1460, 6, MACOS_OPTS))
    assert sig.window_mss is None
    assert str(sig) == "4:64:1460:65535:6:M,N,W,N,N,T,S,E:df"


def test_missing_fields_and_unknown_options() -> None:
    sig = syn_signature(syn(200, 1024, None, None, (MSS, 30, 254), df=False))
    assert (sig.initial_ttl, sig.hops) == (255, 55)
    assert sig.options == "M,?30,?254"
    assert str(sig) == "4:255:-:1024:-:M,?30,?254:-"
    bare = syn_signature(syn(64, 512, None, None, ()))
    assert bare.options == ""
    assert str(bare) == "4:64:-:512:-:-:df"


def test_quirks_named_in_enum_order() -> None:
    quirks = SynQuirk.IP_ID_ZERO | SynQuirk.ECN_SETUP
    sig = syn_signature(syn(64, 65535, 1460, 6, MACOS_OPTS, quirks=quirks))
    assert sig.quirks == ("ecn_setup", "ip_id_zero")
    assert str(sig).endswith(":df+ecn_setup+ip_id_zero")


@pytest.mark.parametrize(
    ("ttl", "start"),
    [(0, 32), (1, 32), (32, 32), (33, 64), (64, 64), (65, 128), (128, 128), (129, 255), (255, 255)],
)
def test_initial_ttl_is_the_next_common_start(ttl: int, start: int) -> None:
    assert initial_ttl(ttl) == start


@pytest.mark.parametrize(
    ("event", "family", "confidence", "reason"),
    [
        pytest.param(
            syn(57, 64240, 1460, 7, LINUX_OPTS),
            "Linux",
            0.9,
            "Linux 3.x and newer: initial TTL 64, options M,S,T,N,W, window mss*44, wscale 7",
            id="linux-ethernet",
        ),
        pytest.param(
            syn(64, 65495, 65495, 10, LINUX_OPTS),
            "Linux",
            0.9,
            "Linux 3.x and newer: initial TTL 64, options M,S,T,N,W, window mss*1, wscale 10",
            id="linux-loopback",
        ),
        pytest.param(
            syn(60, 64800, 1440, 7, LINUX_OPTS, v6=True),
            "Linux",
            0.9,
            "Linux 3.x and newer: initial TTL 64, options M,S,T,N,W, window mss*45, wscale 7",
            id="linux-ipv6",
        ),
        pytest.param(
            syn(52, 65535, 1400, 9, LINUX_OPTS),
            "Android",
            0.9,
            "Android (Linux kernel, Android's larger buffers): initial TTL 64, "
            "options M,S,T,N,W, window 65535, wscale 9",
            id="android",
        ),
        pytest.param(
            syn(64, 64240, 1460, 7, (MSS, NOP, NOP, SACK, NOP, WS)),
            "Linux",
            0.9,
            "Linux, TCP timestamps disabled: initial TTL 64, options M,N,N,S,N,W, "
            "window mss*44, wscale 7",
            id="linux-no-timestamps",
        ),
        pytest.param(
            syn(116, 64240, 1460, 8, WINDOWS_OPTS),
            "Windows",
            0.9,
            "Windows 10 and newer: initial TTL 128, options M,N,W,N,N,S, window mss*44, wscale 8",
            id="windows-10",
        ),
        pytest.param(
            syn(128, 8192, 1460, 8, WINDOWS_OPTS),
            "Windows",
            0.9,
            "Windows 7 and 8: initial TTL 128, options M,N,W,N,N,S, window 8192, wscale 8",
            id="windows-7",
        ),
        pytest.param(
            syn(50, 65535, 1460, 6, MACOS_OPTS),
            "macOS/iOS",
            0.9,
            "macOS or iOS: initial TTL 64, options M,N,W,N,N,T,S,E, window 65535, wscale 6",
            id="macos",
        ),
        pytest.param(
            # A parser that keeps walking past EOL reports the padding too.
            syn(50, 65535, 1460, 6, (*MACOS_OPTS, EOL)),
            "macOS/iOS",
            0.9,
            "macOS or iOS: initial TTL 64, options M,N,W,N,N,T,S,E,E, window 65535, wscale 6",
            id="macos-two-eols",
        ),
        pytest.param(
            syn(61, 65535, 1460, 6, FREEBSD_OPTS),
            "FreeBSD",
            0.9,
            "FreeBSD 9 and newer: initial TTL 64, options M,N,W,S,T, window 65535, wscale 6",
            id="freebsd",
        ),
        pytest.param(
            syn(64, 29200, 1460, 14, LINUX_OPTS),
            "Linux",
            0.75,
            "Linux 3.x and newer: initial TTL 64, options M,S,T,N,W, window mss*20",
            id="linux-odd-wscale",
        ),
        pytest.param(
            syn(64, 1000, 1460, 3, LINUX_OPTS),
            "Linux",
            0.5,
            "Linux 3.x and newer: initial TTL 64, options M,S,T,N,W",
            id="linux-layout-only",
        ),
        pytest.param(
            syn(120, 1000, 1460, None, (MSS,)),
            "Windows",
            0.25,
            "initial TTL 128 (Windows' default), unknown option layout",
            id="ttl-128-only",
        ),
        pytest.param(
            syn(64, 1024, 1460, None, (MSS,)),
            "other",
            0.0,
            "no known system sends initial TTL 64 with options M",
            id="unknown",
        ),
        pytest.param(
            # Windows' layout with a Unix TTL is nobody's: the layout alone decides nothing.
            syn(64, 64240, 1460, 8, WINDOWS_OPTS),
            "other",
            0.0,
            "no known system sends initial TTL 64 with options M,N,W,N,N,S",
            id="windows-layout-ttl-64",
        ),
    ],
)
def test_os_guess(event: SynEvent, family: str, confidence: float, reason: str) -> None:
    assert os_guess(syn_signature(event)) == OsGuess(family, confidence, reason)


def test_table_rows_are_valid() -> None:
    rows = os_signatures()
    assert {row.family for row in rows} <= set(FAMILIES)
    assert {"Linux", "Windows", "macOS/iOS", "Android", "FreeBSD"} <= {r.family for r in rows}
    assert all(not o.endswith("E") for row in rows for o in row.options)


def test_real_linux_syn_from_this_machine() -> None:
    # curl on Debian 12 over loopback: the kernel, not curl, built this SYN.
    events = ReplaySource(TESTS / "fixtures/clients/curl.pcap", tls_ports=[8443]).events()
    syns = [e for e in events if isinstance(e, SynEvent)]
    assert len(syns) == 1
    sig = syn_signature(syns[0])
    assert str(sig) == "4:64:65495:mss*1:10:M,S,T,N,W:df"
    assert os_guess(sig).family == "Linux"


def test_real_macos_syn() -> None:
    events = ReplaySource(SHARED_TLS / "macos_tcp_flags.pcap").events()
    sig = syn_signature(next(e for e in events if isinstance(e, SynEvent)))
    assert str(sig) == "4:64:1460:65535:6:M,N,W,N,N,T,S,E:df+ecn_setup+ip_id_zero"
    assert os_guess(sig) == OsGuess(
        "macOS/iOS",
        0.9,
        "macOS or iOS: initial TTL 64, options M,N,W,N,N,T,S,E, window 65535, wscale 6",
    )
