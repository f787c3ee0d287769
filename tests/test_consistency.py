"""Consistency verdicts between User-Agent, TLS ClientHello and TCP SYN, with their reasons."""

from __future__ import annotations

import ipaddress

import pytest

from sensor.abi import SynQuirk
from sensor.events import Flow, SynEvent
from sensor.fingerprint.consistency import (
    StackMatch,
    check_consistency,
    client_stacks,
    load_client_stacks,
)
from sensor.fingerprint.tcp import TcpSignature, syn_signature

CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
FIREFOX_WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"
CHROME_ANDROID = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36"
)
CHROME_IOS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) CriOS/124.0.6367.88 Mobile/15E148 Safari/604.1"
)
SAFARI_MAC = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Safari/605.1.15"
)

# JA4s from client_stacks.toml, captured on this project's machines.
JA4_CHROMIUM = "t13d1517h2_8daaf6152771_cb7bf5808d99"
JA4_FIREFOX = "t13d1617h2_86a278354501_3cbfd9057e0d"
JA4_REQUESTS = "t13d3112h1_e8f1e7e78f70_b26ce05bbdd6"
JA4_CURL = "t13d3112h2_e8f1e7e78f70_b26ce05bbdd6"
JA4_HTTPX = "t13d3112h1_e8f1e7e78f70_d41ae481755e"
JA4_GO = "t13d1910h2_9dc949149365_97f8aa674fd9"
# A JA4 no table row has, whose cipher suites are OpenSSL 3.0's defaults.
JA4_OPENSSL_CIPHERS = "t13d3115h2_e8f1e7e78f70_0123456789ab"


def tcp(ttl: int, window: int, wscale: int, options: tuple[int, ...]) -> TcpSignature:
    return syn_signature(
        SynEvent(
            ts_ns=1,
            flow=Flow(
                ipaddress.ip_address("198.51.100.7"),
                40000,
                ipaddress.ip_address("203.0.113.1"),
                443,
            ),
            seq=1,
            ttl=ttl,
            df=True,
            ip_id=1,
            window=window,
            mss=1460,
            wscale=wscale,
            options=options,
            options_len=20,
            quirks=SynQuirk(0),
            tcp_flags=0x02,
            ip_total_len=60,
            payload_len=0,
        )
    )


LINUX = tcp(57, 64240, 7, (2, 4, 8, 1, 3))
WINDOWS = tcp(116, 64240, 8, (2, 1, 3, 1, 1, 4))
MACOS = tcp(52, 65535, 6, (2, 1, 3, 1, 1, 8, 4, 0))
TTL_128_ONLY = tcp(120, 8000, 2, (2,))


def test_chrome_on_windows_that_is_python_on_linux() -> None:
    verdict = check_consistency(ja4=JA4_REQUESTS, tcp=LINUX, user_agent=CHROME_WINDOWS)
    assert not verdict.consistent
    assert verdict.reasons == (
        "User-Agent claims Windows but the TCP SYN looks like Linux (TTL 64, options M,S,T,N,W)",
        "User-Agent claims Chrome but the TLS ClientHello matches "
        "python-requests/urllib3 (OpenSSL)",
    )
    assert verdict.tls == StackMatch(
        frozenset({"python"}), ("python-requests/urllib3 (OpenSSL)",), exact=True
    )
    assert verdict.os is not None and verdict.os.family == "Linux"
    assert verdict.user_agent is not None and verdict.user_agent.browser == "Chrome"


def test_honest_curl_on_linux() -> None:
    verdict = check_consistency(ja4=JA4_CURL, tcp=LINUX, user_agent="curl/7.88.1")
    assert verdict.consistent
    assert verdict.reasons == ()
    assert verdict.checked == ("User-Agent client curl agrees with the TLS ClientHello",)


def test_honest_firefox_on_windows() -> None:
    verdict = check_consistency(ja4=JA4_FIREFOX, tcp=WINDOWS, user_agent=FIREFOX_WINDOWS)
    assert verdict.consistent
    assert verdict.checked == (
        "User-Agent OS Windows agrees with the TCP SYN",
        "User-Agent client Firefox agrees with the TLS ClientHello",
    )


def test_chrome_on_android_with_a_linux_syn_is_consistent() -> None:
    # Android is Linux underneath: a tuned Android kernel may send Linux's SYN.
    verdict = check_consistency(ja4=JA4_CHROMIUM, tcp=LINUX, user_agent=CHROME_ANDROID)
    assert verdict.consistent
    assert verdict.checked[0] == "User-Agent OS Android agrees with the TCP SYN"


