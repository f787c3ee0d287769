"""Whether one client's User-Agent, TLS ClientHello and TCP SYN tell the same story.

Each layer is written by a different party: the User-Agent by whoever wrote
the request (anyone can type anything), the ClientHello by the TLS library,
the SYN by the kernel. A script that claims to be Chrome on Windows but sends
Python's ClientHello from a Linux kernel contradicts itself. Known TLS stacks
live in client_stacks.toml; rules and their wording are in docs/fingerprints.md.

A layer that is missing or not recognised is never evidence of anything: only
two layers that both say something, and disagree, make a client inconsistent.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from importlib import resources

from sensor.fingerprint.http import UserAgentInfo, parse_user_agent
from sensor.fingerprint.tcp import FAMILIES, OsGuess, TcpSignature, os_guess

# A SYN guess below this rests on the TTL alone: too weak to contradict anyone.
MIN_OS_CONFIDENCE = 0.5

# ua-parser OS families -> the TCP families whose kernels they run on.
_LINUX_LIKE = frozenset({"Linux", "Android"})
UA_SYSTEMS: dict[str, frozenset[str]] = {
    "Windows": frozenset({"Windows"}),
    "Mac OS X": frozenset({"macOS/iOS"}),
    "iOS": frozenset({"macOS/iOS"}),
    "Android": _LINUX_LIKE,
    "Linux": _LINUX_LIKE,
    "Ubuntu": _LINUX_LIKE,
    "Debian": _LINUX_LIKE,
    "Fedora": _LINUX_LIKE,
    "Red Hat": _LINUX_LIKE,
    "SUSE": _LINUX_LIKE,
    "Arch Linux": _LINUX_LIKE,
    "Linux Mint": _LINUX_LIKE,
    "Chrome OS": _LINUX_LIKE,
    "FreeBSD": frozenset({"FreeBSD"}),
}

# Apple requires every iOS browser to use WebKit and the system's network
# stack, so "Chrome on iOS" sends Safari's ClientHello, not Chrome's.
IOS_TLS_FAMILY = "safari"


@dataclass(frozen=True, slots=True)
class KnownStack:
    ja4: str
    family: str
    name: str
    version: str
    pcaps: tuple[str, ...]
    captured: str


@dataclass(frozen=True, slots=True)
class ClientFamily:
    name: str
    user_agents: frozenset[str]  # lowercased
    systems: frozenset[str] | None  # TCP OS families; None for any


@dataclass(frozen=True, slots=True)
class StackMatch:
    """What a JA4 says about the client's TLS library."""

    families: frozenset[str]
    names: tuple[str, ...]
    exact: bool  # the whole JA4 is known; else only its cipher-suite hash

    def describe(self) -> str:
        if self.exact:
            return " or ".join(self.names)
        return f"the cipher suites of {' or '.join(sorted(self.families))}"


@dataclass(frozen=True, slots=True)
class ClientStacks:
    families: dict[str, ClientFamily]
    stacks: tuple[KnownStack, ...]

    def lookup(self, ja4: str) -> StackMatch | None:
        exact = [s for s in self.stacks if s.ja4 == ja4]
        if not exact:
            # A new release of a known client usually changes its extensions
            # (the third part) long before its cipher list (the second).
            cipher_hash = _ja4_part(ja4, 1)
            exact_match = False
            found = [s for s in self.stacks if cipher_hash and _ja4_part(s.ja4, 1) == cipher_hash]
        else:
            exact_match, found = True, exact
        if not found:
            return None
        names = tuple(dict.fromkeys(s.name for s in found))
        return StackMatch(frozenset(s.family for s in found), names, exact_match)

    def family_for_user_agent(self, ua: UserAgentInfo, raw: str) -> ClientFamily | None:
        """The client family a User-Agent claims, by ua-parser's name or the product token."""
        product = raw.split("/", 1)[0].strip().lower()
        for candidate in (ua.browser.lower(), product):
            for family in self.families.values():
                if candidate in family.user_agents:
                    return family
        return None


def _ja4_part(ja4: str, index: int) -> str | None:
    parts = ja4.split("_")
    return parts[index] if len(parts) == 3 else None


