"""botwall's own TCP SYN signature and an operating-system guess from it.

The format is documented in docs/fingerprints.md. It is not JA4T (whose
licence is non-permissive) nor p0f's; it borrows only public facts about how
each kernel builds its SYN. The signature table lives in os_signatures.toml.

Compact form, colon-separated:

    ip_version:initial_ttl:mss:window:wscale:options:flags
    4:64:1460:mss*44:7:M,S,T,N,W:df

window is "mss*N" when it is an exact multiple of the MSS, else the number;
a missing MSS, window scale or option list is "-"; flags are "df" and the
quirk names, joined with "+", or "-" when there are none.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from importlib import resources

from sensor.abi import SynQuirk
from sensor.events import SynEvent

# TTLs senders start from; a received TTL is guessed to come from the nearest
# one at or above it (no path is longer than the gap between two of them).
INITIAL_TTLS = (32, 64, 128, 255)

OPTION_LETTERS = {0: "E", 1: "N", 2: "M", 3: "W", 4: "S", 8: "T"}

FAMILIES = ("Linux", "Windows", "macOS/iOS", "Android", "FreeBSD", "other")

# Confidence is additive: a layout match alone is suggestive, the window and
# shift make it likely. It never reaches 1: any of these can be set by hand.
_LAYOUT_SCORE = 0.5
_WINDOW_SCORE = 0.25
_WSCALE_SCORE = 0.15
_TTL_ONLY_SCORE = 0.25


@dataclass(frozen=True, slots=True)
class TcpSignature:
    """What a client's SYN says about its TCP stack."""

    ip_version: int
    ttl: int  # as received
    initial_ttl: int
    hops: int
    df: bool
    window: int
    window_mss: int | None  # N when window == N * mss exactly
    mss: int | None
    wscale: int | None
    options: str  # layout letters, e.g. "M,S,T,N,W"; "" when there are none
    quirks: tuple[str, ...]

    @property
    def window_form(self) -> str:
        return f"mss*{self.window_mss}" if self.window_mss is not None else str(self.window)

    def __str__(self) -> str:
        flags = (["df"] if self.df else []) + list(self.quirks)
        fields = (
            str(self.ip_version),
            str(self.initial_ttl),
            _dash(self.mss),
            self.window_form,
            _dash(self.wscale),
            self.options or "-",
            "+".join(flags) or "-",
        )
        return ":".join(fields)


@dataclass(frozen=True, slots=True)
class OsGuess:
    family: str  # one of FAMILIES
    confidence: float  # 0.0 (no idea) to 0.9
    reason: str


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def initial_ttl(ttl: int) -> int:
    return next((t for t in INITIAL_TTLS if ttl <= t), 255)


def option_layout(kinds: tuple[int, ...]) -> str:
    return ",".join(OPTION_LETTERS.get(k, f"?{k}") for k in kinds)


def syn_signature(ev: SynEvent) -> TcpSignature:
    return _signature(
        ev.flow.ip_version, ev.ttl, ev.df, ev.window, ev.mss, ev.wscale, ev.options, ev.quirks
    )


def syn_fingerprint(ev: SynEvent) -> tuple[str, str]:
    """The SYN's signature in its compact form and the OS family guessed from it."""
    return _described(syn_signature(ev))


# A host sees a few dozen TCP stacks and TTLs, SYN after SYN: what a SYN's
# fields say is worked out once per distinct set of them.
_SYN_FORMS_CACHED = 4096


@functools.lru_cache(maxsize=_SYN_FORMS_CACHED)
def _signature(
    ip_version: int,
    ttl: int,
    df: bool,
    window: int,
    mss: int | None,
    wscale: int | None,
    options: tuple[int, ...],
    quirks: SynQuirk,
) -> TcpSignature:
    start = initial_ttl(ttl)
    window_mss = None
    if mss and window and window % mss == 0:
        window_mss = window // mss
    return TcpSignature(
        ip_version=ip_version,
        ttl=ttl,
        initial_ttl=start,
        hops=start - ttl,
        df=df,
        window=window,
        window_mss=window_mss,
        mss=mss,
        wscale=wscale,
        options=option_layout(options),
        quirks=tuple(q.name.lower() for q in SynQuirk if q.name and q in quirks),
    )


