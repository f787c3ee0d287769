"""HTTP request-head fingerprints: parsing, truncation, garbage, and User-Agents."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sensor.events import Flow, HttpRequestHead
from sensor.fingerprint.http import (
    HttpFingerprint,
    HttpParseError,
    UserAgentInfo,
    http_fingerprint,
    parse_request_head,
    parse_user_agent,
)

CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
BROWSER_HEAD = (
    "GET /api/v1/items?page=2 HTTP/1.1\r\n"
    "Host: api.example.test\r\n"
    "Connection: keep-alive\r\n"
    f"User-Agent: {CHROME_WINDOWS}\r\n"
    "Accept: application/json\r\n"
    "Referer: https://www.example.test/\r\n"
    "Accept-Encoding: gzip, deflate, br\r\n"
    "Accept-Language: en-GB,en;q=0.9\r\n"
    "Cookie: session=abc\r\n"
    "\r\n"
).encode()


def test_browser_head_every_field() -> None:
    fp = parse_request_head(BROWSER_HEAD)
    assert fp == HttpFingerprint(
        method="GET",
        path="/api/v1/items?page=2",
        version="1.1",
        header_names=(
            "host",
            "connection",
            "user-agent",
            "accept",
            "referer",
            "accept-encoding",
            "accept-language",
            "cookie",
        ),
        has_cookie=True,
        has_referer=True,
        has_accept_language=True,
        user_agent=CHROME_WINDOWS,
        host="api.example.test",
        x_forwarded_for=None,
        x_forwarded_port=None,
        ua=UserAgentInfo(
            browser="Chrome", browser_major="124", os="Windows", os_major="10", device="Other"
        ),
        truncated=False,
    )
    # Referer and cookie say what this request is, not who composed it: left out.
    assert fp.fingerprint == "1.1|host,connection,user-agent,accept,accept-encoding,accept-language"
    assert fp.hash == hashlib.sha256(fp.fingerprint.encode()).hexdigest()[:12]
    assert fp.hash == "6513b352cfb5"  # sha256sum of the string above


def test_script_head_through_a_proxy() -> None:
    head = (
        b"POST /login HTTP/1.0\r\n"
        b"X-Forwarded-For: 198.51.100.7, 10.0.0.1\r\n"
        b"X-Forwarded-Port: 443\r\n"
        b"Host: api.example.test\r\n"
        b"User-Agent: python-requests/2.31.0\r\n"
        b"Accept-Encoding: gzip, deflate\r\n"
        b"Accept: */*\r\n"
        b"Content-Length: 2\r\n"
        b"\r\n{}"
    )
    fp = parse_request_head(head)
    assert (fp.method, fp.path, fp.version) == ("POST", "/login", "1.0")
    assert fp.x_forwarded_for == "198.51.100.7, 10.0.0.1"
    assert fp.x_forwarded_port == "443"
    assert (fp.has_cookie, fp.has_referer, fp.has_accept_language) == (False, False, False)
    assert fp.ua == UserAgentInfo("Python Requests", "2", "Other", None, "Other")
    # The proxy's headers and the body's length are not the client's stack.
    assert fp.fingerprint == "1.0|host,user-agent,accept-encoding,accept"
    assert not fp.truncated


def test_head_cut_inside_a_header_name_keeps_the_complete_ones() -> None:
    fp = parse_request_head(b"GET / HTTP/1.1\r\nHost: a.test\r\nUser-Ag")
    assert fp.header_names == ("host",)
    assert fp.user_agent is None and fp.ua is None
    assert fp.truncated
    assert fp.fingerprint == "1.1|host"


def test_head_cut_inside_a_value_keeps_the_name_and_the_start() -> None:
    fp = parse_request_head(b"GET / HTTP/1.1\r\nHost: a.test\r\nUser-Agent: curl/8.")
    assert fp.header_names == ("host", "user-agent")
    assert fp.user_agent == "curl/8."
    assert fp.ua is not None and fp.ua.browser == "curl"
    assert fp.truncated


def test_head_cut_inside_the_request_line() -> None:
    fp = parse_request_head(b"GET /a/very/long/pa")
    assert (fp.method, fp.path, fp.version, fp.header_names) == ("GET", "/a/very/long/pa", None, ())
    assert fp.truncated
    assert fp.fingerprint == "-|"
    cut_in_version = parse_request_head(b"GET /a HTTP/1.")
    assert (cut_in_version.path, cut_in_version.version) == ("/a", None)


def test_bare_lf_folding_and_repeats() -> None:
    head = (
        b"GET /x HTTP/1.1\n"
        b"Host: first.test\n"
        b"X-Long: part one\n"
        b"\tpart two\n"
        b"not a header line\n"
        b"HOST: second.test\n"
        b"\n"
    )
    fp = parse_request_head(head)
    assert fp.header_names == ("host", "x-long", "host")
    assert fp.host == "first.test"
    assert not fp.truncated


def test_request_head_event() -> None:
    flow = Flow(ipaddress.ip_address("10.0.0.1"), 50000, ipaddress.ip_address("10.0.0.2"), 80)
    event = HttpRequestHead(ts_ns=1, flow=flow, seq=7, payload_len=2000, data=BROWSER_HEAD)
    assert http_fingerprint(event) == parse_request_head(BROWSER_HEAD)


def test_oversized_values_are_cut() -> None:
    fp = parse_request_head(b"GET / HTTP/1.1\r\nCookie: " + b"a" * 5000 + b"\r\n\r\n")
    assert fp.has_cookie
    assert fp.header_names == ("cookie",)
    assert fp.truncated is False


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"hello world\r\n",
        b"get / HTTP/1.1\r\n",
        b"GET / FTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\xff\xfe GET / HTTP/1.1\r\n",
    ],
)
def test_garbage_raises_http_parse_error(data: bytes) -> None:
    with pytest.raises(HttpParseError):
        parse_request_head(data)


@given(st.binary(max_size=2048))
def test_any_bytes_give_a_result_or_http_parse_error(data: bytes) -> None:
    try:
        fp = parse_request_head(data, ua_parse=False)
    except HttpParseError:
        return
    assert fp.method.isupper()


@given(st.integers(min_value=0, max_value=len(BROWSER_HEAD)))
def test_every_cut_of_a_real_head_parses(cut: int) -> None:
    data = BROWSER_HEAD[:cut]
    if cut < 4:  # "GET" alone is a valid cut; shorter is not a method yet
        return
    fp = parse_request_head(data, ua_parse=False)
    assert fp.method == "GET"
    full = parse_request_head(BROWSER_HEAD, ua_parse=False).header_names
    assert full[: len(fp.header_names)] == fp.header_names


@pytest.mark.parametrize(
    ("ua", "expected"),
    [
        (CHROME_WINDOWS, UserAgentInfo("Chrome", "124", "Windows", "10", "Other")),
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
            UserAgentInfo("Mobile Safari", "17", "iOS", "17", "iPhone"),
        ),
        (
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
            UserAgentInfo("Firefox", "128", "Linux", None, "Other"),
        ),
        ("curl/7.88.1", UserAgentInfo("curl", "7", "Other", None, "Other")),
        ("", UserAgentInfo("Other", None, "Other", None, "Other")),
    ],
)
def test_user_agent_parsing(ua: str, expected: UserAgentInfo) -> None:
    assert parse_user_agent(ua) == expected


def test_a_clients_gets_and_posts_share_one_fingerprint() -> None:
    get = parse_request_head(
        b"GET /cart HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\nCookie: s=1\r\n\r\n"
    )
    post = parse_request_head(
        b"POST /cart HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\nContent-Type: a/b\r\n"
        b"Content-Length: 2\r\nReferer: /p\r\n\r\n{}"
    )
    assert get.fingerprint == post.fingerprint == "1.1|host,user-agent"


def test_a_header_block_seen_before_parses_as_it_did_the_first_time() -> None:
    # Header blocks are parsed once per distinct text (a cache); a head cut
    # anywhere, and a head that differs only in its request line, must read
    # exactly as a fresh parse does.
    import sensor.fingerprint.http as http

    for cut in range(4, len(BROWSER_HEAD) + 1):
        data = BROWSER_HEAD[:cut]
        try:
            cached = parse_request_head(data)
        except HttpParseError:
            continue
        http._header_block.cache_clear()
        assert parse_request_head(data) == cached, cut
    other = parse_request_head(BROWSER_HEAD.replace(b"/api/v1/items?page=2", b"/cart", 1))
    first = parse_request_head(BROWSER_HEAD)
    assert (other.path, first.path) == ("/cart", "/api/v1/items?page=2")
    assert (other.user_agent, other.header_names) == (first.user_agent, first.header_names)
