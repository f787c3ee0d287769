"""The policy: what botwall does about a risk score, given where and who.

A Policy is a validated TOML file (docs/policy.md; the shipped default is
controlplane/default_policy.toml). PolicyEngine.decide(risk, ctx) turns one
Risk and its DecisionContext into the Decisions the engine writes to the
kernel and the audit store, in this order of precedence:

1. the allow list (always wins: Guarantee 2);
2. a verified crawler (User-Agent AND published address ranges) gets its own
   generous rate limit, whatever its score;
3. a declared AI agent gets the action the policy names for it;
4. otherwise the score meets the threshold table of the request's endpoint
   class (sensitive classes are stricter).

Then guards narrow what was decided: an address is never enforced on SYN-only
evidence (Guarantee 3), a shared address (CGNAT, corporate proxy) gets
fingerprint- or flow-scoped verdicts instead of address-wide ones, repeat
offenders get longer TTLs, and shadow rules record without enforcing.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from controlplane.decisions import Action, ClusterKey, Decision, Risk, TargetKind
from controlplane.goodbots import (
    IPAddress,
    IPNetwork,
    NetworkSet,
    TokenMatcher,
    load_ranges,
    normalize_address,
)
from controlplane.observations import SENSITIVE_CLASSES, EndpointClass
from sensor.errors import PolicyError

SCHEMA_VERSION: Final = 1

# Every verdict expires in the kernel (Guarantee 1); a TTL of years would
# defeat that, so no TTL the policy can produce exceeds a week.
MAX_TTL_S = 7 * 86_400.0

# Built-in strictness of the sensitive classes, in score points: every
# threshold of the table is lowered by the offset. A policy's [classes.X]
# replaces the entry for X only; the others keep these.
DEFAULT_CLASS_OFFSETS: dict[EndpointClass, float] = {
    EndpointClass.LOGIN: 15.0,
    EndpointClass.OTP: 20.0,  # SMS pumping costs money per request
    EndpointClass.CHECKOUT: 15.0,
    EndpointClass.CART: 10.0,  # inventory hoarding, scalping
    EndpointClass.SEARCH: 10.0,  # expensive queries, scraping
}
assert set(DEFAULT_CLASS_OFFSETS) == SENSITIVE_CLASSES

ENFORCING = frozenset({Action.THROTTLE, Action.TARPIT, Action.BLOCK, Action.BLOCK_FLOW})
ADDRESS_SCOPED = frozenset({Action.THROTTLE, Action.TARPIT, Action.BLOCK})


# ---- the file format ----

_NAME = r"^[A-Za-z0-9_.\-]+$"


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        # A CIDR with host bits set is refused rather than widened: in an
        # allow list or a crawler's ranges, "10.1.2.3/8" silently meaning
        # 10.0.0.0/8 would exempt sixteen million addresses by a typo.
        raise ValueError(f"not a CIDR or address ({exc})") from None
    return value.strip()


def _check_token(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError("a User-Agent token is one product token, without spaces")
    return value


Cidr = Annotated[str, AfterValidator(_check_cidr)]
UserAgentToken = Annotated[str, AfterValidator(_check_token)]
Ttl = Annotated[float, Field(gt=0, le=MAX_TTL_S)]
Rate = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    # strict: "90" is not 90 and true is not 1; a policy says what it means.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RuleConfig(_Strict):
    """One row of a threshold table: from min_score up, this action."""

    name: Annotated[str, Field(pattern=_NAME)]
    min_score: Annotated[float, Field(ge=0, le=100)]
    action: Literal["monitor", "throttle", "tarpit", "block", "block_flow"]
    ttl_s: Ttl
    connections_per_s: Rate = 0.0
    packets_per_s: Rate = 0.0
    tarpit_syns: Annotated[int, Field(ge=0, le=6)] = 0
    shadow: bool = False

    @model_validator(mode="after")
    def _parameters_fit_action(self) -> RuleConfig:
        _check_rates(
            self.action == "throttle",
            self.connections_per_s,
            self.packets_per_s,
            f"action is {self.action!r}",
        )
        if self.action == "tarpit" and self.tarpit_syns < 1:
            raise ValueError(f"tarpit_syns={self.tarpit_syns}: a tarpit drops 1-6 SYNs")
        if self.action != "tarpit" and self.tarpit_syns:
            raise ValueError(
                f"tarpit_syns={self.tarpit_syns}: only a tarpit rule drops SYNs "
                f"(action is {self.action!r})"
            )
        return self


def _check_rates(is_throttle: bool, conn: float, pkt: float, why: str) -> None:
    if is_throttle and conn == 0 and pkt == 0:
        raise ValueError(
            "connections_per_s=0 and packets_per_s=0: a throttle needs at least one rate > 0"
        )
    if not is_throttle and (conn or pkt):
        key, value = ("connections_per_s", conn) if conn else ("packets_per_s", pkt)
        raise ValueError(f"{key}={value}: only a throttle has rates ({why})")


def _check_table(rules: list[RuleConfig]) -> list[RuleConfig]:
    names: set[str] = set()
    scores: set[float] = set()
    for rule in rules:
        if rule.name in names:
            raise ValueError(f"name={rule.name!r} appears twice in one table")
        if rule.min_score in scores:
            raise ValueError(
                f"min_score={rule.min_score:g} appears twice in one table: which action wins?"
            )
        names.add(rule.name)
        scores.add(rule.min_score)
    return rules


RuleTable = Annotated[list[RuleConfig], AfterValidator(_check_table)]


def _default_rules() -> list[RuleConfig]:
    return [
        RuleConfig(name="block", min_score=90, action="block", ttl_s=3600),
        RuleConfig(name="tarpit", min_score=75, action="tarpit", ttl_s=600, tarpit_syns=3),
        RuleConfig(
            name="throttle",
            min_score=60,
            action="throttle",
            ttl_s=600,
            connections_per_s=2.0,
            packets_per_s=200.0,
        ),
        RuleConfig(name="monitor", min_score=40, action="monitor", ttl_s=300),
    ]


class ClassConfig(_Strict):
    """How one endpoint class departs from the base table."""

    offset: Annotated[float, Field(ge=-100, le=100)] = 0.0
    rules: RuleTable | None = None  # a table of its own instead of the base table


class AllowConfig(_Strict):
    cidrs: list[Cidr] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    ttl_s: Ttl = 3600.0


class EscalationConfig(_Strict):
    factor: Annotated[float, Field(ge=1, le=100)] = 2.0
    window_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 86_400.0
    max_multiplier: Annotated[float, Field(ge=1, le=10_000)] = 8.0
    max_ttl_s: Ttl = 86_400.0
    max_targets: Annotated[int, Field(ge=1)] = 100_000


class SharedAddressConfig(_Strict):
    min_fingerprints: Annotated[int, Field(ge=2)] = 4


class CrawlerConfig(_Strict):
    """A crawler verified by User-Agent token AND its published address ranges."""

    name: Annotated[str, Field(pattern=_NAME)]
    user_agents: Annotated[list[UserAgentToken], Field(min_length=1)]
    ranges_files: list[str] = Field(default_factory=list)
    ranges: list[Cidr] = Field(default_factory=list)
    connections_per_s: Rate = 20.0
    packets_per_s: Rate = 5000.0
    ttl_s: Ttl = 600.0
    shadow: bool = False

    @model_validator(mode="after")
    def _has_a_rate(self) -> CrawlerConfig:
        _check_rates(True, self.connections_per_s, self.packets_per_s, "a crawler is throttled")
        return self


class AgentConfig(_Strict):
    """A declared AI agent, recognised by User-Agent token (or by the caller)."""

    name: Annotated[str, Field(pattern=_NAME)]
    user_agents: Annotated[list[UserAgentToken], Field(min_length=1)]
    action: Literal["allow", "limit", "block"]
    connections_per_s: Rate = 0.0
    packets_per_s: Rate = 0.0
    ttl_s: Ttl = 600.0
    shadow: bool = False
    ranges_files: list[str] = Field(default_factory=list)
    ranges: list[Cidr] = Field(default_factory=list)
    score_override: Annotated[float, Field(ge=0, le=100)] | None = None

    @model_validator(mode="after")
    def _parameters_fit_action(self) -> AgentConfig:
        _check_rates(
            self.action == "limit",
            self.connections_per_s,
            self.packets_per_s,
            f"action is {self.action!r}; 'limit' is the throttle",
        )
        return self


class PolicyConfig(_Strict):
    """The whole policy file."""

    version: Literal[1] = SCHEMA_VERSION
    shadow: bool = False
    allow: AllowConfig = Field(default_factory=AllowConfig)
    rules: RuleTable = Field(default_factory=_default_rules)
    classes: dict[str, ClassConfig] = Field(default_factory=dict)
    escalation: EscalationConfig = Field(default_factory=EscalationConfig)
    shared_address: SharedAddressConfig = Field(default_factory=SharedAddressConfig)
    crawlers: list[CrawlerConfig] = Field(default_factory=list)
    agents: list[AgentConfig] = Field(default_factory=list)

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, classes: dict[str, ClassConfig]) -> dict[str, ClassConfig]:
        known = [c.value for c in EndpointClass]
        for name in classes:
            if name not in known:
                raise ValueError(f"unknown endpoint class {name!r} (one of: {', '.join(known)})")
        return classes

    @model_validator(mode="after")
    def _unique_names_and_tokens(self) -> PolicyConfig:
        for section, entries in (("crawlers", self.crawlers), ("agents", self.agents)):
            names: set[str] = set()
            tokens: dict[str, str] = {}
            for entry in entries:
                if entry.name in names:
                    raise ValueError(f"{section}: name={entry.name!r} appears twice")
                names.add(entry.name)
                for token in entry.user_agents:
                    other = tokens.setdefault(token.lower(), entry.name)
                    if other != entry.name:
                        raise ValueError(
                            f"{section}: user_agents token {token!r} names both "
                            f"{other!r} and {entry.name!r}"
                        )
        return self


def _format_errors(exc: ValidationError) -> str:
    """One line per problem, each naming the key and, for a leaf, the bad value."""
    lines = []
    for err in exc.errors():
        where = ""
        for part in err["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        message = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        got = "" if isinstance(value, dict) or err["type"] == "missing" else f" (got {value!r})"
        lines.append(f"{where or '(top level)'}: {message}{got}")
    return "; ".join(lines)


# ---- the compiled policy ----


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled threshold rule, its min_score already moved by the class offset."""

    label: str  # the rule name in Decisions: "block", or "block@login" once a class changed it
    min_score: float  # after the class offset
    action: Action
    ttl_s: float
    connections_per_s: float
    packets_per_s: float
    tarpit_syns: int
    shadow: bool