@functools.lru_cache(maxsize=_SYN_FORMS_CACHED)
def _described(sig: TcpSignature) -> tuple[str, str]:
    return str(sig), os_guess(sig).family


@dataclass(frozen=True, slots=True)
class OsSignature:
    """One row of os_signatures.toml."""

    family: str
    label: str
    initial_ttl: int
    options: tuple[str, ...]  # ("*",) for a TTL-only row
    windows: tuple[str, ...]
    wscales: frozenset[int]

    @property
    def ttl_only(self) -> bool:
        return self.options == ("*",)


def _strip_eol(layout: str) -> str:
    # Stacks pad the option list to 4 bytes with one or more EOLs after the
    # last option; how many depends on the layout, not on the system.
    letters = layout.split(",") if layout else []
    while letters and letters[-1] == "E":
        letters.pop()
    return ",".join(letters)


def _window_matches(pattern: str, window: int, mss: int | None) -> bool:
    if pattern.isdigit():
        return window == int(pattern)
    if not mss:
        return False
    if pattern == "mss*fill":
        return window == (0xFFFF // mss) * mss
    if pattern.startswith("mss*") and pattern[4:].isdigit():
        return window == int(pattern[4:]) * mss
    raise ValueError(f"window pattern {pattern!r}")


@functools.cache
def os_signatures() -> tuple[OsSignature, ...]:
    """The table, parsed and checked once; a bad row fails loudly here."""
    text = resources.files("sensor.fingerprint").joinpath("os_signatures.toml").read_text()
    rows = []
    for row in tomllib.loads(text)["os"]:
        sig = OsSignature(
            family=row["family"],
            label=row["label"],
            initial_ttl=int(row["initial_ttl"]),
            options=tuple(_strip_eol(o) if o != "*" else o for o in row["options"]),
            windows=tuple(str(w) for w in row["windows"]),
            wscales=frozenset(int(w) for w in row["wscales"]),
        )
        if sig.family not in FAMILIES or sig.initial_ttl not in INITIAL_TTLS:
            raise ValueError(f"os_signatures.toml: bad row {row}")
        for pattern in sig.windows:
            _window_matches(pattern, 0, 1)
        rows.append(sig)
    return tuple(rows)


def os_guess(sig: TcpSignature) -> OsGuess:
    layout = _strip_eol(sig.options)
    best: tuple[float, OsSignature, list[str]] | None = None
    for row in os_signatures():
        if row.initial_ttl != sig.initial_ttl:
            continue
        if row.ttl_only:
            score, matched = _TTL_ONLY_SCORE, []
        elif layout in row.options:
            score, matched = _LAYOUT_SCORE, [f"options {sig.options or '-'}"]
            if any(_window_matches(p, sig.window, sig.mss) for p in row.windows):
                score += _WINDOW_SCORE
                matched.append(f"window {sig.window_form}")
            if sig.wscale is not None and sig.wscale in row.wscales:
                score += _WSCALE_SCORE
                matched.append(f"wscale {sig.wscale}")
        else:
            continue
        if best is None or score > best[0]:
            best = (score, row, matched)
    if best is None:
        unknown = f"initial TTL {sig.initial_ttl} with options {sig.options or '-'}"
        return OsGuess("other", 0.0, f"no known system sends {unknown}")
    score, row, matched = best
    if row.ttl_only:
        return OsGuess(row.family, score, row.label)
    evidence = ", ".join([f"initial TTL {sig.initial_ttl}", *matched])
    return OsGuess(row.family, round(score, 2), f"{row.label}: {evidence}")
