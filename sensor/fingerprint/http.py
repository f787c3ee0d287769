"""botwall's own fingerprint of a plaintext HTTP/1.x request head.

The format is documented in docs/fingerprints.md; it is not JA4H (whose
licence is non-permissive). The fingerprint is how a client composes a
request, not what it asks for:

    {version}|{header names, lowercased, in wire order, comma-joined}
    1.1|host,user-agent,accept

Left out: the method and the headers that depend on the request rather than
on the client (a body's content-type and content-length, cookie, referer,
conditional and auth headers) and those a proxy adds (x-forwarded-*). With
them, one client's GETs and POSTs would be two fingerprints, and the POST one
would look like a flood of writes.

and its hash is the first 12 hex digits of the SHA-256 of that string.

The sensor captures only the first HTTP_HEAD_MAX_BYTES of a segment, so a
head may be cut anywhere: parsing keeps every header whose name was complete
and marks the result truncated. Input that is not an HTTP request raises
HttpParseError; nothing else is raised.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, fields
from typing import NamedTuple

import ua_parser

from sensor.events import HttpRequestHead

MAX_HEAD_BYTES = 16384
MAX_HEADERS = 128
MAX_FIELD_CHARS = 1024  # longer values (huge cookies) are cut: only their start is kept
HEADER_BLOCKS_CACHED = 1024

_METHOD = re.compile(r"[A-Z][A-Z-]{1,19}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(r"HTTP/(\d\.\d)")
# What is left of "HTTP/1.1" when the capture cuts the request line inside it.
_CUT_VERSION = re.compile(r"(H(T(T(P(/(\d(\.\d?)?)?)?)?)?)?)?")


# Headers that say what this request is, not who composes requests.
PER_REQUEST_HEADERS = frozenset(
    {
        "content-length", "content-type", "transfer-encoding", "expect",
        "cookie", "referer", "origin", "authorization", "range",
        "if-none-match", "if-modified-since", "if-match", "if-unmodified-since",
        "x-forwarded-for", "x-forwarded-port", "x-forwarded-proto", "x-real-ip", "forwarded",
    }
)  # fmt: skip


class HttpParseError(ValueError):
    """The bytes are not the start of an HTTP/1.x request."""


@dataclass(frozen=True, slots=True)
class UserAgentInfo:
    """A User-Agent as ua-parser reads it; "Other" where it recognises nothing."""

    browser: str
    browser_major: str | None
    os: str
    os_major: str | None
    device: str


@dataclass(frozen=True, slots=True)
class HttpFingerprint:
    method: str
    path: str
    version: str | None  # "1.1", "1.0"; None when the request line was cut
    header_names: tuple[str, ...]  # lowercased, in wire order, repeats kept
    has_cookie: bool
    has_referer: bool
    has_accept_language: bool
    user_agent: str | None
    host: str | None
    x_forwarded_for: str | None
    x_forwarded_port: str | None
    ua: UserAgentInfo | None  # None without a User-Agent header
    truncated: bool  # the head ended before its blank line

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.version, self.header_names)

    @property
    def hash(self) -> str:
        return fingerprint_hash(self.version, self.header_names)


class HeaderBlock(NamedTuple):
    """What the header lines of a request head say: HttpFingerprint's fields
    after the request line's, in its order (checked below)."""

    header_names: tuple[str, ...]
    has_cookie: bool
    has_referer: bool
    has_accept_language: bool
    user_agent: str | None
    host: str | None
    x_forwarded_for: str | None
    x_forwarded_port: str | None
    ua: UserAgentInfo | None
    truncated: bool


if HeaderBlock._fields != tuple(f.name for f in fields(HttpFingerprint))[3:]:
    raise ImportError("HeaderBlock's fields must be HttpFingerprint's after the request line's")


# A host sees few distinct fingerprints, request after request.
@functools.lru_cache(maxsize=4096)
def _fingerprint(version: str | None, header_names: tuple[str, ...]) -> str:
    names = (n for n in header_names if n not in PER_REQUEST_HEADERS)
    return f"{version or '-'}|{','.join(names)}"


@functools.lru_cache(maxsize=4096)
def fingerprint_hash(version: str | None, header_names: tuple[str, ...]) -> str:
    """HttpFingerprint.hash, from the two things it depends on."""
    return hashlib.sha256(_fingerprint(version, header_names).encode()).hexdigest()[:12]


@functools.cache
def load_user_agent_rules() -> None:
    """ua-parser compiles its rules at its first parse, about 0.4 s: whoever
    will parse User-Agents calls this at start, so that the first client's
    request does not wait for it."""
    ua_parser.parse("")