@dataclass(frozen=True, slots=True)
class _Crawler:
    name: str
    ranges: NetworkSet
    connections_per_s: float
    packets_per_s: float
    ttl_s: float
    shadow: bool


@dataclass(frozen=True, slots=True)
class _Agent:
    name: str
    action: Literal["allow", "limit", "block"]
    ranges: NetworkSet  # empty: the User-Agent token alone declares the agent
    connections_per_s: float
    packets_per_s: float
    ttl_s: float
    shadow: bool
    score_override: float | None


class Policy:
    """A validated, compiled policy. Build one with from_toml, load or default."""

    def __init__(self, config: PolicyConfig, base_dir: Path | None = None) -> None:
        """config: a validated PolicyConfig; base_dir: where relative ranges_files are."""
        self.config = config
        base = base_dir if base_dir is not None else Path(".")
        self.shadow = config.shadow
        self.allow = NetworkSet(ipaddress.ip_network(c) for c in config.allow.cidrs)
        self.tables: dict[EndpointClass, tuple[Rule, ...]] = {
            cls: self._table(cls, config) for cls in EndpointClass
        }
        self.crawlers = {
            c.name: _Crawler(
                c.name,
                self._ranges(f"crawlers[{i}]", c, base),
                c.connections_per_s,
                c.packets_per_s,
                c.ttl_s,
                c.shadow,
            )
            for i, c in enumerate(config.crawlers)
        }
        self.crawler_tokens = TokenMatcher(
            {t: c.name for c in config.crawlers for t in c.user_agents}
        )
        # Every crawler range together: cluster members inside them are left
        # out of cluster verdicts (a campaign sharing a JA4 with a crawler
        # must not take the crawler down with it).
        self.crawler_ranges = NetworkSet(
            n for c in self.crawlers.values() for n in c.ranges.networks
        )
        self.agents = {
            a.name: _Agent(
                a.name,
                a.action,
                self._ranges(f"agents[{i}]", a, base),
                a.connections_per_s,
                a.packets_per_s,
                a.ttl_s,
                a.shadow,
                a.score_override,
            )
            for i, a in enumerate(config.agents)
        }
        self.agent_tokens = TokenMatcher({t: a.name for a in config.agents for t in a.user_agents})

    # ---- construction ----

    @classmethod
    def from_toml(cls, text: str, base_dir: Path | str | None = None) -> Policy:
        """Parses and validates a policy; raises PolicyError naming every bad key.

        base_dir: the directory relative ranges_files are read from (default:
        the current directory)."""
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy is not valid TOML: {exc}") from None
        try:
            config = PolicyConfig.model_validate(raw)
        except ValidationError as exc:
            raise PolicyError(f"invalid policy: {_format_errors(exc)}") from None
        return cls(config, Path(base_dir) if base_dir is not None else None)

    @classmethod
    def validate_text(cls, text: str, base_dir: Path | str | None = None) -> Policy:
        """The policy in text, or PolicyError: what a reload calls before it
        swaps anything, so a bad file leaves the running policy in force."""
        return cls.from_toml(text, base_dir)

    @classmethod
    def load(cls, path: Path | str) -> Policy:
        """A policy file; its ranges_files are relative to its own directory."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"cannot read policy {str(path)!r}: {exc.strerror}") from None
        return cls.from_toml(text, path.parent)

    @classmethod
    def default(cls) -> Policy:
        """The policy shipped with botwall (controlplane/default_policy.toml)."""
        text = resources.files("controlplane").joinpath("default_policy.toml").read_text("utf-8")
        return cls.from_toml(text)

    def allow_decisions(self) -> list[Decision]:
        """The allow list as CIDR decisions, for the engine to write at start and
        renew: then the kernel lets these pass before any other verdict."""
        return [
            Decision(
                action=Action.ALLOW,
                target_kind=TargetKind.CIDR,
                target=str(net),
                ttl_s=self.config.allow.ttl_s,
                reason=f"allow list: {net}",
                rule="allow_list",
                score=0.0,
            )
            for net in self.allow.networks
        ]

    # ---- compilation helpers ----

    @staticmethod
    def _table(cls_: EndpointClass, config: PolicyConfig) -> tuple[Rule, ...]:
        own = config.classes.get(cls_.value)
        offset = own.offset if own is not None else DEFAULT_CLASS_OFFSETS.get(cls_, 0.0)
        rules = own.rules if own is not None and own.rules is not None else config.rules
        changed = offset != 0 or rules is not config.rules
        compiled = [
            Rule(
                label=f"{r.name}@{cls_.value}" if changed else r.name,
                min_score=max(0.0, r.min_score - offset),
                action=Action(r.action),
                ttl_s=r.ttl_s,
                connections_per_s=r.connections_per_s,
                packets_per_s=r.packets_per_s,
                tarpit_syns=r.tarpit_syns,
                shadow=r.shadow,
            )
            for r in rules
        ]
        return tuple(sorted(compiled, key=lambda r: -r.min_score))

    @staticmethod
    def _ranges(where: str, entry: CrawlerConfig | AgentConfig, base: Path) -> NetworkSet:
        networks: list[IPNetwork] = [ipaddress.ip_network(c) for c in entry.ranges]
        for j, name in enumerate(entry.ranges_files):
            path = Path(name) if Path(name).is_absolute() else base / name
            try:
                networks.extend(load_ranges(path))
            except PolicyError as exc:
                raise PolicyError(f"invalid policy: {where}.ranges_files[{j}]: {exc}") from None
        return NetworkSet(networks)

    def rule_for(self, score: float, endpoint_class: EndpointClass) -> Rule | None:
        """The strictest rule of the class's table that the score reaches."""
        for rule in self.tables[endpoint_class]:
            if score >= rule.min_score:
                return rule
        return None