def load_client_stacks(text: str) -> ClientStacks:
    """Parse and check a client_stacks.toml; a bad table raises ValueError."""
    data = tomllib.loads(text)
    families = {
        name: ClientFamily(
            name=name,
            user_agents=frozenset(u.lower() for u in row.get("user_agents", [])),
            systems=frozenset(row["systems"]) if "systems" in row else None,
        )
        for name, row in data.get("families", {}).items()
    }
    stacks = []
    for row in data.get("stack", []):
        stack = KnownStack(
            ja4=row["ja4"],
            family=row["family"],
            name=row["name"],
            version=row["version"],
            pcaps=tuple(row.get("pcaps", [])),
            captured=row["captured"],
        )
        if stack.family not in families or _ja4_part(stack.ja4, 1) is None:
            raise ValueError(f"client_stacks.toml: bad stack {row}")
        stacks.append(stack)
    for family in families.values():
        if family.systems is not None and not family.systems <= set(FAMILIES):
            raise ValueError(f"client_stacks.toml: unknown systems in {family}")
    return ClientStacks(families, tuple(stacks))


@functools.cache
def client_stacks() -> ClientStacks:
    text = resources.files("sensor.fingerprint").joinpath("client_stacks.toml").read_text()
    return load_client_stacks(text)


@dataclass(frozen=True, slots=True)
class Consistency:
    consistent: bool
    reasons: tuple[str, ...]  # each contradiction, in words; empty when consistent
    checked: tuple[str, ...]  # what was compared and agreed, or could not be compared
    user_agent: UserAgentInfo | None
    tls: StackMatch | None
    os: OsGuess | None


def _syn_words(sig: TcpSignature, guess: OsGuess) -> str:
    evidence = f"TTL {sig.initial_ttl}, options {sig.options or '-'}"
    return f"the TCP SYN looks like {guess.family} ({evidence})"


def check_consistency(
    ja4: str | None = None,
    tcp: TcpSignature | None = None,
    user_agent: str | None = None,
    stacks: ClientStacks | None = None,
) -> Consistency:
    """Compare what each layer says about one client; any layer may be missing."""
    table = stacks or client_stacks()
    reasons: list[str] = []
    checked: list[str] = []

    ua = parse_user_agent(user_agent) if user_agent else None
    tls = table.lookup(ja4) if ja4 else None
    guess = os_guess(tcp) if tcp is not None else None
    if ja4 and tls is None:
        checked.append(f"JA4 {ja4} is not a known client stack")
    usable_os = guess if guess and guess.family != "other" else None
    if usable_os and usable_os.confidence < MIN_OS_CONFIDENCE:
        checked.append(f"TCP SYN guess ({usable_os.reason}) is too weak to compare")
        usable_os = None

    # User-Agent's operating system against the SYN.
    claimed_os = ua.os if ua else "Other"
    if ua and claimed_os in UA_SYSTEMS and usable_os and tcp is not None:
        if usable_os.family in UA_SYSTEMS[claimed_os]:
            checked.append(f"User-Agent OS {claimed_os} agrees with the TCP SYN")
        else:
            reasons.append(f"User-Agent claims {claimed_os} but {_syn_words(tcp, usable_os)}")

    # User-Agent's client against the ClientHello.
    if ua and user_agent and tls:
        claimed = table.family_for_user_agent(ua, user_agent)
        expected = IOS_TLS_FAMILY if claimed_os == "iOS" else claimed.name if claimed else None
        claimed_name = ua.browser if ua.browser != "Other" else user_agent.split("/", 1)[0]
        if expected is None:
            checked.append(f"User-Agent client {claimed_name} has no known TLS stack")
        elif expected in tls.families:
            checked.append(f"User-Agent client {claimed_name} agrees with the TLS ClientHello")
        else:
            reasons.append(
                f"User-Agent claims {claimed_name} but the TLS ClientHello matches {tls.describe()}"
            )

    # The ClientHello's library against the SYN, for libraries tied to one system.
    if tls and usable_os and tcp is not None:
        bound = [table.families[name] for name in sorted(tls.families)]
        if all(f.systems is not None and usable_os.family not in f.systems for f in bound):
            systems = sorted({s for f in bound for s in f.systems or ()})
            reasons.append(
                f"the TLS ClientHello matches {tls.describe()}, which runs only on "
                f"{', '.join(systems)}, but {_syn_words(tcp, usable_os)}"
            )

    return Consistency(
        consistent=not reasons,
        reasons=tuple(reasons),
        checked=tuple(checked),
        user_agent=ua,
        tls=tls,
        os=guess,
    )
