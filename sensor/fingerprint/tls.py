"""A strict, bounded parser for TLS ClientHello handshake messages (RFC 8446 §4.1.2).

Strict means every length field must fit its container exactly: a vector that
runs past its parent, bytes left over after the last field, or an odd-length
list of 16-bit values is a ParseError. RFC minimums that carry no structure
(at least one cipher suite, non-empty ALPN names) are not enforced, so JA4's
documented rules for empty lists stay reachable. Bounded means the input is
capped at MAX_HANDSHAKE_BYTES and the parser makes one pass over it.

On any byte string, parse_client_hello returns a ClientHello or raises
ParseError; it raises nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from sensor import abi

HANDSHAKE_CLIENT_HELLO = 1
HANDSHAKE_HEADER_LEN = 4
# The largest ClientHello we accept. Real ones are a few KiB even with
# post-quantum key shares; a hostile one could claim up to 16 MiB.
MAX_HANDSHAKE_BYTES = 65536

EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_GROUPS = 0x000A
EXT_EC_POINT_FORMATS = 0x000B
EXT_SIGNATURE_ALGORITHMS = 0x000D
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B

SNI_HOST_NAME = 0


class ParseError(ValueError):
    """The bytes are not a well-formed ClientHello; the message says where."""


# RFC 8701 GREASE values: 0x0a0a, 0x1a1a, ... 0xfafa (both bytes equal, low nibble a).
# A set, because fingerprints test every cipher and extension against it.
GREASE_VALUES = frozenset((n << 12) | 0x0A00 | (n << 4) | 0x0A for n in range(16))


def is_grease(value: int) -> bool:
    return value in GREASE_VALUES


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A ClientHello as sent, with the extensions fingerprints need already decoded.

    Lists keep wire order and GREASE values; fingerprint functions drop GREASE
    themselves, because JA3 and JA4 differ in where they do.
    """

    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    compression_methods: bytes
    extensions: tuple[tuple[int, bytes], ...]  # (type, body) in wire order
    sni: str | None  # first host_name in server_name; None without the extension
    alpn: tuple[bytes, ...]  # protocol names in the client's order
    supported_versions: tuple[int, ...]
    signature_algorithms: tuple[int, ...]
    supported_groups: tuple[int, ...]
    ec_point_formats: tuple[int, ...]

    @property
    def extension_types(self) -> tuple[int, ...]:
        return tuple(ext_type for ext_type, _ in self.extensions)

    def has_extension(self, ext_type: int) -> bool:
        return any(t == ext_type for t, _ in self.extensions)


def hello_key(hello: ClientHello, handshake_len: int) -> int:
    """The kernel's key for this hello's client stack (bpf/common.h, computed
    again by botwall_hello in bpf/xdp_sensor.c). handshake_len: the hello's
    handshake message, its 4-byte header included, as parse_client_hello got it."""
    mask = 0xFFFF_FFFF_FFFF_FFFF

    def fnv(key: int, data: bytes) -> int:
        for byte in data:
            key = ((key ^ byte) * abi.HELLO_KEY_FNV_PRIME) & mask
        return key

    key = abi.HELLO_KEY_FNV_OFFSET
    for suite in hello.cipher_suites[: abi.HELLO_KEY_MAX_CIPHERS]:
        if not is_grease(suite):
            key = fnv(key, suite.to_bytes(2, "big"))
    if 5 + handshake_len <= abi.HELLO_KEY_EXT_BUDGET:  # with its record header
        ext_sum = 0
        for ext_type in hello.extension_types[: abi.HELLO_KEY_MAX_EXTENSIONS]:
            if not is_grease(ext_type):
                ext_sum = (ext_sum + (ext_type + 1) * abi.HELLO_KEY_EXT_MIX) & mask
        key = fnv(key, ext_sum.to_bytes(8, "little"))
    return key or 1


def parse_client_hello(handshake: bytes | bytearray | memoryview) -> ClientHello:
    """Parse one complete ClientHello handshake message (4-byte header included)."""
    data = bytes(handshake)
    if len(data) > MAX_HANDSHAKE_BYTES:
        raise ParseError(f"handshake of {len(data)} bytes exceeds {MAX_HANDSHAKE_BYTES}")
    if len(data) < HANDSHAKE_HEADER_LEN:
        raise ParseError("shorter than a handshake header")
    if data[0] != HANDSHAKE_CLIENT_HELLO:
        raise ParseError(f"handshake type {data[0]} is not ClientHello")
    body_len = int.from_bytes(data[1:4], "big")
    if body_len != len(data) - HANDSHAKE_HEADER_LEN:
        raise ParseError(
            f"handshake length {body_len} != {len(data) - HANDSHAKE_HEADER_LEN} bytes present"
        )

    pos = HANDSHAKE_HEADER_LEN
    end = len(data)
    if end - pos < 2 + 32 + 1:
        raise ParseError("too short for version, random and session_id")
    legacy_version = (data[pos] << 8) | data[pos + 1]
    random = data[pos + 2 : pos + 34]
    pos += 34

    session_id, pos = _vector(data, pos, end, 1, "session_id")
    if len(session_id) > 32:
        raise ParseError(f"session_id of {len(session_id)} bytes exceeds 32")

    suites_raw, pos = _vector(data, pos, end, 2, "cipher_suites")
    cipher_suites = _u16_list(suites_raw, "cipher_suites")

    compression_methods, pos = _vector(data, pos, end, 1, "compression_methods")

    extensions: tuple[tuple[int, bytes], ...] = ()
    if pos < end:
        ext_block, pos = _vector(data, pos, end, 2, "extensions")
        if pos != end:
            raise ParseError(f"{end - pos} bytes after the extensions")
        extensions = _extensions(ext_block)

    decoded = _decode_extensions(extensions)
    return ClientHello(
        legacy_version=legacy_version,
        random=random,
        session_id=session_id,
        cipher_suites=cipher_suites,
        compression_methods=compression_methods,
        extensions=extensions,
        sni=decoded.sni,
        alpn=decoded.alpn,
        supported_versions=decoded.supported_versions,
        signature_algorithms=decoded.signature_algorithms,
        supported_groups=decoded.supported_groups,
        ec_point_formats=decoded.ec_point_formats,
    )


