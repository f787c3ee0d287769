"""JA4 TLS client fingerprints (FoxIO's JA4 specification, BSD-3-Clause).

    ja4   = a_b_c: t13d1516h2_8daaf6152771_e5627efa2ab1
    ja4_r = the same with b and c unhashed (sorted lists), for inspection

a: protocol (t/q/d), TLS version, SNI (d domain / i none), cipher count,
   extension count, first and last character of the first ALPN value;
b: sha256 of the sorted cipher list, first 12 hex digits;
c: sha256 of the sorted extension list without SNI and ALPN, then "_" and the
   signature algorithms in wire order, first 12 hex digits.
GREASE values (RFC 8701) are left out everywhere.
"""

from __future__ import annotations

import struct
from hashlib import sha256
from typing import NamedTuple

from sensor.fingerprint.tls import EXT_ALPN, EXT_SERVER_NAME, GREASE_VALUES, ClientHello

EMPTY_HASH = "000000000000"  # the spec's marker for an empty list, instead of sha256("")

_VERSION_CODES = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}
TRANSPORTS = ("t", "q", "d")  # TLS over TCP, QUIC, DTLS

_ALNUM = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class _Parts(NamedTuple):
    a: str
    ciphers: str  # sorted hex, comma-joined
    extensions: str  # sorted hex without SNI and ALPN, comma-joined
    signature_algorithms: str  # wire order, comma-joined

    @property
    def c_raw(self) -> str:
        # Without signature algorithms the string ends at the extension list, no "_".
        if self.signature_algorithms:
            return f"{self.extensions}_{self.signature_algorithms}"
        return self.extensions


def ja4(hello: ClientHello, transport: str = "t") -> str:
    parts = _parts(hello, transport)
    ciphers_hash = _hash12(parts.ciphers) if parts.ciphers else EMPTY_HASH
    extensions_hash = _hash12(parts.c_raw) if parts.extensions else EMPTY_HASH
    return f"{parts.a}_{ciphers_hash}_{extensions_hash}"


def ja4_r(hello: ClientHello, transport: str = "t") -> str:
    """JA4 with b and c unhashed."""
    parts = _parts(hello, transport)
    return f"{parts.a}_{parts.ciphers}_{parts.c_raw}"


def _parts(hello: ClientHello, transport: str) -> _Parts:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    ciphers = [c for c in hello.cipher_suites if c not in GREASE_VALUES]
    ext_types = [t for t, _ in hello.extensions if t not in GREASE_VALUES]
    a = (
        f"{transport}{_version(hello)}"
        f"{'d' if EXT_SERVER_NAME in ext_types else 'i'}"
        f"{min(len(ciphers), 99):02d}{min(len(ext_types), 99):02d}{_alpn_code(hello)}"
    )
    # SNI and ALPN are already in a; leaving them out keeps c the same for one
    # client whether it connects to a name or an address, with any ALPN.
    hashed_exts = [t for t in ext_types if t != EXT_SERVER_NAME and t != EXT_ALPN]
    sig_algs = [s for s in hello.signature_algorithms if s not in GREASE_VALUES]
    return _Parts(
        a=a,
        ciphers=_hex_list(sorted(ciphers)),
        extensions=_hex_list(sorted(hashed_exts)),
        signature_algorithms=_hex_list(sig_algs),
    )


def _hex_list(values: list[int]) -> str:
    """16-bit values as comma-separated 4-digit lower-case hex: "002f,0035"."""
    # bytes.hex with a separator does the whole list in one C call.
    return struct.pack(f">{len(values)}H", *values).hex(",", 2)


def _version(hello: ClientHello) -> str:
    offered = [v for v in hello.supported_versions if v not in GREASE_VALUES]
    version = max(offered) if offered else hello.legacy_version
    return _VERSION_CODES.get(version, "00")


def _alpn_code(hello: ClientHello) -> str:
    if not hello.alpn or not hello.alpn[0]:
        return "00"
    first = hello.alpn[0]
    if first[0] in _ALNUM and first[-1] in _ALNUM:
        return chr(first[0]) + chr(first[-1])
    # Not printable as is: first and last characters of the value's hex form.
    hex_form = first.hex()
    return hex_form[0] + hex_form[-1]


def _hash12(text: str) -> str:
    return sha256(text.encode("ascii")).hexdigest()[:12]
