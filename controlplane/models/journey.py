"""A model of the journeys people take through this API, and of the journeys
they do not: endpoint-transition probabilities learned from baseline sessions,
plus rules for impossible or mechanical orders.

A step is "METHOD /route/template" (`step()`); a session is a client's steps
in order. Transitions are bigrams over steps with START and END states,
smoothed with interpolated Kneser-Ney (absolute discount, backing off to how
many different steps lead into a step rather than how often it occurs), or
add-alpha (Laplace). A session's average log-likelihood per transition is
compared with the same quantity on held-out baseline sessions.

The rules say what the likelihood cannot put in words: checkout with no cart
before it, a catalog walked in identifier order, a login or one-time-code call
without the steps people take before it (learned: whichever predecessors
cover most of the baseline's calls), far more cart additions than any
baseline session made and no checkout (stock held hostage), and transitions
the baseline never took. Their default points sit above the likelihood's, so
when a specific rule fires it is the reason an operator reads first.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator

from controlplane.decisions import Reason
from controlplane.models import (
    Finding,
    ensure_fitted,
    fit_rarity,
    model_version,
    noisy_or,
    rarity,
    rarity_anomaly,
)
from controlplane.observations import EndpointClass, endpoint_class, path_identifier

MODEL = "journey"
START = "<start>"
END = "<end>"
UNKNOWN = "<unk>"  # a step the baseline never took

# Calls people reach through other pages; skipping those pages is scripted.
PREAMBLE_CLASSES = {EndpointClass.LOGIN: "login", EndpointClass.OTP: "otp"}
ENUMERABLE = frozenset({EndpointClass.CATALOG, EndpointClass.INVENTORY})
EVIDENCE = frozenset({"http"})


def step(method: str, route: str) -> str:
    """The token for one request: "POST /login"."""
    return f"{method.upper()} {route}"


# Memoized transition probabilities per model: derived state, kept off the
# estimator so it is never persisted with it.
_PROBABILITIES: weakref.WeakKeyDictionary[JourneyModel, dict[tuple[str, str, str], float]] = (
    weakref.WeakKeyDictionary()
)
# The same for whole sessions' findings: a session stops growing at the
# engine's STEPS_KEPT steps, and a client is scored again and again on it.
_SessionFindings = dict[tuple[object, ...], tuple[Finding, ...]]
_FINDINGS: weakref.WeakKeyDictionary[JourneyModel, _SessionFindings] = weakref.WeakKeyDictionary()
# Entries per model; past it a memo starts over. A session's entry holds its
# steps and paths (about 1 KiB at 32 steps).
PROBABILITY_MEMO_LIMIT = 200_000
FINDINGS_MEMO_LIMIT = 16_384


@functools.lru_cache(maxsize=8192)
def _step_class(token: str) -> EndpointClass:
    route = token.split(" ", 1)[1] if " " in token else token
    return endpoint_class(route)


def _is_write(token: str) -> bool:
    return token.split(" ", 1)[0] in ("POST", "PUT", "PATCH", "DELETE")


def enumeration_share(identifiers: Sequence[int]) -> tuple[float, int]:
    """(share of consecutive identifiers one fixed stride apart, stride).

    A catalog walked in order steps by +1 (or by the shop's stride) almost
    every time; a person's product ids jump around. Repeats (reloads) are
    skipped: they neither walk nor jump.
    """
    diffs = [b - a for a, b in pairwise(identifiers) if b != a]
    if not diffs:
        return 0.0, 0
    stride, count = Counter(diffs).most_common(1)[0]
    return count / len(diffs), stride


class JourneyModel(BaseEstimator):
    """Implausible journeys, from transition probabilities and rules.

    fit(sessions) with each session a list of step() tokens; score(session,
    paths=...) -> 0..1 and explain(session, paths=...) -> Reasons. paths (raw
    request paths, in the same order) are only needed for the enumeration rule;
    `enumeration`, a precomputed share of sequential identifier steps, can be
    passed instead.
    """

    kind: ClassVar[str] = "journey"

    def __init__(
        self,
        *,
        smoothing: str = "kneser_ney",
        discount: float = 0.75,
        alpha: float = 1.0,
        min_transitions: int = 3,
        alarm_rate: float = 1e-4,
        predecessor_coverage: float = 0.97,
        min_enumeration_steps: int = 8,
        min_plain_walk_steps: int = 4,
        enumeration_threshold: float = 0.8,
        unseen_threshold: float = 0.3,
        min_hoarded_items: int = 10,
        # An improbable journey alone only earns monitoring: a baseline learned
        # in minutes has not seen every path people take (several visits run
        # together into one long session, say). The specific rules below
        # (checkout without a cart, catalog walks, missing preambles,
        # hoarding) carry the enforcement.
        improbable_points: float = 40.0,
        checkout_points: float = 80.0,
        enumeration_points: float = 90.0,
        preamble_points: float = 80.0,
        preamble_min_share: float = 0.6,
        hoarding_points: float = 80.0,
        unseen_points: float = 70.0,
        holdout: float = 0.25,
        random_state: int = 0,
    ) -> None:
        self.smoothing = smoothing
        self.discount = discount
        self.alpha = alpha
        self.min_transitions = min_transitions
        self.alarm_rate = alarm_rate
        self.predecessor_coverage = predecessor_coverage
        self.min_enumeration_steps = min_enumeration_steps
        self.min_plain_walk_steps = min_plain_walk_steps
        self.enumeration_threshold = enumeration_threshold
        self.unseen_threshold = unseen_threshold
        self.min_hoarded_items = min_hoarded_items
        self.improbable_points = improbable_points
        self.checkout_points = checkout_points
        self.enumeration_points = enumeration_points
        self.preamble_points = preamble_points
        self.preamble_min_share = preamble_min_share
        self.hoarding_points = hoarding_points
        self.unseen_points = unseen_points
        self.holdout = holdout
        self.random_state = random_state

    # ---- learning ----

    def fit(self, sessions: Sequence[Sequence[str]], y: object = None) -> JourneyModel:
        if self.smoothing not in ("kneser_ney", "laplace"):
            raise ValueError(f"smoothing must be 'kneser_ney' or 'laplace', not {self.smoothing!r}")
        kept = [list(s) for s in sessions if len(s)]
        if len(kept) < 10:
            raise ValueError(f"journey needs at least 10 non-empty sessions, got {len(kept)}")
        # Likelihood thresholds come from sessions the counts did not see, or
        # every baseline session would look more typical than a new human's.
        rng = np.random.default_rng(self.random_state)
        order = rng.permutation(len(kept))
        n_held = max(int(len(kept) * self.holdout), 1)
        held = [kept[i] for i in order[:n_held]]
        self._count([kept[i] for i in order[n_held:]])
        held_ll = [ll for ll in (self._mean_log_likelihood(s) for s in held) if ll is not None]
        # The model then learns from every session.
        self._count(kept)
        # Fitted on -log-likelihood: higher is stranger.
        self.ll_rarity_ = fit_rarity(-np.asarray(held_ll)) if held_ll else None
        self.ll_typical_ = float(np.median(held_ll)) if held_ll else 0.0
        self._learn_rules(kept)
        digest = repr(sorted((v, sorted(w.items())) for v, w in self.transitions_.items()))
        self.version_ = model_version(self.kind, digest, self.smoothing)
        return self

    def _count(self, sessions: list[list[str]]) -> None:
        transitions: dict[str, Counter[str]] = {}
        for session in sessions:
            states = [START, *session, END]
            for a, b in pairwise(states):
                transitions.setdefault(a, Counter())[b] += 1
        vocabulary = sorted({s for session in sessions for s in session} | {END})
        into: Counter[str] = Counter()  # how many different steps lead into each
        for following in transitions.values():
            into.update(following.keys())
        self.vocabulary_ = vocabulary
        self.transitions_ = {a: dict(b) for a, b in transitions.items()}
        self.context_totals_ = {a: sum(b.values()) for a, b in transitions.items()}
        self.continuation_ = dict(into)
        self.bigram_types_ = sum(len(b) for b in transitions.values())

    def _learn_rules(self, sessions: list[list[str]]) -> None:
        # For each login/otp write: the predecessors that cover most of its
        # baseline calls. Rarer ones (a person's retry) are not "usual".
        before: dict[str, Counter[str]] = {}
        checkouts = without_cart = 0
        cart_writes = []
        for session in sessions:
            cart_writes.append(
                sum(1 for t in session if _step_class(t) == EndpointClass.CART and _is_write(t))
            )
            states = [START, *session]
            seen_cart = False
            for prev, token in pairwise(states):
                cls = _step_class(token)
                if cls in PREAMBLE_CLASSES and _is_write(token):
                    before.setdefault(token, Counter())[prev] += 1
                if cls == EndpointClass.CHECKOUT and _is_write(token):
                    checkouts += 1
                    without_cart += not seen_cart
                seen_cart = seen_cart or cls == EndpointClass.CART
        usual: dict[str, list[str]] = {}
        for token, counts in before.items():
            total, covered, chosen = sum(counts.values()), 0, []
            for prev, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                if covered >= self.predecessor_coverage * total:
                    break
                chosen.append(prev)
                covered += n
            usual[token] = chosen
        self.usual_predecessors_ = usual
        # If people here often check out without a cart step (a cart kept from
        # an earlier visit), the rule says little on this host.
        self.checkout_without_cart_rate_ = without_cart / checkouts if checkouts else 0.0
        self.max_cart_writes_ = int(max(cart_writes, default=0))

    # ---- probabilities ----

    def probability(self, prev: str, token: str) -> float:
        """P(token | prev), smoothed; unknown steps share the mass of UNKNOWN.
        Memoized per fitted state: a site has few steps and scoring asks again
        and again for the same transitions."""
        version = getattr(self, "version_", None)
        if version is None:  # while fitting
            return self._probability(prev, token)
        cache = _PROBABILITIES.setdefault(self, {})
        key = (version, prev, token)
        p = cache.get(key)
        if p is None:
            if len(cache) > PROBABILITY_MEMO_LIMIT:
                cache.clear()
            p = cache[key] = self._probability(prev, token)
        return p

    def _probability(self, prev: str, token: str) -> float:
        token = token if token in self.vocabulary_ or token == END else UNKNOWN
        size = len(self.vocabulary_) + 1  # + UNKNOWN
        following = self.transitions_.get(prev)
        count = following.get(token, 0) if following else 0
        total = self.context_totals_.get(prev, 0)
        if self.smoothing == "laplace":
            return (count + self.alpha) / (total + self.alpha * size)
        # Continuation probability, itself add-one smoothed so a step that
        # never followed anything (or UNKNOWN) keeps some mass.
        p_cont = (self.continuation_.get(token, 0) + 1.0) / (self.bigram_types_ + size)
        if not total:
            return p_cont
        d = self.discount
        backoff = d * len(following or {}) / total
        return max(count - d, 0.0) / total + backoff * p_cont

    def _mean_log_likelihood(self, session: Sequence[str]) -> float | None:
        states = [START, *session, END]
        if len(states) - 1 < self.min_transitions:
            return None
        logs = [math.log(self.probability(self._state(a), b)) for a, b in pairwise(states)]
        return sum(logs) / len(logs)

    def mean_log_likelihood(self, session: Sequence[str]) -> float | None:
        """Average log-probability per transition, START and END included;
        None for a session too short to judge."""
        ensure_fitted(self)
        return self._mean_log_likelihood(session)

    def _state(self, token: str) -> str:
        return token if token in self.transitions_ or token == START else UNKNOWN

    # ---- scoring ----

    def findings(
        self,
        session: Sequence[str],
        paths: Sequence[str] | None = None,
        enumeration: float | None = None,
    ) -> list[Finding]:
        ensure_fitted(self)
        memo = _FINDINGS.setdefault(self, {})
        key = (
            self.version_,
            tuple(session),
            None if paths is None else tuple(paths),
            enumeration,
        )
        found = memo.get(key)
        if found is None:
            if len(memo) > FINDINGS_MEMO_LIMIT:
                memo.clear()
            found = memo[key] = tuple(self._findings(list(session), paths, enumeration))
        return list(found)

    def _findings(
        self, session: list[str], paths: Sequence[str] | None, enumeration: float | None
    ) -> list[Finding]:
        generic = [*self._improbable(session), *self._unseen(session)]
        specific = [
            *self._checkout_without_cart(session),
            *self._enumeration(session, paths, enumeration),
            *self._missing_preamble(session),
            *self._hoarding(session),
        ]
        # A walk in identifier order or a loop of cart additions is also an
        # improbable session full of unseen transitions: when a specific rule
        # is at least as sure, the generic findings describe the same
        # behaviour and counting them too would count it twice.
        strongest = max((f.reason.points for f in specific), default=0.0)
        found = specific + [f for f in generic if f.reason.points > strongest]
        found.sort(key=lambda f: -f.reason.points)
        return found

    def score(
        self,
        session: Sequence[str],
        paths: Sequence[str] | None = None,
        enumeration: float | None = None,
    ) -> float:
        return noisy_or(f.probability for f in self.findings(session, paths, enumeration))

    def explain(
        self,
        session: Sequence[str],
        paths: Sequence[str] | None = None,
        enumeration: float | None = None,
    ) -> list[Reason]:
        return [f.reason for f in self.findings(session, paths, enumeration)]

    # ---- rules ----

    def _finding(self, code: str, text: str, points: float) -> Finding:
        return Finding(Reason(code, text, round(points, 1), MODEL), evidence=EVIDENCE)

    def _improbable(self, session: list[str]) -> list[Finding]:
        ll = self._mean_log_likelihood(session)
        if ll is None or self.ll_rarity_ is None:
            return []
        p = float(rarity_anomaly(rarity(-ll, self.ll_rarity_), alarm_rate=self.alarm_rate))
        if p < 0.05:
            return []
        text = (
            f"journey of {len(session)} requests is less likely than nearly all of this "
            f"host's sessions (mean transition probability {math.exp(ll):.3f}, usually "
            f"{math.exp(self.ll_typical_):.3f})"
        )
        return [self._finding("journey_improbable", text, self.improbable_points * p)]

    def _checkout_without_cart(self, session: list[str]) -> list[Finding]:
        for i, token in enumerate(session):
            cls = _step_class(token)
            if cls == EndpointClass.CART:
                return []
            if cls == EndpointClass.CHECKOUT and _is_write(token):
                points = self.checkout_points * (1.0 - self.checkout_without_cart_rate_)
                text = f"{token} at request {i + 1} with no cart request before it"
                return [self._finding("checkout_without_cart", text, points)]
        return []

    def _enumeration(
        self, session: list[str], paths: Sequence[str] | None, enumeration: float | None
    ) -> list[Finding]:
        if paths is not None:
            ids = [
                ident
                for token, path in zip(session, paths, strict=False)
                if _step_class(token) in ENUMERABLE and (ident := path_identifier(path)) is not None
            ]
            share, stride = enumeration_share(ids)
            # Any stride needs min_enumeration_steps ids: over a few ids, some
            # stride repeats by chance. Ids 1, 2, 3, 4 in a row do not: a
            # plain +1 walk is caught after min_plain_walk_steps.
            plain_walk = share == 1.0 and stride == 1
            needed = self.min_plain_walk_steps if plain_walk else self.min_enumeration_steps
            if len(ids) < needed:
                return []
            walked = f"{len(ids)} catalog requests walked identifiers {ids[0]}..{ids[-1]}"
            detail = f"{walked}, {100 * share:.0f}% of steps exactly {stride:+d}"
        elif enumeration is not None:
            share = enumeration
            detail = f"{100 * share:.0f}% of catalog steps went to the next identifier"
        else:
            return []
        if share < self.enumeration_threshold:
            return []
        strength = (share - self.enumeration_threshold) / max(1 - self.enumeration_threshold, 1e-9)
        points = self.enumeration_points * (0.7 + 0.3 * strength)
        return [self._finding("catalog_enumeration", f"catalog walked in order: {detail}", points)]

    def _missing_preamble(self, session: list[str]) -> list[Finding]:
        states = [START, *session]
        missing: Counter[str] = Counter()
        calls: Counter[str] = Counter()
        for prev, token in pairwise(states):
            cls = _step_class(token)
            if cls not in PREAMBLE_CLASSES or not _is_write(token):
                continue
            calls[token] += 1
            usual = self.usual_predecessors_.get(token)
            # A call the baseline never made has no usual preamble to skip;
            # the unseen-transition rule speaks for it.
            # Anything else done first is a preamble of sorts: a person who
            # logs in from a page (or from the cart, to check out) the baseline
            # rarely saw before one still did something else first. A session
            # start, or the same call again (a loop), is not.
            if usual is not None and prev not in usual and prev in (START, token):
                missing[token] += 1
        reads_pages = any(not _is_write(t) for t in session)
        out = []
        for token, n in sorted(missing.items()):
            usual = self.usual_predecessors_[token]
            words = " or ".join("the session start" if u == START else u for u in usual[:3])
            share = n / calls[token]
            # A person's odd call (a login after a page the baseline rarely
            # saw before one) is a minority of their calls among pages they
            # read; a stuffer reads no page at all, and its repeated logins
            # look like a person's retries after the first.
            if not reads_pages:
                share = max(share, self.preamble_min_share)
            elif share < self.preamble_min_share:
                continue
            points = self.preamble_points * share
            name = PREAMBLE_CLASSES[_step_class(token)]
            text = (
                f"{n} of {calls[token]} {token} calls came without what usually precedes "
                f"them here ({words})"
            )
            out.append(self._finding(f"{name}_without_preamble", text, points))
        return out

    def _hoarding(self, session: list[str]) -> list[Finding]:
        writes = [t for t in session if _step_class(t) == EndpointClass.CART and _is_write(t)]
        if any(_step_class(t) == EndpointClass.CHECKOUT and _is_write(t) for t in session):
            return []
        limit = max(self.min_hoarded_items, 2 * self.max_cart_writes_)
        if len(writes) < limit:
            return []
        text = (
            f"{len(writes)} cart additions and no checkout; no baseline session "
            f"made more than {self.max_cart_writes_}"
        )
        return [self._finding("cart_hoarding", text, self.hoarding_points)]

    def _unseen(self, session: list[str]) -> list[Finding]:
        states = [START, *session, END]
        pairs = list(pairwise(states))
        unseen = [(a, b) for a, b in pairs if not self.transitions_.get(a, {}).get(b)]
        share = len(unseen) / len(pairs)
        if len(unseen) < 2 or share < self.unseen_threshold:
            return []
        kinds = Counter(unseen).most_common(2)
        examples = "; ".join(f"{a} -> {b}" for (a, b), _ in kinds)
        text = (
            f"{len(unseen)} of {len(pairs)} transitions never occur in this host's "
            f"baseline, e.g. {examples}"
        )
        points = self.unseen_points * min(1.0, 0.5 + 0.5 * share)
        return [self._finding("unseen_transition", text, points)]


__all__ = ["END", "START", "UNKNOWN", "JourneyModel", "enumeration_share", "step"]