def _vector(data: bytes, pos: int, end: int, len_bytes: int, what: str) -> tuple[bytes, int]:
    """A length-prefixed vector at pos, and the position after it."""
    if end - pos < len_bytes:
        raise ParseError(f"{what}: length field truncated")
    length = data[pos] if len_bytes == 1 else (data[pos] << 8) | data[pos + 1]
    pos += len_bytes
    if length > end - pos:
        raise ParseError(f"{what}: length {length} runs past the end ({end - pos} left)")
    return data[pos : pos + length], pos + length


def _u16_list(raw: bytes, what: str) -> tuple[int, ...]:
    if len(raw) % 2:
        raise ParseError(f"{what}: odd length {len(raw)} for a list of 16-bit values")
    return struct.unpack(f">{len(raw) // 2}H", raw)


_EXTENSION_HEADER = struct.Struct(">HH")


def _extensions(block: bytes) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    end = len(block)
    while pos < end:
        if end - pos < 4:
            raise ParseError("extension header truncated")
        ext_type, length = _EXTENSION_HEADER.unpack_from(block, pos)
        pos += 4
        if length > end - pos:
            raise ParseError(f"extension {ext_type:#06x}: length {length} runs past the block")
        out.append((ext_type, block[pos : pos + length]))
        pos += length
    return tuple(out)


def _whole_vector(body: bytes, len_bytes: int, what: str) -> bytes:
    """An extension body that is exactly one length-prefixed vector."""
    inner, pos = _vector(body, 0, len(body), len_bytes, what)
    if pos != len(body):
        raise ParseError(f"{what}: {len(body) - pos} bytes after the list")
    return inner


class _DecodedExtensions(NamedTuple):
    sni: str | None
    alpn: tuple[bytes, ...]
    supported_versions: tuple[int, ...]
    signature_algorithms: tuple[int, ...]
    supported_groups: tuple[int, ...]
    ec_point_formats: tuple[int, ...]


_DECODED_TYPES = frozenset(
    {
        EXT_SERVER_NAME,
        EXT_ALPN,
        EXT_SUPPORTED_VERSIONS,
        EXT_SIGNATURE_ALGORITHMS,
        EXT_SUPPORTED_GROUPS,
        EXT_EC_POINT_FORMATS,
    }
)


def _decode_extensions(extensions: tuple[tuple[int, bytes], ...]) -> _DecodedExtensions:
    # Duplicate extensions are kept in `extensions` as sent (servers reject
    # them, but a client that sends them is worth fingerprinting); the decoded
    # fields come from the first occurrence.
    first: dict[int, bytes] = {}
    for ext_type, body in extensions:
        if ext_type in _DECODED_TYPES and ext_type not in first:
            first[ext_type] = body

    sni_body = first.get(EXT_SERVER_NAME)
    alpn_body = first.get(EXT_ALPN)
    formats_body = first.get(EXT_EC_POINT_FORMATS)
    point_formats = (
        () if formats_body is None else tuple(_whole_vector(formats_body, 1, "ec_point_formats"))
    )
    return _DecodedExtensions(
        sni=None if sni_body is None else _server_name(sni_body),
        alpn=() if alpn_body is None else _alpn(alpn_body),
        supported_versions=_u16_list_in(first, EXT_SUPPORTED_VERSIONS, 1, "supported_versions"),
        signature_algorithms=_u16_list_in(
            first, EXT_SIGNATURE_ALGORITHMS, 2, "signature_algorithms"
        ),
        supported_groups=_u16_list_in(first, EXT_SUPPORTED_GROUPS, 2, "supported_groups"),
        ec_point_formats=point_formats,
    )


def _u16_list_in(
    first: dict[int, bytes], ext_type: int, len_bytes: int, what: str
) -> tuple[int, ...]:
    """The list of 16-bit values an extension holds, () if it is absent."""
    body = first.get(ext_type)
    return () if body is None else _u16_list(_whole_vector(body, len_bytes, what), what)


def _server_name(body: bytes) -> str:
    names = _whole_vector(body, 2, "server_name")
    pos = 0
    first_host: str | None = None
    while pos < len(names):
        name_type = names[pos]
        name, pos = _vector(names, pos + 1, len(names), 2, "server_name entry")
        if name_type == SNI_HOST_NAME and first_host is None:
            # Host names are ASCII (RFC 6066); anything else is kept visible, not dropped.
            first_host = name.decode("ascii", "backslashreplace")
    # An extension present with no host_name entry still says "a name was sent".
    return first_host if first_host is not None else ""


def _alpn(body: bytes) -> tuple[bytes, ...]:
    names = _whole_vector(body, 2, "alpn")
    out: list[bytes] = []
    pos = 0
    while pos < len(names):
        name, pos = _vector(names, pos, len(names), 1, "alpn protocol")
        out.append(name)
    return tuple(out)
