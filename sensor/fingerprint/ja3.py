"""JA3 TLS client fingerprints (Salesforce's JA3, BSD-3-Clause).

    SSLVersion,Ciphers,Extensions,EllipticCurves,EllipticCurvePointFormats

Decimal values, each list joined with "-", in wire order, GREASE values
(RFC 8701) left out of ciphers, extensions and curves; ja3_hash is the MD5 of
that string. Wire order makes JA3 unstable for clients that shuffle their
extensions (Chrome since 110): prefer JA4 for grouping.
"""

from __future__ import annotations

from hashlib import md5

from sensor.fingerprint.tls import GREASE_VALUES, ClientHello


def ja3_string(hello: ClientHello) -> str:
    ciphers = "-".join([str(c) for c in hello.cipher_suites if c not in GREASE_VALUES])
    extensions = "-".join([str(t) for t, _ in hello.extensions if t not in GREASE_VALUES])
    groups = "-".join([str(g) for g in hello.supported_groups if g not in GREASE_VALUES])
    point_formats = "-".join(map(str, hello.ec_point_formats))
    return f"{hello.legacy_version},{ciphers},{extensions},{groups},{point_formats}"


def ja3(hello: ClientHello) -> str:
    """The JA3 hash: MD5 of ja3_string, lower-case hex."""
    return md5(ja3_string(hello).encode("ascii"), usedforsecurity=False).hexdigest()