def test_product_token_claims_what_ua_parser_does_not_know() -> None:
    # ua-parser has no name for python-httpx; its product token still claims Python.
    honest = check_consistency(ja4=JA4_HTTPX, user_agent="python-httpx/0.28.1")
    assert honest.consistent
    assert honest.checked == ("User-Agent client python-httpx agrees with the TLS ClientHello",)
    lying = check_consistency(ja4=JA4_GO, user_agent="python-httpx/0.28.1")
    assert lying.reasons == (
        "User-Agent claims python-httpx but the TLS ClientHello matches Go net/http (crypto/tls)",
    )


def test_unknown_ja4_with_known_cipher_suites() -> None:
    verdict = check_consistency(ja4=JA4_OPENSSL_CIPHERS, user_agent=CHROME_WINDOWS)
    assert verdict.reasons == (
        "User-Agent claims Chrome but the TLS ClientHello matches "
        "the cipher suites of curl or openssl or python",
    )
    assert verdict.tls is not None and not verdict.tls.exact


def test_unknown_ja4_is_no_evidence() -> None:
    ja4 = "t13d0000h2_000000000000_000000000000"
    verdict = check_consistency(ja4=ja4, user_agent=CHROME_WINDOWS)
    assert verdict.consistent
    assert verdict.tls is None
    assert verdict.checked == (f"JA4 {ja4} is not a known client stack",)


def test_weak_os_guess_does_not_contradict() -> None:
    # A bare TTL of 128 suggests Windows, but not strongly enough to call a Linux UA a liar.
    linux_ua = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
    verdict = check_consistency(tcp=TTL_128_ONLY, user_agent=linux_ua)
    assert verdict.consistent
    assert verdict.os is not None and verdict.os.family == "Windows"
    assert verdict.checked == (
        "TCP SYN guess (initial TTL 128 (Windows' default), unknown option layout) "
        "is too weak to compare",
    )


def test_chrome_on_ios_must_send_safaris_hello() -> None:
    verdict = check_consistency(ja4=JA4_CHROMIUM, tcp=MACOS, user_agent=CHROME_IOS)
    assert verdict.reasons == (
        "User-Agent claims Chrome Mobile iOS but the TLS ClientHello matches "
        "Chromium headless (BoringSSL)",
    )


def test_safari_on_mac_sending_chromes_hello_from_windows() -> None:
    verdict = check_consistency(ja4=JA4_CHROMIUM, tcp=WINDOWS, user_agent=SAFARI_MAC)
    assert verdict.reasons == (
        "User-Agent claims Mac OS X but the TCP SYN looks like Windows "
        "(TTL 128, options M,N,W,N,N,S)",
        "User-Agent claims Safari but the TLS ClientHello matches Chromium headless (BoringSSL)",
    )


SAFARI_TABLE = """
[families.safari]
user_agents = ["Safari"]
systems = ["macOS/iOS"]

[families.curl]
user_agents = ["curl"]

[[stack]]
ja4 = "t13d2014h2_a09f3c656075_14788d8d241b"
family = "safari"
name = "Safari (Apple TLS)"
version = "test row"
captured = "written by hand for this test"
"""


def test_apple_only_stack_from_a_linux_kernel() -> None:
    table = load_client_stacks(SAFARI_TABLE)
    verdict = check_consistency(ja4="t13d2014h2_a09f3c656075_14788d8d241b", tcp=LINUX, stacks=table)
    assert verdict.reasons == (
        "the TLS ClientHello matches Safari (Apple TLS), which runs only on macOS/iOS, "
        "but the TCP SYN looks like Linux (TTL 64, options M,S,T,N,W)",
    )
    on_a_mac = check_consistency(
        ja4="t13d2014h2_a09f3c656075_14788d8d241b", tcp=MACOS, stacks=table
    )
    assert on_a_mac.consistent


def test_nothing_to_compare_is_consistent() -> None:
    verdict = check_consistency()
    assert (verdict.consistent, verdict.reasons, verdict.checked) == (True, (), ())


@pytest.mark.parametrize(
    "text",
    [
        '[[stack]]\nja4 = "t13d_x_y"\nfamily = "nobody"\nname = "n"\nversion = "v"\ncaptured = "c"',
        '[families.a]\nuser_agents = []\n[[stack]]\nja4 = "bad"\nfamily = "a"\nname = "n"\n'
        'version = "v"\ncaptured = "c"',
        '[families.a]\nsystems = ["Plan 9"]',
    ],
)
def test_bad_tables_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"client_stacks\.toml"):
        load_client_stacks(text)


def test_shipped_table_loads() -> None:
    table = client_stacks()
    assert {s.family for s in table.stacks} >= {"chrome", "firefox", "curl", "python", "go", "node"}
    assert len({s.ja4 for s in table.stacks}) == len(table.stacks)