# ---- escalation ----


@dataclass(slots=True)
class _Offence:
    level: int  # how many times the TTL was multiplied
    expires: float  # when the last verdict on this target ends


class Escalation:
    """Remembers who was punished, so that who comes back is punished longer.

    A repeat is a new verdict on a target after its previous verdict expired
    and within window_s of that expiry: the TTL is multiplied by factor per
    repeat, up to max_multiplier and max_ttl_s. Re-deciding a target while its
    verdict is live (the engine rescoring a throttled client) is the same
    offence, not a repeat: the level holds. Keyed by (target kind, target),
    bounded to max_targets (least recently punished forgotten first)."""

    def __init__(self, config: EscalationConfig | None = None) -> None:
        self.config = config if config is not None else EscalationConfig()
        self._offences: OrderedDict[tuple[str, str], _Offence] = OrderedDict()

    def ttl(self, target: tuple[str, str], base_ttl_s: float, now: float) -> float:
        """The TTL to enforce on target now, recording the offence."""
        c = self.config
        past = self._offences.get(target)
        if past is None or now - past.expires > c.window_s:
            level = 0
        elif now < past.expires:
            level = past.level
        elif c.factor**past.level < c.max_multiplier:
            level = past.level + 1
        else:
            level = past.level  # at the cap: counting further changes nothing
        multiplier = min(c.factor**level, c.max_multiplier)
        # Escalation lengthens, never shortens: a rule TTL above the cap stands.
        ttl = min(base_ttl_s * multiplier, max(c.max_ttl_s, base_ttl_s))
        expires = now + ttl if past is None or level != past.level else max(past.expires, now + ttl)
        self._offences[target] = _Offence(level, expires)
        self._offences.move_to_end(target)
        while len(self._offences) > c.max_targets:
            self._offences.popitem(last=False)
        return ttl

    def level(self, target: tuple[str, str]) -> int:
        past = self._offences.get(target)
        return past.level if past is not None else 0

    def __len__(self) -> int:
        return len(self._offences)


