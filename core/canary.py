"""Canary rollouts: a new version serves a share of callers until live signals promote it or roll it back.

State (all in Redis, so every replica routes alike; keys in core/keys.py):

- `<p>:active_version` — the **incumbent**: the promoted version (align trains from it, never from a canary);
- `<p>:canary` — hash `version, incumbent, share, since, run` while a canary runs, absent otherwise;
- `<p>:canary:signals:<run>` — hash `<role>.<signal>` that every replica adds its live signals to;
- `<p>:version_events` (stream), `<p>:version_log:<version>` (list) and the `<p>:events` pub/sub channel —
  every transition, written in the same atomic step as the state change.

Every transition (start, promote, roll back, a direct activation that ends a canary) is one Lua script:
it checks the state it expects (the canary run a replica judged), changes it, and writes the event, the
version's log line, the decision counter and the pub/sub message — all or nothing. Several replicas judge
the same canary; the first script to run wins and the others find the run gone (`Transition.applied` False).

Routing (`assign`): a caller is in the canary's share when the hash of (run, identity) falls below the
share. The identity is the authenticated key id plus the request's `user` field (`routing_identity`), so
one caller always lands on the same version for the whole run, on every replica, with no shared table;
the run id salts the hash so each canary meets a different cohort.

The decision rule (`evaluate`, documented in docs/architecture.md "Canary"): no decision before both
versions served `min_requests` and `min_duration_s` passed; then the canary is rolled back when any
signal is significantly worse than the incumbent's — one-sided Fisher exact tests on the error,
policy-violation and negative-feedback (thumbs down or correction) rates per request and on the
thumbs-up rate per request (lower), a one-sided Welch z-test on the mean rating, Bonferroni-corrected
(each test at alpha / number of tests run) — or when its mean TTFT exceeds `max_ttft_ratio` times the
incumbent's; otherwise it is promoted. Before the minimums, a canary that is clearly broken (error,
violation or negative-feedback rate worse at the much stricter `early_alpha`, on at least `early_min_requests`
each) is rolled back at once (`_early`); nothing is promoted early. The tests are hand-written on `math.lgamma` and
`statistics.NormalDist` because scipy is not a dependency and the two formulas are short.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from statistics import NormalDist
from typing import Any, Literal

import redis

from core.keys import Keys
from core.records import BASE

__all__ = [
    "CanaryError",
    "CanaryState",
    "Criteria",
    "Rollout",
    "Signals",
    "Transition",
    "Verdict",
    "assign",
    "evaluate",
    "routing_identity",
]

Role = Literal["canary", "incumbent"]
ROLES: tuple[Role, Role] = ("canary", "incumbent")
Decision = Literal["promote", "rollback"]
Trigger = Literal["auto", "operator", "align"]

SIGNALS_TTL_S = 7 * 86400
"""How long a finished run's signals stay in Redis for inspection."""
EVENTS_MAXLEN = 10_000
"""Approximate length the version-events stream is trimmed to (the per-version logs keep everything)."""


class CanaryError(Exception):
    """A transition Redis refused (no canary running, another one than named, unknown version); says why."""


# -- state -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryState:
    """A running canary, as `<p>:canary` holds it."""

    version: str
    incumbent: str
    share: float
    since: float
    run: str

    @classmethod
    def parse(cls, raw: Mapping[Any, Any]) -> CanaryState | None:
        """From HGETALL's reply (bytes or str); None when no canary runs or the hash is incomplete."""
        d = {_s(k): _s(v) for k, v in raw.items()}
        try:
            return cls(d["version"], d["incumbent"], float(d["share"]), float(d["since"]), d["run"])
        except (KeyError, ValueError):
            return None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def routing_identity(key_id: str | None, user: str | None) -> str:
    """Who a request is, for sticky routing: the authenticated key id and the request's `user` field."""
    return f"{key_id or '-'}\x00{user or ''}"


