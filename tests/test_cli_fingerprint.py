"""`botwall fingerprint PCAP`, run as a real subprocess on real captures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_TLS = Path(__file__).resolve().parents[2] / "shared/fixtures/tls"
CLIENTS = REPO / "tests/fixtures/clients"

SYN_KEYS = ["flow", "tcp_signature", "os_guess", "ttl", "window", "mss", "wscale", "options"]
HELLO_KEYS = ["flow", "sni", "ja4", "ja4_r", "ja3", "ja3_string"]


def botwall(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def rows(*args: str | Path) -> list[dict[str, Any]]:
    done = botwall("fingerprint", *args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_tls12_hello() -> None:
    # Values from the JA4 reference implementation (expected.tsv) and tshark's JA3.
    assert rows(SHARED_TLS / "tls12.pcap") == [
        {
            "flow": "192.168.133.129:36372->34.117.237.239:443",
            "sni": "contile.services.mozilla.com",
            "ja4": "t13d1715h2_5b57614c22b0_3d5424432f57",
            "ja4_r": "t13d1715h2_002f,0035,009c,009d,1301,1302,1303,c009,c00a,c013,c014,c02b,"
            "c02c,c02f,c030,cca8,cca9_0005,000a,000b,000d,0015,0017,001c,0022,0023,002b,002d,"
            "0033,ff01_0403,0503,0603,0804,0805,0806,0401,0501,0601,0203,0201",
            "ja3": "579ccef312d18482fc42e2b822ca2430",
            "ja3_string": "771,4865-4867-4866-49195-49199-52393-52392-49196-49200-49162-49161-"
            "49171-49172-156-157-47-53,0-23-65281-10-11-35-16-5-34-51-43-13-45-28-21,"
            "29-23-24-25-256-257,0",
        }
    ]


def test_macos_syn_then_hello() -> None:
    syn, hello = rows(SHARED_TLS / "macos_tcp_flags.pcap")
    assert list(syn) == SYN_KEYS
    assert syn == {
        "flow": "172.16.5.16:61311->172.67.24.71:443",
        "tcp_signature": "4:64:1460:65535:6:M,N,W,N,N,T,S,E:df+ecn_setup+ip_id_zero",
        "os_guess": {
            "family": "macOS/iOS",
            "confidence": 0.9,
            "reason": "macOS or iOS: initial TTL 64, options M,N,W,N,N,T,S,E, window 65535, "
            "wscale 6",
        },
        "ttl": 64,
        "window": 65535,
        "mss": 1460,
        "wscale": 6,
        "options": "M,N,W,N,N,T,S,E",
    }
    assert list(hello) == HELLO_KEYS
    assert (hello["flow"], hello["sni"]) == (
        "172.16.5.16:61311->172.67.24.71:443",
        "venarisecurity.com",
    )
    assert hello["ja4"] == "t13d2613h2_2802a3db6c62_845d286b0d67"
    assert hello["ja3"] == "6fa3244afc6bb6f9fad207b6b52af26b"


def test_local_curl_capture_on_its_port() -> None:
    syn, hello = rows(CLIENTS / "curl.pcap", "--tls-port", "8443")
    assert syn["tcp_signature"] == "4:64:65495:mss*1:10:M,S,T,N,W:df"
    assert syn["os_guess"]["family"] == "Linux"
    assert (syn["ttl"], syn["window"], syn["mss"], syn["wscale"]) == (64, 65495, 65495, 10)
    assert hello["flow"] == syn["flow"]
    assert hello["sni"] == "botwall.test"
    assert hello["ja4"] == "t13d3112h2_e8f1e7e78f70_b26ce05bbdd6"
    assert hello["ja3"] == "0149f47eabf9a20d0893e2a44e5a6323"


def test_ports_not_watched_print_nothing() -> None:
    assert rows(SHARED_TLS / "macos_tcp_flags.pcap", "--tls-port", "9", "--http-port", "9") == []
    watched = rows(SHARED_TLS / "macos_tcp_flags.pcap", "--tls-port", "443", "--http-port", "80")
    assert [list(r) for r in watched] == [SYN_KEYS, HELLO_KEYS]


def test_ipv6_flow_is_bracketed() -> None:
    syn, hello = rows(SHARED_TLS / "ipv6.pcapng")
    assert (
        syn["flow"]
        == hello["flow"]
        == "[2001:4998:ef83:14:8000::100d]:64034->[2606:4700::6811:d209]:443"
    )
    assert syn["tcp_signature"] == "6:64:1346:65535:6:M,N,W,N,N,T,S,E:df+flow_label"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pcap"
    done = botwall("fingerprint", missing)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"botwall: {missing}: no such capture file\n"


def test_not_a_capture_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.pcap"
    text.write_text("this is not a capture\n")
    done = botwall("fingerprint", text)
    assert done.returncode == 2
    assert done.stderr.startswith(f"botwall: {text}: not a pcap or pcapng capture")
    assert "Traceback" not in done.stderr


def test_help_lists_the_command() -> None:
    done = botwall("--help")
    assert done.returncode == 0
    assert "fingerprint" in done.stdout