# ---- deciding ----


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """What the engine knows around a Risk, beyond the score."""

    # The client the triggering request came from; None for a pure cluster key.
    client: str | IPAddress | None = None
    endpoint_class: EndpointClass = EndpointClass.OTHER
    user_agent: str | None = None
    # Addresses seen with the risk's cluster key: a cluster verdict lands on each.
    members: tuple[str | IPAddress, ...] = ()
    # Distinct fingerprints (JA4 x TCP x HTTP) seen from the client's address;
    # many means many devices behind one address (CGNAT, corporate proxy).
    fingerprints_at_address: int = 1
    # The same, per member address (str form); a member not listed counts 1.
    member_fingerprints: Mapping[str, int] = field(default_factory=dict)
    # A crawler name the caller verified itself (e.g. by reverse DNS); None:
    # the policy verifies from the User-Agent and the crawler's ranges.
    verified_crawler: str | None = None
    # An agent name the caller established (e.g. a signed request); None: the
    # policy matches the User-Agent against the agents' tokens.
    declared_agent: str | None = None
    ja4: str | None = None  # the client's JA4, for fingerprint-scoped verdicts
    flows: tuple[str, ...] = ()  # the client's live flows "src:port->dst:port"
    now: float | None = None  # default: Risk.ts


def ja4_target(ja4: str, scope: str | None = None) -> str:
    """A TargetKind.JA4 target: the JA4 alone (every new flow with it), or
    "<ja4>@<address or CIDR>" (new flows with it from that scope only). JA4
    strings hold only [a-z0-9_], so the '@' is unambiguous."""
    return f"{ja4}@{scope}" if scope else ja4