def parse_user_agent(ua: str) -> UserAgentInfo:
    result = ua_parser.parse(ua[:MAX_FIELD_CHARS])
    agent, system, device = result.user_agent, result.os, result.device
    return UserAgentInfo(
        browser=agent.family if agent else "Other",
        browser_major=agent.major if agent else None,
        os=system.family if system else "Other",
        os_major=system.major if system else None,
        device=device.family if device else "Other",
    )


def http_fingerprint(head: HttpRequestHead) -> HttpFingerprint:
    return parse_request_head(head.data)


def _request_line(line: str, cut: bool) -> tuple[str, str, str | None]:
    parts = line.split(" ")
    method = parts[0]
    if not _METHOD.fullmatch(method):
        raise HttpParseError(f"not an HTTP method: {method[:20]!r}")
    if len(parts) == 1:
        return method, "", None
    if len(parts) == 2:  # the line was cut inside the target, or HTTP/0.9
        return method, parts[1][:MAX_FIELD_CHARS], None
    target = " ".join(parts[1:-1])[:MAX_FIELD_CHARS]
    version = _VERSION.fullmatch(parts[-1])
    if version is not None:
        return method, target, version.group(1)
    if cut and _CUT_VERSION.fullmatch(parts[-1]):
        return method, target, None
    raise HttpParseError(f"not an HTTP/1.x request line: {line[:60]!r}")


def parse_request_head(data: bytes, ua_parse: bool = True) -> HttpFingerprint:
    """Fingerprint the request head at the start of data (a possibly cut segment)."""
    method, path, version, headers = split_request_head(data, ua_parse)
    # HttpFingerprint's first three fields are the request line's.
    return HttpFingerprint(method, path, version, *headers)


def split_request_head(
    data: bytes, ua_parse: bool = True
) -> tuple[str, str, str | None, HeaderBlock]:
    """The request line's method, target and version, and what the header
    lines say: parse_request_head's fields without building the object, for
    a caller that handles every request (the observer)."""
    # latin-1 maps every byte to a character, so decoding cannot fail and
    # offsets stay byte offsets.
    text = data[:MAX_HEAD_BYTES].decode("latin-1")
    request_line, newline, rest = text.partition("\n")
    if not newline:  # the capture cut the request line
        method, path, version = _request_line(request_line.rstrip("\r"), cut=True)
        return method, path, version, _header_facts([], True, ua_parse)
    method, path, version = _request_line(request_line.rstrip("\r"), cut=False)
    return method, path, version, _header_block(rest, ua_parse)


# A client sends the same headers request after request (a keep-alive
# connection's differ in nothing but the request line), so the header block
# is parsed once per distinct text. Entries are at most MAX_HEAD_BYTES.
@functools.lru_cache(maxsize=HEADER_BLOCKS_CACHED)
def _header_block(rest: str, ua_parse: bool) -> HeaderBlock:
    """The header lines after the request line: the last piece has no newline
    after it, so the capture cut it, unless the head ended before it."""
    *complete, tail = rest.split("\n")
    headers: list[tuple[str, str]] = []
    ended = False
    for raw in complete:
        line = raw.rstrip("\r")
        if line == "":
            ended = True
            break
        if line[0] in " \t" and headers:  # obsolete line folding continues a value
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}"[:MAX_FIELD_CHARS])
            continue
        _add_header(headers, line)
        if len(headers) >= MAX_HEADERS:
            break
    if not ended and len(headers) < MAX_HEADERS:
        # A cut last line still names a header if its colon arrived.
        _add_header(headers, tail.rstrip("\r"))
    return _header_facts(headers, not ended, ua_parse)


def _add_header(headers: list[tuple[str, str]], line: str) -> None:
    name, colon, value = line.partition(":")
    if not colon or not _TOKEN.fullmatch(name):
        return  # not a header line; a tolerant parser skips it
    headers.append((name.lower(), value.strip()[:MAX_FIELD_CHARS]))


def _header_facts(
    headers: list[tuple[str, str]], truncated: bool, ua_parse: bool
) -> HeaderBlock:
    first: dict[str, str] = {}
    for name, value in headers:
        first.setdefault(name, value)
    user_agent = first.get("user-agent")
    return HeaderBlock(
        header_names=tuple(name for name, _ in headers),
        has_cookie="cookie" in first,
        has_referer="referer" in first,
        has_accept_language="accept-language" in first,
        user_agent=user_agent,
        host=first.get("host"),
        x_forwarded_for=first.get("x-forwarded-for"),
        x_forwarded_port=first.get("x-forwarded-port"),
        ua=parse_user_agent(user_agent) if ua_parse and user_agent is not None else None,
        truncated=truncated,
    )
