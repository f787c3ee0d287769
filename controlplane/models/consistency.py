"""Rules for clients that lie about what they are: layers that contradict each
other, crawlers claimed from addresses the crawler does not use, and clients
that send no User-Agent at all.

The layer comparison is sensor.fingerprint.consistency's (User-Agent against
the ClientHello's client family and against the SYN's OS family); this model
gives each contradiction a code and a weight. The crawler check needs the
published address ranges of each crawler, which the policy module loads from
the crawlers' JSON files and passes in as a name -> CIDR list mapping.

A client whose requests carry no User-Agent says nothing the layers could be
checked against. Every browser, mobile HTTP stack and HTTP library sends one
by default (RFC 9110 section 10.1.5: a user agent SHOULD); its absence marks a
hand-made tool, a load generator or a script that stripped it, and managed
bot rules treat it the same way (AWS WAF's core rule set blocks it outright).
It only counts once a request was seen: a TLS-only flow shows no headers.

Weights are not learned: a Chrome User-Agent over python-requests' ClientHello
is a lie whatever this host's traffic looks like. The weights still differ,
because proxies explain some contradictions: a forwarding proxy (HTTP CONNECT,
VPN, NAT64) replaces the SYN but not the ClientHello, so a disagreement with
the SYN is weaker evidence than one with the ClientHello.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from sklearn.base import BaseEstimator

from controlplane.decisions import Reason
from controlplane.models import Finding, ensure_fitted, model_version, noisy_or
from sensor.fingerprint.consistency import Consistency, check_consistency
from sensor.fingerprint.http import load_user_agent_rules
from sensor.fingerprint.tcp import INITIAL_TTLS, TcpSignature

MODEL = "consistency"

Address = str | ipaddress.IPv4Address | ipaddress.IPv6Address

# User-Agent tokens of crawlers that publish their address ranges. Matched
# case-insensitively anywhere in the User-Agent; the policy may pass its own.
DEFAULT_CRAWLER_PATTERNS: dict[str, str] = {
    "googlebot": r"Googlebot|Google-InspectionTool|GoogleOther",
    "bingbot": r"bingbot|BingPreview|msnbot",
    "applebot": r"Applebot",
    "duckduckbot": r"DuckDuckBot",
    "yandexbot": r"YandexBot",
    "baiduspider": r"Baiduspider",
    "gptbot": r"GPTBot|OAI-SearchBot|ChatGPT-User",
    "perplexitybot": r"PerplexityBot|Perplexity-User",
}

# Which observation kinds each contradiction rests on.
EVIDENCE = {
    "ua_tls_mismatch": frozenset({"http", "tls"}),
    "ua_os_mismatch": frozenset({"http", "syn"}),
    "tls_os_mismatch": frozenset({"tls", "syn"}),
    "fingerprint_inconsistent": frozenset({"http", "tls", "syn"}),
    # A User-Agent only arrives on an established connection, so the address
    # behind this finding completed a handshake: it is not the forgeable
    # source of a lone SYN (ARCHITECTURE.md, guarantee 3).
    "crawler_impostor": frozenset({"http", "syn"}),
    "no_user_agent": frozenset({"http"}),
}

NO_USER_AGENT_TEXT = (
    "its requests carry no User-Agent header, which every browser, app and HTTP library sends"
)


@dataclass(frozen=True, slots=True)
class ConsistencyAssessment:
    """Everything the model concluded about one client."""

    findings: tuple[Finding, ...]
    claimed_crawler: str | None  # the crawler the User-Agent names, if any
    verified_crawler: str | None  # ... and the address is in its published ranges
    checked: tuple[str, ...]  # what agreed, or could not be compared, in words

    @property
    def probability(self) -> float:
        return noisy_or(f.probability for f in self.findings)


def parse_tcp_signature(text: str) -> TcpSignature | None:
    """The compact form (sensor.fingerprint.tcp) back into a TcpSignature, or None.

    Observations carry the signature as text. The received TTL and hop count
    are not in it; the OS guess needs only the initial TTL, so they are set
    from it. Malformed text is a missing layer, never evidence.
    """
    parts = text.split(":")
    if len(parts) != 7:
        return None
    version, ttl, mss, window, wscale, options, flags = parts
    try:
        initial = int(ttl)
        mss_value = None if mss == "-" else int(mss)
        window_mss: int | None = None
        if window.startswith("mss*"):
            window_mss = int(window[4:])
            window_value = window_mss * (mss_value or 0)
        else:
            window_value = int(window)
        signature = TcpSignature(
            ip_version=int(version),
            ttl=initial,
            initial_ttl=initial,
            hops=0,
            df="df" in flags.split("+"),
            window=window_value,
            window_mss=window_mss,
            mss=mss_value,
            wscale=None if wscale == "-" else int(wscale),
            options="" if options == "-" else options,
            quirks=tuple(f for f in flags.split("+") if f not in ("df", "-")),
        )
    except ValueError:
        return None
    return signature if initial in INITIAL_TTLS else None


@functools.lru_cache(maxsize=8192)
def _layers(ja4: str | None, tcp: TcpSignature | None, user_agent: str | None) -> Consistency:
    # Clients reuse a handful of (JA4, SYN, User-Agent) triples; ua-parser is
    # the slow part of a check, so each triple is parsed once.
    return check_consistency(ja4=ja4, tcp=tcp, user_agent=user_agent)


# A host sees a handful of SYN signatures and User-Agents over and over.
_parsed_tcp = functools.lru_cache(maxsize=4096)(parse_tcp_signature)


@functools.lru_cache(maxsize=8192)
def _claim(patterns: tuple[tuple[str, str], ...], user_agent: str) -> str | None:
    for name, pattern in patterns:
        if re.search(pattern, user_agent, re.IGNORECASE):
            return name
    return None


@functools.lru_cache(maxsize=256)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _contradiction_code(text: str) -> str:
    # check_consistency reports contradictions as sentences; these are their
    # fixed openings (sensor/fingerprint/consistency.py).
    if text.startswith("User-Agent claims") and "TLS ClientHello" in text:
        return "ua_tls_mismatch"
    if text.startswith("User-Agent claims") and "TCP SYN" in text:
        return "ua_os_mismatch"
    if text.startswith("the TLS ClientHello matches") and "TCP SYN" in text:
        return "tls_os_mismatch"
    return "fingerprint_inconsistent"


class ConsistencyModel(BaseEstimator):
    """Lying clients and fake good bots, as reasons with high points.

    crawler_patterns: crawler name -> regex on the User-Agent (default
        DEFAULT_CRAWLER_PATTERNS).
    crawler_ranges: crawler name -> CIDRs it publishes. A crawler claimed
        without configured ranges is noted but not judged: no ranges, no
        verdict.
    *_points: this model's confidence (0-100) in each kind of finding. Alone,
        no_user_agent's 85 scores 80.8 (a tarpit on the default policy, a
        block on login); with any other sign of a bot, a block.
    """

    kind: ClassVar[str] = "consistency"

    def __init__(
        self,
        *,
        crawler_patterns: Mapping[str, str] | None = None,
        crawler_ranges: Mapping[str, Sequence[str]] | None = None,
        ua_tls_points: float = 90.0,
        tls_os_points: float = 60.0,
        ua_os_points: float = 45.0,
        impostor_points: float = 95.0,
        no_user_agent_points: float = 85.0,
    ) -> None:
        self.crawler_patterns = crawler_patterns
        self.crawler_ranges = crawler_ranges
        self.ua_tls_points = ua_tls_points
        self.tls_os_points = tls_os_points
        self.ua_os_points = ua_os_points
        self.impostor_points = impostor_points
        self.no_user_agent_points = no_user_agent_points

    def fit(self, X: object = None, y: object = None) -> ConsistencyModel:
        """Check and normalise the configuration; no traffic is needed.

        Done here rather than in __init__ (which only stores parameters) so a
        bad CIDR or regex fails at fit time with its crawler named, and so the
        ranges in force are part of version_.
        """
        patterns = dict(
            DEFAULT_CRAWLER_PATTERNS if self.crawler_patterns is None else self.crawler_patterns
        )
        for name, pattern in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"crawler {name!r}: bad User-Agent pattern: {exc}") from exc
        ranges: dict[str, list[str]] = {}
        for name, cidrs in (self.crawler_ranges or {}).items():
            if name not in patterns:
                raise ValueError(f"ranges given for crawler {name!r}, which has no pattern")
            try:
                ranges[name] = sorted({str(ipaddress.ip_network(c, strict=False)) for c in cidrs})
            except ValueError as exc:
                raise ValueError(f"crawler {name!r}: {exc}") from exc
        self.crawler_patterns_ = patterns
        self.crawler_ranges_ = ranges
        load_user_agent_rules()  # now, not at the first client's request
        self.version_ = model_version(
            self.kind,
            repr(sorted(patterns.items())),
            repr(sorted(ranges.items())),
            repr(
                (
                    self.ua_tls_points,
                    self.tls_os_points,
                    self.ua_os_points,
                    self.impostor_points,
                    self.no_user_agent_points,
                )
            ),
        )
        return self

    # ---- scoring ----

    def assess(
        self,
        *,
        user_agent: str | None = None,
        ja4: str | None = None,
        tcp: TcpSignature | str | None = None,
        client: Address | None = None,
        anonymous: bool = False,
    ) -> ConsistencyAssessment:
        """Compare one client's layers and check any crawler it claims to be.

        anonymous: the client sent requests and none carried a User-Agent (an
        unknown User-Agent, None with anonymous False, is no evidence)."""
        ensure_fitted(self)
        signature = _parsed_tcp(tcp) if isinstance(tcp, str) else tcp
        findings: list[Finding] = []
        checked: list[str] = []
        if anonymous and not user_agent:
            findings.append(
                Finding(
                    Reason("no_user_agent", NO_USER_AGENT_TEXT, self.no_user_agent_points, MODEL),
                    evidence=EVIDENCE["no_user_agent"],
                )
            )

        claimed = self._claimed_crawler(user_agent)
        verified = None
        if claimed is not None:
            verified, finding, note = self._check_crawler(claimed, client)
            if finding is not None:
                findings.append(finding)
            checked.append(note)

        if verified is None:
            # A verified crawler's operator owns the address; what its TLS
            # library is does not change who it is.
            layers = _layers(ja4, signature, user_agent)
            checked.extend(layers.checked)
            for text in layers.reasons:
                code = _contradiction_code(text)
                findings.append(
                    Finding(
                        Reason(code, text, self._points(code), MODEL),
                        evidence=EVIDENCE[code],
                    )
                )
        findings.sort(key=lambda f: -f.reason.points)
        return ConsistencyAssessment(tuple(findings), claimed, verified, tuple(checked))

    def findings(
        self,
        *,
        user_agent: str | None = None,
        ja4: str | None = None,
        tcp: TcpSignature | str | None = None,
        client: Address | None = None,
        anonymous: bool = False,
    ) -> list[Finding]:
        assessment = self.assess(
            user_agent=user_agent, ja4=ja4, tcp=tcp, client=client, anonymous=anonymous
        )
        return list(assessment.findings)

    def score(
        self,
        *,
        user_agent: str | None = None,
        ja4: str | None = None,
        tcp: TcpSignature | str | None = None,
        client: Address | None = None,
        anonymous: bool = False,
    ) -> float:
        """0..1: how surely this client lies about, or hides, what it is."""
        return self.assess(
            user_agent=user_agent, ja4=ja4, tcp=tcp, client=client, anonymous=anonymous
        ).probability

    def explain(
        self,
        *,
        user_agent: str | None = None,
        ja4: str | None = None,
        tcp: TcpSignature | str | None = None,
        client: Address | None = None,
        anonymous: bool = False,
    ) -> list[Reason]:
        assessment = self.assess(
            user_agent=user_agent, ja4=ja4, tcp=tcp, client=client, anonymous=anonymous
        )
        return [f.reason for f in assessment.findings]

    # ---- internals ----

    def _points(self, code: str) -> float:
        return {
            "ua_tls_mismatch": self.ua_tls_points,
            "tls_os_mismatch": self.tls_os_points,
            "ua_os_mismatch": self.ua_os_points,
        }.get(code, self.ua_os_points)

    def _claimed_crawler(self, user_agent: str | None) -> str | None:
        if not user_agent:
            return None
        return _claim(tuple(self.crawler_patterns_.items()), user_agent)

    def _check_crawler(
        self, name: str, client: Address | None
    ) -> tuple[str | None, Finding | None, str]:
        cidrs = self.crawler_ranges_.get(name)
        if cidrs is None:
            return None, None, f"User-Agent claims {name}, which has no configured ranges"
        try:
            address = ipaddress.ip_address(str(client))
        except ValueError:
            return None, None, f"User-Agent claims {name}; no client address to check"
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(address in net for net in _networks(tuple(cidrs))):
            return name, None, f"{address} is in {name}'s published ranges"
        count = f"{len(cidrs)} range" + ("s" if len(cidrs) != 1 else "")
        text = (
            f"User-Agent claims {name} but {address} is outside every address range "
            f"{name} publishes ({count} configured)"
        )
        finding = Finding(
            Reason("crawler_impostor", text, self.impostor_points, MODEL),
            evidence=EVIDENCE["crawler_impostor"],
        )
        return None, finding, f"{address} is not in {name}'s published ranges"