def parse_ja4_target(target: str) -> tuple[str, str | None]:
    """(ja4, scope or None), the inverse of ja4_target."""
    ja4, _, scope = target.partition("@")
    return ja4, scope or None


@dataclass(slots=True)
class _Verdict:
    """What precedence chose for one address, before the guards narrow it."""

    action: Action
    rule: str
    reason: str
    ttl_s: float
    shadow: bool
    connections_per_s: float = 0.0
    packets_per_s: float = 0.0
    tarpit_syns: int = 0
    escalates: bool = False  # score-driven verdicts escalate; identity ones do not


class PolicyEngine:
    """Applies a Policy to risks; holds the escalation memory across reloads."""

    def __init__(self, policy: Policy, escalation: Escalation | None = None) -> None:
        self._policy = policy
        self.escalation = (
            escalation if escalation is not None else Escalation(policy.config.escalation)
        )

    @property
    def policy(self) -> Policy:
        return self._policy

    def reload(self, policy: Policy) -> None:
        """Swaps in a validated policy; who offended before still counts."""
        self._policy = policy
        self.escalation.config = policy.config.escalation

    def decide(self, risk: Risk, ctx: DecisionContext) -> list[Decision]:
        """The decisions for one risk: [] when nothing applies (score below
        every threshold and no allow, crawler or agent entry)."""
        now = ctx.now if ctx.now is not None else risk.ts
        kind = risk.key[0]
        client = self._client(risk.key, ctx)
        out: list[Decision] = []
        if kind == "addr":
            assert client is not None
            self._address(risk, ctx, client, True, None, False, now, out)
            return out

        # A cluster: a campaign seen from many addresses behind one stack.
        cluster_ja4, scope = _cluster_ja4(risk.key)
        rule = self._policy.rule_for(risk.score, ctx.endpoint_class)
        ja4_blocks = False
        if cluster_ja4 is not None and rule is not None:
            # Blocks every new flow whose ClientHello matches, from addresses
            # not seen yet too; the kernel has no per-JA4 throttle or tarpit,
            # so below a block the cluster itself is recorded, not enforced.
            ja4_blocks = rule.action in (Action.BLOCK, Action.BLOCK_FLOW)
            verdict = self._rule_verdict(rule, risk)
            verdict.action = Action.BLOCK_FLOW if ja4_blocks else Action.MONITOR
            self._emit(out, risk, verdict, TargetKind.JA4, ja4_target(cluster_ja4, scope), now)
        seen: set[IPAddress] = set()
        if client is not None:
            seen.add(client)
            self._address(risk, ctx, client, True, cluster_ja4, ja4_blocks, now, out)
        if rule is None:
            return out
        for member in ctx.members:
            addr = normalize_address(member)
            if addr in seen:
                continue
            seen.add(addr)
            if addr in self._policy.crawler_ranges and addr not in self._policy.allow:
                continue  # a crawler's own address: never swept up in a campaign verdict
            self._address(risk, ctx, addr, False, cluster_ja4, ja4_blocks, now, out)
        return out

    # ---- one address ----

    def _address(
        self,
        risk: Risk,
        ctx: DecisionContext,
        addr: IPAddress,
        is_client: bool,
        cluster_ja4: str | None,
        ja4_covered: bool,
        now: float,
        out: list[Decision],
    ) -> None:
        verdict = self._choose(risk, ctx, addr, is_client)
        if verdict is None:
            return
        target = str(addr)
        if verdict.action is Action.ALLOW:
            self._emit(out, risk, verdict, TargetKind.ADDRESS, target, now)
            return
        fingerprints = (
            ctx.fingerprints_at_address if is_client else ctx.member_fingerprints.get(target, 1)
        )
        # When the cluster's own JA4 verdict already blocks new flows with this
        # JA4 everywhere, a per-address JA4 block would only repeat it.
        ja4 = None if ja4_covered else (cluster_ja4 or (ctx.ja4 if is_client else None))
        flows = ctx.flows if is_client else ()

        if verdict.action in ADDRESS_SCOPED and risk.evidence <= {"syn"}:
            # Guarantee 3: a SYN's source address can be forged, so a SYN
            # alone (or no evidence at all) never enforces on an address: a
            # spoofer could otherwise get any victim blocked. A completed
            # handshake (tls, http, flow, app evidence) proves the address.
            verdict.rule += "/syn_only"
            verdict.reason += " [SYN-only evidence: the address is not enforced]"
            verdict.action = Action.MONITOR
        elif verdict.action in ADDRESS_SCOPED and (
            fingerprints >= self._policy.config.shared_address.min_fingerprints
        ):
            # Many stacks behind one address: CGNAT or a corporate proxy. An
            # address verdict would hit every device behind it, so only the
            # offending fingerprint's flows are blocked. A throttle has no
            # per-fingerprint form in the kernel, so it only records.
            verdict.rule += "/shared_address"
            verdict.reason += f" [shared address: {fingerprints} fingerprints]"
            verdict.action = (
                Action.MONITOR if verdict.action is Action.THROTTLE else Action.BLOCK_FLOW
            )

        if verdict.action is Action.BLOCK_FLOW:
            if not self._flow_scoped(out, risk, verdict, target, ja4, flows, now):
                verdict.action = Action.MONITOR
                if ja4_covered:
                    verdict.reason += " [its new flows fall under the cluster's JA4 block]"
                else:
                    verdict.rule += "/no_flow"
                    verdict.reason += " [no flow or JA4 known to block]"
                self._emit(out, risk, verdict, TargetKind.ADDRESS, target, now)
            return
        self._emit(out, risk, verdict, TargetKind.ADDRESS, target, now)

    def _choose(
        self, risk: Risk, ctx: DecisionContext, addr: IPAddress, is_client: bool
    ) -> _Verdict | None:
        """Precedence: allow list, verified crawler, declared agent, thresholds."""
        policy = self._policy
        if addr in policy.allow:
            return _Verdict(
                Action.ALLOW,
                "allow_list",
                f"allow list: {policy.allow.covering(addr)}",
                policy.config.allow.ttl_s,
                shadow=False,
            )
        if is_client:
            crawler = self._verified_crawler(ctx, addr)
            if crawler is not None:
                return _Verdict(
                    Action.THROTTLE,
                    f"crawler:{crawler.name}",
                    f"verified crawler {crawler.name}: User-Agent and address match",
                    crawler.ttl_s,
                    policy.shadow or crawler.shadow,
                    crawler.connections_per_s,
                    crawler.packets_per_s,
                )
            agent = self._declared_agent(ctx, addr)
            if agent is not None and (
                agent.score_override is None or risk.score < agent.score_override
            ):
                return self._agent_verdict(agent)
        rule = policy.rule_for(risk.score, ctx.endpoint_class)
        return self._rule_verdict(rule, risk) if rule is not None else None

    def spared_from_ja4_verdicts(self, addr: str | IPAddress, user_agent: str | None) -> bool:
        """Whether a JA4 verdict on others must leave this client's connections
        alone: the allow list, a verified crawler, or a declared agent the
        policy lets in (allow or limit). A JA4 is a whole client stack, and the
        crawler or agent may well run the same library as a campaign."""
        address = normalize_address(addr)
        if address in self._policy.allow:
            return True
        ctx = DecisionContext(client=str(address), user_agent=user_agent)
        if self._verified_crawler(ctx, address) is not None:
            return True
        agent = self._declared_agent(ctx, address)
        return agent is not None and agent.action != "block"

    def _verified_crawler(self, ctx: DecisionContext, addr: IPAddress) -> _Crawler | None:
        crawlers = self._policy.crawlers
        if ctx.verified_crawler is not None and ctx.verified_crawler in crawlers:
            return crawlers[ctx.verified_crawler]
        name = self._policy.crawler_tokens.match(ctx.user_agent)
        if name is None:
            return None
        crawler = crawlers[name]
        # The claim is checked against the ranges: an impostor outside them
        # gets no exemption and is left to the scores (the models flag it).
        return crawler if addr in crawler.ranges else None

    def _declared_agent(self, ctx: DecisionContext, addr: IPAddress) -> _Agent | None:
        agents = self._policy.agents
        if ctx.declared_agent is not None and ctx.declared_agent in agents:
            return agents[ctx.declared_agent]
        name = self._policy.agent_tokens.match(ctx.user_agent)
        if name is None:
            return None
        agent = agents[name]
        return agent if not agent.ranges or addr in agent.ranges else None

    def _agent_verdict(self, agent: _Agent) -> _Verdict:
        shadow = self._policy.shadow or agent.shadow
        rule = f"agent:{agent.name}"
        if agent.action == "block":
            return _Verdict(
                Action.BLOCK,
                rule,
                f"declared AI agent {agent.name}: blocked by policy",
                agent.ttl_s,
                shadow,
            )
        if agent.action == "limit":
            return _Verdict(
                Action.THROTTLE,
                rule,
                f"declared AI agent {agent.name}: rate-limited by policy",
                agent.ttl_s,
                shadow,
                agent.connections_per_s,
                agent.packets_per_s,
            )
        # "allow" records and enforces nothing, but never writes the kernel's
        # allow list: a User-Agent is a claim, and an allow entry would let
        # every later packet from the address skip every verdict.
        return _Verdict(
            Action.MONITOR,
            rule,
            f"declared AI agent {agent.name}: allowed by policy",
            agent.ttl_s,
            shadow,
        )

    def _rule_verdict(self, rule: Rule, risk: Risk) -> _Verdict:
        reason = risk.reasons[0].text if risk.reasons else f"risk score {risk.score:g}"
        return _Verdict(
            rule.action,
            rule.label,
            reason,
            rule.ttl_s,
            self._policy.shadow or rule.shadow,
            rule.connections_per_s,
            rule.packets_per_s,
            rule.tarpit_syns,
            escalates=True,
        )

    # ---- emitting ----

    def _flow_scoped(
        self,
        out: list[Decision],
        risk: Risk,
        verdict: _Verdict,
        addr: str,
        ja4: str | None,
        flows: tuple[str, ...],
        now: float,
    ) -> bool:
        """Flow blocks for one fingerprint at one address: its live flows, and
        new flows with its JA4 from this address. False if neither is known."""
        if not ja4 and not flows:
            return False
        verdict.action = Action.BLOCK_FLOW
        if ja4:
            self._emit(out, risk, verdict, TargetKind.JA4, ja4_target(ja4, addr), now)
        for flow in flows:
            self._emit(out, risk, verdict, TargetKind.FLOW, flow, now)
        return True

    def _emit(
        self,
        out: list[Decision],
        risk: Risk,
        verdict: _Verdict,
        kind: TargetKind,
        target: str,
        now: float,
    ) -> None:
        ttl = verdict.ttl_s
        if verdict.escalates and verdict.action in ENFORCING:
            # Shadow verdicts escalate too, so the record shows the TTLs that
            # enforcement would have used.
            ttl = self.escalation.ttl((kind.value, target), ttl, now)
        throttle = verdict.action is Action.THROTTLE
        out.append(
            Decision(
                action=verdict.action,
                target_kind=kind,
                target=target,
                ttl_s=ttl,
                reason=verdict.reason,
                rule=verdict.rule,
                score=risk.score,
                model_versions=dict(risk.model_versions),
                shadow=verdict.shadow and verdict.action is not Action.ALLOW,
                throttle_connections_per_s=verdict.connections_per_s if throttle else 0.0,
                throttle_packets_per_s=verdict.packets_per_s if throttle else 0.0,
                tarpit_syns=verdict.tarpit_syns if verdict.action is Action.TARPIT else 0,
            )
        )

    @staticmethod
    def _client(key: ClusterKey, ctx: DecisionContext) -> IPAddress | None:
        kind, value = key
        client = normalize_address(ctx.client) if ctx.client is not None else None
        if kind != "addr":
            return client
        keyed = normalize_address(value)
        if client is not None and client != keyed:
            raise ValueError(f"ctx.client {client} is not the risk's address {keyed}")
        return keyed


