"""The strict ClientHello parser: fields of built and real hellos, and every way it refuses.

The builders at the top are shared with the reassembly, JA4 and fuzz tests.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from sensor.fingerprint.tls import (
    MAX_HANDSHAKE_BYTES,
    ClientHello,
    ParseError,
    is_grease,
    parse_client_hello,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures/tls"

# ---- builders -------------------------------------------------------------


def u8_vector(body: bytes) -> bytes:
    return bytes([len(body)]) + body


def u16_vector(body: bytes) -> bytes:
    return struct.pack(">H", len(body)) + body


def u16s(values: Iterable[int]) -> bytes:
    return b"".join(struct.pack(">H", v) for v in values)


def sni_ext(name: str) -> tuple[int, bytes]:
    entry = b"\x00" + u16_vector(name.encode("ascii"))
    return 0x0000, u16_vector(entry)


def alpn_ext(*names: bytes) -> tuple[int, bytes]:
    return 0x0010, u16_vector(b"".join(u8_vector(n) for n in names))


def versions_ext(*versions: int) -> tuple[int, bytes]:
    return 0x002B, u8_vector(u16s(versions))


def sigalgs_ext(*algs: int) -> tuple[int, bytes]:
    return 0x000D, u16_vector(u16s(algs))


def groups_ext(*groups: int) -> tuple[int, bytes]:
    return 0x000A, u16_vector(u16s(groups))


def point_formats_ext(*formats: int) -> tuple[int, bytes]:
    return 0x000B, u8_vector(bytes(formats))


def build_client_hello(
    *,
    legacy_version: int = 0x0303,
    random: bytes = bytes(range(32)),
    session_id: bytes = b"",
    cipher_suites: Sequence[int] = (0x1301, 0x1302),
    compression_methods: bytes = b"\x00",
    extensions: Sequence[tuple[int, bytes]] | None = (),
) -> bytes:
    """A ClientHello handshake message (header included); extensions=None omits the block."""
    body = struct.pack(">H", legacy_version) + random + u8_vector(session_id)
    body += u16_vector(u16s(cipher_suites)) + u8_vector(compression_methods)
    if extensions is not None:
        block = b"".join(struct.pack(">HH", t, len(b)) + b for t, b in extensions)
        body += u16_vector(block)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def tls_records(handshake: bytes, record_size: int = 16384, record_version: int = 0x0301) -> bytes:
    """The handshake message as TLS handshake records of at most record_size bytes."""
    out = b""
    for start in range(0, len(handshake), record_size):
        chunk = handshake[start : start + record_size]
        out += struct.pack(">BHH", 0x16, record_version, len(chunk)) + chunk
    return out


CHROME_LIKE_EXTENSIONS = (
    (0x3A3A, b""),
    sni_ext("example.com"),
    (0x0017, b""),
    (0xFF01, b"\x00"),
    groups_ext(0x2A2A, 0x001D, 0x0017, 0x0018),
    point_formats_ext(0),
    (0x0023, b""),
    alpn_ext(b"h2", b"http/1.1"),
    (0x0005, b"\x01\x00\x00\x00\x00"),
    sigalgs_ext(0x0403, 0x0804, 0x0401),
    (0x0012, b""),
    (0x0033, u16_vector(u16s([0x2A2A, 1]) + b"\x00" + u16s([0x001D, 32]) + bytes(32))),
    (0x002D, b"\x01\x01"),
    versions_ext(0x5A5A, 0x0304, 0x0303),
    (0x1A1A, b"\x00"),
)


def chrome_like_hello(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "session_id": bytes(range(32)),
        "cipher_suites": (0x0A0A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F),
        "extensions": CHROME_LIKE_EXTENSIONS,
    }
    args.update(overrides)
    return build_client_hello(**args)  # type: ignore[arg-type]


def fixture_hellos() -> list[bytes]:
    """Every complete ClientHello in the fixture captures (fails loudly without them)."""
    from sensor.fingerprint.reassembly import HelloAssembler
    from sensor.replay import ReplaySource

    if not FIXTURES.is_dir():
        pytest.fail(f"TLS fixtures missing: {FIXTURES}")
    hellos: list[bytes] = []
    for capture in sorted(FIXTURES.glob("*.pcap*")):
        assembler = HelloAssembler()
        hellos.extend(h.handshake for h in assembler.process(ReplaySource(capture).events()))
    return hellos


# ---- fields ---------------------------------------------------------------


def test_every_field_of_a_built_hello() -> None:
    hello = parse_client_hello(chrome_like_hello())

    assert isinstance(hello, ClientHello)
    assert hello.legacy_version == 0x0303
    assert hello.random == bytes(range(32))
    assert hello.session_id == bytes(range(32))
    assert hello.cipher_suites == (0x0A0A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F)
    assert hello.compression_methods == b"\x00"
    assert hello.extension_types == (
        0x3A3A, 0x0000, 0x0017, 0xFF01, 0x000A, 0x000B, 0x0023, 0x0010,
        0x0005, 0x000D, 0x0012, 0x0033, 0x002D, 0x002B, 0x1A1A,
    )  # fmt: skip
    assert hello.extensions[3] == (0xFF01, b"\x00")
    assert hello.sni == "example.com"
    assert hello.alpn == (b"h2", b"http/1.1")
    assert hello.supported_versions == (0x5A5A, 0x0304, 0x0303)
    assert hello.signature_algorithms == (0x0403, 0x0804, 0x0401)
    assert hello.supported_groups == (0x2A2A, 0x001D, 0x0017, 0x0018)
    assert hello.ec_point_formats == (0,)
    assert hello.has_extension(0x0023)
    assert not hello.has_extension(0x0015)


def test_hello_without_extensions_block() -> None:
    hello = parse_client_hello(build_client_hello(extensions=None, cipher_suites=(0x002F,)))

    assert hello.extensions == ()
    assert hello.sni is None
    assert hello.alpn == ()
    assert hello.supported_versions == ()
    assert hello.cipher_suites == (0x002F,)


def test_empty_extensions_block_and_empty_lists_are_structurally_valid() -> None:
    hello = parse_client_hello(
        build_client_hello(cipher_suites=(), extensions=[alpn_ext(b""), (0x0010, b"\x00\x00")])
    )

    assert hello.cipher_suites == ()
    assert hello.alpn == (b"",)  # the first ALPN extension is the one decoded
    assert len(hello.extensions) == 2


def test_sni_takes_the_first_host_name_and_keeps_non_ascii_visible() -> None:
    entries = b"\x01" + u16_vector(b"other") + b"\x00" + u16_vector(b"h\xc3\xa9.test")
    hello = parse_client_hello(build_client_hello(extensions=[(0x0000, u16_vector(entries))]))

    assert hello.sni == "h\\xc3\\xa9.test"


def test_sni_extension_without_host_name_is_empty_not_none() -> None:
    hello = parse_client_hello(build_client_hello(extensions=[(0x0000, u16_vector(b""))]))

    assert hello.sni == ""


def test_accepts_bytearray_and_memoryview() -> None:
    raw = chrome_like_hello()

    assert parse_client_hello(bytearray(raw)) == parse_client_hello(raw)
    assert parse_client_hello(memoryview(raw)) == parse_client_hello(raw)


def test_real_hello_from_a_capture() -> None:
    # tls12.pcap: Firefox to contile.services.mozilla.com (Wireshark shows the same values).
    from sensor.fingerprint.reassembly import HelloAssembler
    from sensor.replay import ReplaySource

    (done,) = HelloAssembler().process(ReplaySource(FIXTURES / "tls12.pcap").events())
    hello = parse_client_hello(done.handshake)

    assert len(done.handshake) == 512
    assert hello.legacy_version == 0x0303
    assert hello.sni == "contile.services.mozilla.com"
    assert hello.alpn == (b"h2", b"http/1.1")
    assert hello.supported_versions == (0x0304, 0x0303)
    assert hello.supported_groups == (0x001D, 0x0017, 0x0018, 0x0019, 0x0100, 0x0101)
    assert hello.ec_point_formats == (0,)
    assert len(hello.cipher_suites) == 17
    assert len(hello.session_id) == 32


def test_grease_detection() -> None:
    greases = [(n << 12) | 0x0A00 | (n << 4) | 0x0A for n in range(16)]

    assert all(is_grease(g) for g in greases)
    assert greases[0] == 0x0A0A and greases[-1] == 0xFAFA
    assert not any(is_grease(v) for v in (0x0A1A, 0x1A0A, 0x0000, 0x1301, 0x0AAA, 0x0A0B))


# ---- refusals -------------------------------------------------------------


def _with_body_length_fixed(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


def _body(**kwargs: object) -> bytes:
    return build_client_hello(**kwargs)[4:]  # type: ignore[arg-type]


HEAD = struct.pack(">H", 0x0303) + bytes(32)  # version + random


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "shorter than a handshake header"),
        (b"\x01\x00\x00", "shorter than a handshake header"),
        (b"\x02" + build_client_hello()[1:], "not ClientHello"),
        (build_client_hello() + b"\x00", "handshake length"),
        (build_client_hello()[:-1], "handshake length"),
        (_with_body_length_fixed(HEAD), "too short"),
        (_with_body_length_fixed(HEAD + b"\x21" + bytes(33) + b"\x00\x00\x01\x00"), "exceeds 32"),
        (_with_body_length_fixed(HEAD + b"\x05\x00"), "session_id: length 5 runs past"),
        (_with_body_length_fixed(HEAD + b"\x00\x00"), "cipher_suites: length field truncated"),
        (_with_body_length_fixed(HEAD + b"\x00\x00\x03\x13\x01\x13\x01\x00"), "odd length 3"),
        (_with_body_length_fixed(HEAD + b"\x00\x00\x02\x13\x01"), "compression_methods"),
        (_with_body_length_fixed(_body(extensions=None) + b"\x00"), "extensions: length field"),
        (_with_body_length_fixed(_body(extensions=None) + b"\x00\x05\x00"), "runs past"),
        (_with_body_length_fixed(_body(extensions=None) + b"\x00\x02\x00\x17"), "header truncated"),
        (
            _with_body_length_fixed(_body(extensions=None) + b"\x00\x04\x00\x17\x00\x01"),
            "extension 0x0017: length 1 runs past",
        ),
        (build_client_hello(extensions=[(0x0000, b"\x00\x05\x00")]), "server_name"),
        (build_client_hello(extensions=[(0x0000, b"\x00\x03\x00\x00\x05")]), "server_name entry"),
        (build_client_hello(extensions=[(0x0010, b"\x00\x03\x05h2")]), "alpn protocol"),
        (build_client_hello(extensions=[(0x0010, b"\x00\x02\x01h\x00")]), "alpn: 1 bytes after"),
        (build_client_hello(extensions=[(0x002B, b"\x03\x03\x04\x03")]), "supported_versions"),
        (build_client_hello(extensions=[(0x000D, b"\x00\x01\x04")]), "signature_algorithms"),
        (build_client_hello(extensions=[(0x000A, b"")]), "supported_groups"),
        (build_client_hello(extensions=[(0x000B, b"\x02\x00")]), "ec_point_formats"),
    ],
)
def test_refuses_malformed_hellos(raw: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_client_hello(raw)


def test_trailing_bytes_after_extensions_are_refused() -> None:
    body = _body(extensions=[(0x0017, b"")])
    # Grow the handshake length to take in two stray bytes after the block.
    with pytest.raises(ParseError, match="2 bytes after the extensions"):
        parse_client_hello(_with_body_length_fixed(body + b"\x00\x00"))


def test_refuses_oversized_input_before_reading_it() -> None:
    with pytest.raises(ParseError, match="exceeds"):
        parse_client_hello(b"\x01" + bytes(MAX_HANDSHAKE_BYTES))


def test_parse_error_is_a_value_error() -> None:
    assert issubclass(ParseError, ValueError)
