"""Prometheus metrics of the serving process (vLLM's own `vllm:` metrics live beside them).

All metrics register on an injected `CollectorRegistry` so tests and several apps
in one process never collide; `/metrics` renders this registry plus vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from core.canary import Role, Signals

ROUTE_LABELS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
"""A job's route (the record's `endpoint`) as the `route` label: the HTTP path, the value
`secondstage_requests_total` carries, so a dashboard can join counts and latencies on one set of values."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


CANARY_SIGNALS = (
    "requests",
    "errors",
    "violations",
    "feedback",
    "thumbs_up",
    "thumbs_down",
    "corrections",
    "negative",
    "ratings",
    "rating_mean",
    "ttft_mean",
)


class _CanaryDecisions(Collector):
    """`secondstage_canary_decisions_total{decision, trigger}`: cluster-wide, from Redis (`<p>:canary:decisions`).

    A counter the judge refreshes from the hash the transition script increments, rather than one each
    replica increments: a decision is made once (by one replica, or by an operator's CLI) and every replica
    reports the same total, so `max` over replicas counts each decision exactly once. promote and rollback
    by auto and operator are always present (0 until one happens), so `increase()` sees the first one.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "secondstage_canary_decisions",
            "Canary decisions ever made in this deployment, by decision (promote, rollback, superseded) and "
            "trigger (auto: the judge; operator: the CLI; align: a newer canary), read from Redis.",
            labels=["decision", "trigger"],
        )
        counts = {(d, t): 0 for d in ("promote", "rollback") for t in ("auto", "operator")}
        counts.update(self.metrics.canary_decisions_seen)
        for (decision, trigger), value in sorted(counts.items()):
            family.add_metric([decision, trigger], value)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.registry = registry
        self.model_name = model_name
        self.requests = Counter(
            "secondstage_requests_total", "HTTP requests by route and status.", ["route", "status"], registry=registry
        )
        self.request_latency = Histogram(
            "secondstage_request_latency_seconds",
            "End-to-end latency of completion requests, by route, stream and the model version that served them.",
            ["route", "stream", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "secondstage_time_to_first_token_seconds",
            "Time from request arrival to the first content sent, by route and model version (streamed requests only: "
            "a JSON answer is sent whole).",
            ["route", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "secondstage_prompt_tokens_total", "Prompt tokens processed.", ["model_name", "version"], registry=registry
        )
        self.completion_tokens = Counter(
            "secondstage_completion_tokens_total",
            "Completion tokens generated.",
            ["model_name", "version"],
            registry=registry,
        )
        self.feedback = Counter(
            "secondstage_feedback_total",
            "Feedback events by kind and the version that made the completion (`unknown`: it could not be looked up).",
            ["kind", "version"],
            registry=registry,
        )
        self.active_version = Gauge(
            "secondstage_active_version_info",
            "1 for the model version new requests are served with.",
            ["model_name", "version"],
            registry=registry,
        )
        self.version_skew = Gauge(
            "secondstage_version_skew",
            "1 while this replica serves another version than the active one in Redis (it failed to load it and "
            "retries with backoff), else 0.",
            registry=registry,
        )
        self.swaps = Counter("secondstage_swaps_total", "Version activations by result.", ["result"], registry=registry)
        self.swap_duration = Histogram(
            "secondstage_swap_duration_seconds",
            "Time to load and activate a version.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=registry,
        )
        self.canary_share = Gauge(
            "secondstage_canary_share",
            "Share of caller identities this replica routes to the running canary (0: no canary).",
            registry=registry,
        )
        self.canary_info = Gauge(
            "secondstage_canary_info",
            "1 for the version this replica serves as a canary (absent: no canary).",
            ["model_name", "version"],
            registry=registry,
        )
        self.canary_signal = Gauge(
            "secondstage_canary_signal",
            "Live signals of the running canary run by role (canary, incumbent), summed over every replica and "
            "read from Redis: requests, errors, violations, feedback, thumbs_up, thumbs_down, corrections, "
            "negative, ratings, rating_mean, ttft_mean (seconds). Absent while no canary runs.",
            ["role", "signal"],
            registry=registry,
        )
        self.canary_decisions_seen: dict[tuple[str, str], int] = {}
        """Canary decisions ever made (decision, trigger) -> count, as last read from Redis by the judge."""
        registry.register(_CanaryDecisions(self))
        self.loaded_adapters = Gauge(
            "secondstage_loaded_adapters", "LoRA adapters resident in the engine.", registry=registry
        )

        self.redis_restarts = Counter(
            "secondstage_redis_restarts",
            "Restarts of the private redis-server child by result (ok, failed: it exited while starting).",
            ["result"],
            registry=registry,
        )
        # Registered by `track_redis` / `track_log_writer` only: a gauge nobody sets reads 0, and a replica
        # on an external Redis (or without a log writer) would report a Redis that is down.
        self.redis_up: Gauge | None = None
        self.log_redis_up: Gauge | None = None

        self.rate_limited = Counter(
            "secondstage_rate_limited_total",
            "Requests refused with 429 by a per-key limit, by limit (requests, tokens, feedback, concurrency).",
            ["limit"],
            registry=registry,
        )
        self._request_children: dict[tuple[str, str, bool, str], tuple[Any, Any, Any, Any]] = {}
        self._http_children: dict[tuple[str, str], Any] = {}
        self.rate_limit_errors = Counter(
            "secondstage_rate_limit_errors_total",
            "Limit checks skipped because Redis did not answer: the limits fail open and the request is served.",
            registry=registry,
        )

    def observe_request(
        self,
        model: str,
        route: str,
        stream: bool,
        version: str,
        latency: float,
        ttft: float | None,
        prompt: int,
        completion: int,
    ) -> None:
        """One finished completion request: its latency, TTFT and tokens under its route, stream flag and version."""
        key = (model, route, stream, version)
        children = self._request_children.get(key)
        if children is None:
            # `labels()` validates and locks on every call; a request's four children are looked up once per
            # (model, route, stream, version) instead (a handful per server: the versions it served).
            children = (
                self.request_latency.labels(route, "true" if stream else "false", version),
                self.ttft.labels(route, version),
                self.prompt_tokens.labels(model, version),
                self.completion_tokens.labels(model, version),
            )
            self._request_children[key] = children
        latency_h, ttft_h, prompt_c, completion_c = children
        latency_h.observe(latency)
        if ttft is not None:
            ttft_h.observe(ttft)
        prompt_c.inc(prompt)
        completion_c.inc(completion)

    def count_http(self, route: str, status: str) -> None:
        """One HTTP request in `secondstage_requests_total` (children cached as in `observe_request`)."""
        child = self._http_children.get((route, status))
        if child is None:
            child = self._http_children[(route, status)] = self.requests.labels(route, status)
        child.inc()

    def count_redis_restart(self, result: str) -> None:
        self.redis_restarts.labels(result).inc()

    def track_redis(self, is_up: Callable[[], bool]) -> None:
        """Report the supervised private Redis' state in `secondstage_redis_up` (read at each scrape)."""
        if self.redis_up is None:  # an app started twice (tests) registers it once
            self.redis_up = Gauge(
                "secondstage_redis_up",
                "1 while the private redis-server answers, 0 while it is being restarted or cannot be.",
                registry=self.registry,
            )
        self.redis_up.set_function(lambda: float(is_up()))

    def track_log_writer(self, redis_down: Callable[[], bool]) -> None:
        """Report whether the log writer reaches Redis in `secondstage_log_redis_up` (read at each scrape)."""
        if self.log_redis_up is None:
            self.log_redis_up = Gauge(
                "secondstage_log_redis_up",
                "1 while the log writer reaches Redis, 0 while it cannot and records go to the disk spool.",
                registry=self.registry,
            )
        self.log_redis_up.set_function(lambda: float(not redis_down()))

    def track_version_skew(self, skewed: Callable[[], bool]) -> None:
        """Report in `secondstage_version_skew` whether this replica lags the active version (read at each scrape)."""
        self.version_skew.set_function(lambda: float(skewed()))

    def set_canary_signals(self, signals: Mapping[Role, Signals] | None) -> None:
        """The running canary's live signals per role, summed over every replica (None: no canary runs)."""
        self.canary_signal.clear()
        for role, s in (signals or {}).items():
            values = {name: getattr(s, name) for name in CANARY_SIGNALS if not name.endswith("_mean")}
            values.update(rating_mean=s.rating_mean, ttft_mean=s.ttft_mean)
            for name, value in values.items():
                if value is not None:
                    self.canary_signal.labels(role, name).set(value)

    def set_canary(self, version: str | None, share: float) -> None:
        """What this replica routes to a canary: `secondstage_canary_share` and `secondstage_canary_info`."""
        self.canary_share.set(share)
        self.canary_info.clear()
        if version is not None:
            self.canary_info.labels(self.model_name, version).set(1)

    def set_active_version(self, version: str) -> None:
        self.active_version.clear()
        self.active_version.labels(self.model_name, version).set(1)