def _cluster_ja4(key: ClusterKey) -> tuple[str | None, str | None]:
    """The JA4 a cluster key names, and the address or prefix it is scoped to.

    ("ja4", J) names J everywhere. A combination key joins kinds with '+' and
    values with '|' in the same order: ("ja4+prefix", "J|203.0.113.0/24") names
    J within that prefix. A JA4 combined with a TCP or HTTP fingerprint names
    no JA4 decision: a JA4 alone is far broader than that cluster (one
    browser's JA4 is shared by millions), so only its members are decided."""
    kind, value = key
    if kind == "ja4":
        return value, None
    parts = kind.split("+")
    if len(parts) < 2 or "ja4" not in parts:
        return None, None
    # Only the last value may itself hold a '|' (HTTP fingerprints' long form).
    values = value.split("|", len(parts) - 1)
    if len(values) != len(parts):
        raise ValueError(f"cluster key {key!r}: {len(parts)} kinds but {len(values)} values")
    by_kind = dict(zip(parts, values, strict=True))
    if set(parts) - {"ja4", "addr", "prefix"}:
        return None, None
    return by_kind["ja4"], by_kind.get("addr") or by_kind.get("prefix")


__all__ = [
    "DEFAULT_CLASS_OFFSETS",
    "MAX_TTL_S",
    "DecisionContext",
    "Escalation",
    "EscalationConfig",
    "Policy",
    "PolicyConfig",
    "PolicyEngine",
    "PolicyError",
    "Rule",
    "ja4_target",
    "parse_ja4_target",
]
