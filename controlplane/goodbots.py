"""Verified good bots: published crawler address ranges, User-Agent tokens, and
fast address-set lookups for the policy.

A User-Agent costs nothing to fake, so a crawler is verified only when its
User-Agent names it AND its address lies in the ranges its operator publishes
(Google's googlebot.json, Bing's bingbot.json, OpenAI's and others' files, all
in one format):

    {"creationTime": "2024-05-01T00:00:00.000000",
     "prefixes": [{"ipv4Prefix": "66.249.64.0/27"},
                  {"ipv6Prefix": "2001:4860:4801:10::/64"}]}

The address is the part a spoofer cannot forge once a handshake completed, so
it is what makes the claim true; the User-Agent only says which claim to check.
"""

from __future__ import annotations

import ipaddress
import json
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from sensor.errors import PolicyError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_address(value: str | IPAddress) -> IPAddress:
    """An address object; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes plain IPv4,
    so a dual-stack socket's view of a v4 client matches v4 ranges and lists."""
    addr = (
        value
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address)
        else (ipaddress.ip_address(str(value).strip()))
    )
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class NetworkSet:
    """A set of CIDRs answering "is this address in any of them" in O(log n).

    Networks are merged into sorted, disjoint integer intervals per IP version,
    so a lookup is one bisect however many prefixes a publisher lists."""

    __slots__ = ("_ends", "_starts", "networks")

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(networks)
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._ends: dict[int, list[int]] = {4: [], 6: []}
        for version in (4, 6):
            spans = sorted(
                (int(n.network_address), int(n.broadcast_address))
                for n in self.networks
                if n.version == version
            )
            starts, ends = self._starts[version], self._ends[version]
            for start, end in spans:
                if ends and start <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], end)
                else:
                    starts.append(start)
                    ends.append(end)

    def __contains__(self, addr: IPAddress) -> bool:
        starts = self._starts[addr.version]
        i = bisect_right(starts, int(addr)) - 1
        return i >= 0 and int(addr) <= self._ends[addr.version][i]

    def __len__(self) -> int:
        return len(self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def covering(self, addr: IPAddress) -> IPNetwork | None:
        """The first listed network holding addr (for reasons; slower than `in`)."""
        if addr not in self:
            return None
        return next((n for n in self.networks if addr in n), None)


class TokenMatcher:
    """Finds which configured product token a User-Agent carries.

    A token matches as a whole product token, case-insensitively: "Googlebot"
    matches "compatible; Googlebot/2.1;" but not "Googlebot-Image/1.0", and
    "ShopAgent/1.0" does not match "ShopAgent/1.05". Plain tokens rather than
    regular expressions: an operator cannot write a pattern that matches too
    much or backtracks for ever, and all tokens compile into one search."""

    # Characters that continue a product token: a token must not sit inside a longer one.
    _TOKEN_CHAR = r"A-Za-z0-9_.\-"

    def __init__(self, tokens: Mapping[str, str]) -> None:
        """tokens: token -> the name of the crawler or agent it identifies."""
        self._names = {token.lower(): name for token, name in tokens.items()}
        self._pattern: re.Pattern[str] | None = None
        if tokens:
            # Longest first, so of two tokens where one is a prefix of the
            # other at the same position, the longer one is tried first.
            alternatives = "|".join(
                re.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))
            )
            self._pattern = re.compile(
                rf"(?<![{self._TOKEN_CHAR}])(?:{alternatives})(?![{self._TOKEN_CHAR}])",
                re.IGNORECASE,
            )

    def match(self, user_agent: str | None) -> str | None:
        """The name whose token appears first in user_agent, or None."""
        if not user_agent or self._pattern is None:
            return None
        found = self._pattern.search(user_agent)
        return self._names[found.group(0).lower()] if found else None


# ---- the published ranges format ----


class _PrefixEntry(BaseModel):
    # Publishers add fields (service, scope, region); we read only the prefix.
    model_config = ConfigDict(extra="ignore")

    ipv4Prefix: str | None = None  # the published key's spelling
    ipv6Prefix: str | None = None  # the published key's spelling


class _PublishedRanges(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. Google's "syncToken"

    creationTime: str | None = None  # the published key's spelling
    prefixes: list[_PrefixEntry]


def parse_ranges(text: str, source: str = "<ranges>") -> tuple[IPNetwork, ...]:
    """The networks of one ranges file in the published format.

    Raises PolicyError naming the source, the entry and the bad value: a
    crawler's ranges decide who is exempt, so a typo must not pass silently."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{source}: not valid JSON: {exc}") from None
    try:
        doc = _PublishedRanges.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise PolicyError(f"{source}: {where}: {err['msg']}") from None
    networks: list[IPNetwork] = []
    for i, entry in enumerate(doc.prefixes):
        candidates = (("ipv4Prefix", entry.ipv4Prefix), ("ipv6Prefix", entry.ipv6Prefix))
        given = [(k, v) for k, v in candidates if v is not None]
        if len(given) != 1:
            raise PolicyError(
                f"{source}: prefixes.{i}: needs exactly one of ipv4Prefix or ipv6Prefix"
            )
        key, value = given[0]
        try:
            net = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise PolicyError(f"{source}: prefixes.{i}.{key}: not a CIDR: {value!r}") from None
        if net.version != (4 if key == "ipv4Prefix" else 6):
            raise PolicyError(
                f"{source}: prefixes.{i}.{key}: not an IPv{4 if key == 'ipv4Prefix' else 6} "
                f"prefix: {value!r}"
            )
        networks.append(net)
    return tuple(networks)


def load_ranges(path: Path) -> tuple[IPNetwork, ...]:
    """The networks of a ranges file on disk (see parse_ranges)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read ranges file {str(path)!r}: {exc.strerror}") from None
    return parse_ranges(text, source=str(path))