def assign(run: str, share: float, identity: str) -> bool:
    """True when `identity` is in the canary's share for this run: stable per (run, identity)."""
    digest = hashlib.sha256(f"{run}\x00{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


# -- transitions -------------------------------------------------------------------------------------------

# KEYS: 1 canary hash, 2 active version, 3 versions hash, 4 version-events stream, 5 decisions hash.
# ARGV: 1 op (start|activate|promote|rollback), 2 version (start/activate: the version; promote/rollback: the
# canary it must be, or ""), 3 run (start: the new run id; promote/rollback: the run judged, or ""), 4 share,
# 5 now, 6 trigger, 7 reason, 8 key prefix, 9 pub/sub channel, 10 signals TTL, 11 stream maxlen.
# Returns {1, event JSON} when applied, {0, why not}.
_TRANSITION_LUA = """
local op, version, run, share, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local trigger, reason, prefix, channel = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local function emit(event)
  local data = cjson.encode(event)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*', 'schema', '1', 'type', event.type,
             'version', event.version, 'data', data)
  redis.call('RPUSH', prefix .. ':version_log:' .. event.version, data)
  return data
end
local function finish(kind, counted)
  local c = redis.call('HGETALL', KEYS[1])
  local s = {}
  for i = 1, #c, 2 do s[c[i]] = c[i + 1] end
  if not s.run then return nil end
  redis.call('DEL', KEYS[1])
  redis.call('EXPIRE', prefix .. ':canary:signals:' .. s.run, ARGV[10])
  if counted then redis.call('HINCRBY', KEYS[5], kind .. '.' .. trigger, 1) end
  local types = {promote = 'promoted', rollback = 'rolled_back', superseded = 'superseded'}
  return emit({type = types[kind], version = s.version, incumbent = s.incumbent, run = s.run,
               share = tonumber(s.share), since = tonumber(s.since), time = now, trigger = trigger, reason = reason})
end
local incumbent = redis.call('GET', KEYS[2]) or 'base'
if op == 'start' or op == 'activate' then
  if version ~= 'base' and redis.call('HEXISTS', KEYS[3], version) == 0 then
    return {0, 'version ' .. version .. ' is not in the registry'}
  end
  if op == 'start' and version == incumbent then
    return {0, version .. ' is already the promoted version'}
  end
  local ended = finish('superseded', true)
  if ended then redis.call('PUBLISH', channel, ended) end
  if op == 'activate' then
    redis.call('SET', KEYS[2], version)
    emit({type = 'activated', version = version, previous = incumbent, time = now, trigger = trigger, reason = reason})
    local msg = cjson.encode({type = 'activated', version = version})
    redis.call('PUBLISH', channel, msg)
    return {1, msg}
  end
  redis.call('HSET', KEYS[1], 'version', version, 'incumbent', incumbent, 'share', share, 'since', ARGV[5], 'run', run)
  local data = emit({type = 'canary_started', version = version, incumbent = incumbent, run = run,
                     share = tonumber(share), since = now, time = now, trigger = trigger, reason = reason})
  redis.call('PUBLISH', channel, data)
  return {1, data}
end
local current = redis.call('HGET', KEYS[1], 'run')
if not current then return {0, 'no canary is running'} end
if run ~= '' and run ~= current then return {0, 'the canary run ' .. run .. ' is over'} end
local canary = redis.call('HGET', KEYS[1], 'version')
if version ~= '' and version ~= canary then return {0, 'the running canary is ' .. canary .. ', not ' .. version} end
if op == 'promote' then redis.call('SET', KEYS[2], canary) end
local data = finish(op, true)
redis.call('PUBLISH', channel, data)
return {1, data}
"""


@dataclass(frozen=True)
class Transition:
    applied: bool
    event: dict[str, Any] | None = None
    """The event written (stream, version log, pub/sub) when applied."""
    refusal: str | None = None
    """Why not, when not applied (no canary, another run, unknown version)."""


def _transition_args(
    keys: Keys,
    op: str,
    *,
    version: str = "",
    run: str = "",
    share: float = 0.0,
    trigger: str = "operator",
    reason: str = "",
) -> list[Any]:
    """The EVAL arguments (numkeys, KEYS, ARGV) of one transition."""
    key_list = [keys.canary, keys.active_version, keys.versions, keys.version_events, keys.canary_decisions]
    argv = [op, version, run, repr(float(share)), repr(time.time()), trigger, reason[:500], keys.prefix, keys.events]
    return [len(key_list), *key_list, *argv, SIGNALS_TTL_S, EVENTS_MAXLEN]


def _transition_result(reply: Any) -> Transition:
    ok, payload = int(reply[0]), _s(reply[1])
    return Transition(True, json.loads(payload)) if ok else Transition(False, refusal=payload)


def new_run(version: str) -> str:
    """A run id: the version and a random suffix (the same version may run as a canary again later)."""
    return f"{version}.{secrets.token_hex(4)}"


async def atransition(client: Any, keys: Keys, op: str, **kw: Any) -> Transition:
    """`Rollout`'s transitions on a redis.asyncio client (serve's judge)."""
    return _transition_result(await client.eval(_TRANSITION_LUA, *_transition_args(keys, op, **kw)))


async def aread(client: Any, keys: Keys) -> tuple[str, CanaryState | None]:
    """The incumbent and the running canary, read in one round trip (redis.asyncio)."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.get(keys.active_version)
        pipe.hgetall(keys.canary)
        active, raw = await pipe.execute()
    return (_s(active) if active is not None else BASE), CanaryState.parse(raw or {})


class Rollout:
    """Start, promote and roll back canaries on a synchronous client (the CLI, align, `Registry.activate`)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def _run(self, op: str, **kw: Any) -> Transition:
        return _transition_result(self.client.eval(_TRANSITION_LUA, *_transition_args(self.keys, op, **kw)))

    def state(self) -> CanaryState | None:
        return CanaryState.parse(self.client.hgetall(self.keys.canary))  # type: ignore[arg-type]

    def start(self, version: str, share: float, *, trigger: Trigger = "operator", reason: str = "") -> dict[str, Any]:
        """Make `version` the canary for `share` of callers; a canary already running is ended as superseded."""
        if not 0.0 < share < 1.0:
            raise CanaryError(f"share: must be between 0 and 1 exclusive (got {share}); e.g. 0.2 for a fifth")
        done = self._run("start", version=version, run=new_run(version), share=share, trigger=trigger, reason=reason)
        return self._applied(done)

    def activate(self, version: str, *, trigger: Trigger = "operator", reason: str = "") -> dict[str, Any]:
        """Serve `version` to everyone now; a running canary is ended as superseded."""
        return self._applied(self._run("activate", version=version, trigger=trigger, reason=reason))

    def promote(
        self, version: str | None = None, *, run: str = "", trigger: Trigger = "operator", reason: str = ""
    ) -> dict[str, Any]:
        """The running canary (which must be `version`, when given) becomes the incumbent."""
        return self._applied(self._run("promote", version=version or "", run=run, trigger=trigger, reason=reason))

    def rollback(self, *, run: str = "", trigger: Trigger = "operator", reason: str = "") -> dict[str, Any]:
        """End the running canary; the incumbent serves everyone again."""
        return self._applied(self._run("rollback", run=run, trigger=trigger, reason=reason))

    def signals(self, run: str) -> dict[Role, Signals]:
        return Signals.parse(self.client.hgetall(self.keys.canary_signals(run)))  # type: ignore[arg-type]

    def history(self, version: str) -> list[dict[str, Any]]:
        """The version's events, oldest first (its rollout record)."""
        return [json.loads(line) for line in self.client.lrange(self.keys.version_log(version), 0, -1)]  # type: ignore[union-attr]

    @staticmethod
    def _applied(done: Transition) -> dict[str, Any]:
        if not done.applied:
            raise CanaryError(done.refusal or "refused")
        assert done.event is not None
        return done.event


# -- signals -----------------------------------------------------------------------------------------------


@dataclass
class Signals:
    """What one version did during one canary run, summed over every replica."""

    requests: int = 0
    errors: int = 0
    violations: int = 0
    """Requests in which an output policy rule matched the model's text."""
    ttft_sum: float = 0.0
    ttft_count: int = 0
    feedback: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    corrections: int = 0
    negative: int = 0
    """Feedback events with a thumbs down or a correction (one per event, even with both)."""
    ratings: int = 0
    rating_sum: float = 0.0
    rating_sumsq: float = 0.0

    @classmethod
    def parse(cls, raw: Mapping[Any, Any]) -> dict[Role, Signals]:
        """From HGETALL of `<p>:canary:signals:<run>` (fields `<role>.<signal>`); unknown fields are ignored."""
        out: dict[Role, Signals] = {"canary": cls(), "incumbent": cls()}
        names = {f.name: f.type for f in fields(cls)}
        for k, v in raw.items():
            role, _, name = _s(k).partition(".")
            if role in out and name in names:
                value = float(_s(v))
                setattr(out[role], name, value if "float" in str(names[name]) else int(value))  # type: ignore[index]
        return out

    @property
    def ttft_mean(self) -> float | None:
        return self.ttft_sum / self.ttft_count if self.ttft_count else None

    @property
    def rating_mean(self) -> float | None:
        return self.rating_sum / self.ratings if self.ratings else None


# -- the decision rule -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criteria:
    """When and how a canary is judged (serve's `canary_*` settings)."""

    min_requests: int = 200
    min_duration_s: float = 1800.0
    alpha: float = 0.05
    max_ttft_ratio: float = 1.5
    min_ratings: int = 20
    early_alpha: float = 0.001
    """Level of the early rollback (0: none): see `evaluate`."""
    early_min_requests: int = 20


@dataclass
class Verdict:
    decision: Literal["promote", "rollback", "wait"]
    reason: str
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per check: canary and incumbent values, the p-value (tests) and whether the canary is worse."""


def fisher_greater(a: int, n1: int, c: int, n2: int) -> float:
    """One-sided Fisher exact p-value that a/n1 is a higher rate than c/n2 (P(X >= a) under the hypergeometric)."""
    a, c = min(a, n1), min(c, n2)  # a caller can send more than one feedback event per completion
    total, events = n1 + n2, a + c
    if n1 == 0 or n2 == 0 or events == 0:
        return 1.0

    def log_comb(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    denom = log_comb(total, n1)
    terms = [
        log_comb(events, x) + log_comb(total - events, n1 - x) - denom
        for x in range(a, min(events, n1) + 1)
        if n1 - x <= total - events
    ]
    if not terms:
        return 0.0
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def welch_less(c: Signals, i: Signals) -> float:
    """One-sided p-value that the canary's mean rating is lower than the incumbent's (Welch z, normal tail)."""
    mc, mi = c.rating_sum / c.ratings, i.rating_sum / i.ratings
    vc = max(0.0, c.rating_sumsq / c.ratings - mc * mc) * c.ratings / max(1, c.ratings - 1)
    vi = max(0.0, i.rating_sumsq / i.ratings - mi * mi) * i.ratings / max(1, i.ratings - 1)
    se = math.sqrt(vc / c.ratings + vi / i.ratings)
    if se == 0.0:
        return 0.0 if mc < mi else 1.0
    return 1.0 - NormalDist().cdf((mi - mc) / se)


def evaluate(canary: Signals, incumbent: Signals, elapsed_s: float, criteria: Criteria) -> Verdict:
    """Promote, roll back, or wait for more data; see the module docstring for the rule."""
    missing = []
    if elapsed_s < criteria.min_duration_s:
        missing.append(f"{elapsed_s:.0f}s of {criteria.min_duration_s:.0f}s")
    for role, s in (("canary", canary), ("incumbent", incumbent)):
        if s.requests < criteria.min_requests:
            missing.append(f"{role} {s.requests} of {criteria.min_requests} requests")
    # (name, canary events, incumbent events, higher_is_worse)
    rates = [
        ("error_rate", canary.errors, incumbent.errors, True),
        ("violation_rate", canary.violations, incumbent.violations, True),
        ("negative_feedback_rate", canary.negative, incumbent.negative, True),
        ("thumbs_up_rate", canary.thumbs_up, incumbent.thumbs_up, False),
    ]
    if missing:
        return _early(canary, incumbent, rates[:3], criteria) or Verdict(
            "wait", "not enough data yet: " + ", ".join(missing)
        )

    p_values: dict[str, float] = {}
    checks: dict[str, dict[str, Any]] = {}
    for name, ce, ie, higher_worse in rates:
        p_values[name] = p = _rate_p(canary, incumbent, ce, ie, higher_worse)
        checks[name] = {"canary": ce / canary.requests, "incumbent": ie / incumbent.requests, "p": p}
    if canary.ratings >= criteria.min_ratings and incumbent.ratings >= criteria.min_ratings:
        p_values["mean_rating"] = p = welch_less(canary, incumbent)
        checks["mean_rating"] = {"canary": canary.rating_mean, "incumbent": incumbent.rating_mean, "p": p}
    level = criteria.alpha / len(p_values)  # Bonferroni: one false rollback in 1/alpha at most, over all tests
    worse = []
    for name, p in p_values.items():
        checks[name]["worse"] = p < level
        if p < level:
            worse.append(f"{name} {checks[name]['canary']:.3g} vs {checks[name]['incumbent']:.3g} (p={p:.2g})")
    c_ttft, i_ttft = canary.ttft_mean, incumbent.ttft_mean
    if c_ttft is not None and i_ttft is not None:
        slow = c_ttft > criteria.max_ttft_ratio * i_ttft
        checks["ttft"] = {"canary": c_ttft, "incumbent": i_ttft, "max_ratio": criteria.max_ttft_ratio, "worse": slow}
        if slow:
            worse.append(f"mean TTFT {c_ttft:.3g}s vs {i_ttft:.3g}s (over {criteria.max_ttft_ratio}x)")
    if worse:
        return Verdict("rollback", "worse than the incumbent: " + "; ".join(worse), checks)
    return Verdict("promote", f"not worse than the incumbent on {len(checks)} checks (alpha {criteria.alpha})", checks)


def _rate_p(canary: Signals, incumbent: Signals, ce: int, ie: int, higher_worse: bool) -> float:
    if higher_worse:
        return fisher_greater(ce, canary.requests, ie, incumbent.requests)
    return fisher_greater(ie, incumbent.requests, ce, canary.requests)


def _early(
    canary: Signals, incumbent: Signals, rates: list[tuple[str, int, int, bool]], criteria: Criteria
) -> Verdict | None:
    """A rollback before the minimums, for a canary that is clearly broken; None when there is no such evidence.

    The minimums give the full rule its power to *promote*; waiting them out while a canary fails or violates
    policy on a large share of its requests hurts its users for nothing. So once both sides served
    `early_min_requests`, the error, policy-violation and negative-feedback rates are tested at `early_alpha`
    (0.001 by default, each test, no Bonferroni needed at that level): the judge looks every interval, and each
    look is another chance of a false alarm, so the early level is far stricter than the final one. The looks are
    strongly correlated (the counts only grow), so the false-rollback rate over a run stays far below the union
    bound of looks × tests × early_alpha. Nothing is promoted early.
    """
    if criteria.early_alpha <= 0 or min(canary.requests, incumbent.requests) < criteria.early_min_requests:
        return None
    checks: dict[str, dict[str, Any]] = {}
    worse = []
    for name, ce, ie, higher_worse in rates:
        p = _rate_p(canary, incumbent, ce, ie, higher_worse)
        c_rate, i_rate = ce / canary.requests, ie / incumbent.requests
        checks[name] = {"canary": c_rate, "incumbent": i_rate, "p": p, "worse": p < criteria.early_alpha}
        if p < criteria.early_alpha:
            worse.append(f"{name} {c_rate:.3g} vs {i_rate:.3g} (p={p:.2g})")
    if not worse:
        return None
    return Verdict(
        "rollback",
        f"clearly worse before the minimums (early level {criteria.early_alpha}): " + "; ".join(worse),
        checks,
    )
