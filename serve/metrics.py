"""Prometheus metrics of the serving process (vLLM's own `vllm:` metrics live beside them).

All metrics register on an injected `CollectorRegistry` so tests and several apps
in one process never collide; `/metrics` renders this registry plus vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROUTE_LABELS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
"""A job's route (the record's `endpoint`) as the `route` label: the HTTP path, the value
`secondstage_requests_total` carries, so a dashboard can join counts and latencies on one set of values."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


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
            "Time from request arrival to the first content sent, by route and model version.",
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
        self.rate_limit_errors = Counter(
            "secondstage_rate_limit_errors_total",
            "Limit checks skipped because Redis did not answer: the limits fail open and the request is served.",
            registry=registry,
        )

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

    def set_active_version(self, version: str) -> None:
        self.active_version.clear()
        self.active_version.labels(self.model_name, version).set(1)
