"""The app factory: `build_app(settings)` wires engine, Redis, policies and routes in `lifespan`.

Nothing is built at import. Tests pass a fake engine (and their own Redis URL)
to exercise the HTTP layer without vLLM; `secondstage serve` passes nothing and
gets the real engine on the configured model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, disable_created_metrics

from core.canary import Criteria
from core.keys import Keys
from core.redis_server import PrivateRedis
from core.redis_supervisor import RedisSupervisor
from serve.auth import Authenticator, KeyStore, is_loopback
from serve.auth.credential import ensure_admin_credential
from serve.auth.surface import OperatorServer, SurfaceGuard
from serve.caller import KeyLimits
from serve.canary import CanaryJudge, SignalRecorder
from serve.engine import ModelEngine
from serve.errors import install_error_handlers
from serve.limits import RateLimiter
from serve.logs import RequestLogMiddleware
from serve.logwriter import LogWriter, Record
from serve.metrics import Metrics
from serve.middleware import RequestMiddleware
from serve.placement import keep_off_workers
from serve.routers import chat, completions, feedback, models, ops, policies, tokenize
from serve.services.chat import ChatService
from serve.services.completions import CompletionService
from serve.services.feedback import FeedbackService
from serve.services.generation import Pipeline
from serve.services.records import Recorder
from serve.settings import ServeSettings
from serve.swap import VersionWatcher

logger = logging.getLogger("secondstage.app")


def build_app(
    settings: ServeSettings | None = None,
    *,
    engine: ModelEngine | None = None,
    registry: CollectorRegistry | None = None,
    own_process: bool = False,
) -> FastAPI:
    """The app. `own_process`: the app is its process' server (`secondstage serve` sets it; an app embedded in
    another process, a test's, leaves that process alone): once started, move every object alive to the GC's
    permanent generation, and on a CPU engine keep the process off the engine workers' cores."""
    settings = settings or ServeSettings()
    # No `_created` series: a sample per counter and histogram child that no dashboard or rule reads
    # (process-wide, so vLLM's metrics lose theirs too; called here, not at import, like everything else).
    disable_created_metrics()
    metrics = Metrics(registry or CollectorRegistry(), settings.model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await _start(app, settings, metrics, engine, stack)
            if own_process:
                # What torch, vLLM and the app made at start never dies, yet every oldest-generation collection
                # walked it: 360-380 ms event-loop stalls every ~2 s under 64 clients here (a gc callback in the
                # server), 7-17 ms with the heap frozen. vLLM's own server freezes it the same way.
                from vllm.utils.gc_utils import freeze_gc_heap

                freeze_gc_heap()
                if settings.keep_off_worker_cpus:
                    keep_off_workers()
            yield

    app = FastAPI(
        title="secondstage",
        version="0.1.0",
        description="OpenAI-compatible chat that enforces operators' rules and learns from its users.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.started = time.time()
    app.state.policy = None
    app.state.redis_supervisor = None
    install_error_handlers(app)
    if settings.admin_port is not None:
        app.add_middleware(SurfaceGuard, admin_port=settings.admin_port)
    app.add_middleware(RequestMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    # Added last, so outermost: it picks the request id RequestMiddleware echoes, and its access line times it all.
    app.add_middleware(RequestLogMiddleware)
    for module in (chat, completions, feedback, models, tokenize, ops, policies):
        app.include_router(module.router)
    return app


async def _start(
    app: FastAPI,
    settings: ServeSettings,
    metrics: Metrics,
    engine: ModelEngine | None,
    stack: contextlib.AsyncExitStack,
) -> None:
    keys = Keys(settings.redis_prefix)
    if settings.redis_url:
        url = settings.redis_url
    else:
        # The private Redis is serve's supervised child: restarted when it exits, for as long as serve runs.
        # Registered first, so it stops last: the log writer flushes into it before it shuts down.
        supervisor = RedisSupervisor(
            PrivateRedis.for_settings(settings),
            min_delay_s=settings.redis_restart_delay_s,
            max_delay_s=settings.redis_restart_max_delay_s,
            on_restart=metrics.count_redis_restart,
        )
        supervisor.start()
        stack.callback(supervisor.stop)
        metrics.track_redis(lambda: supervisor.up)
        app.state.redis_supervisor = supervisor
        url = supervisor.url
        # Not the URL: it carries the password.
        logger.info("supervising the private redis-server in %s", settings.redis_dir)

    def client() -> aioredis.Redis:
        return aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    limiter = RateLimiter(
        url,
        keys,
        metrics,
        anonymous=KeyLimits(
            rpm=settings.anonymous_rpm,
            tpm=settings.anonymous_tpm,
            feedback_per_min=settings.anonymous_feedback_per_min,
            max_concurrency=settings.anonymous_max_concurrency,
        ),
        lease_s=settings.rate_limit_lease_s,
    )
    await limiter.start()
    stack.push_async_callback(limiter.stop)
    app.state.limiter = limiter

    lookup = client()
    stack.push_async_callback(lookup.aclose)
    app.state.auth = await _authenticator(settings, KeyStore(lookup, keys))

    recorder: Recorder | None = None
    if settings.logging_enabled:
        legacy = settings.var_dir / "spool"
        if (legacy / "spool.jsonl").is_file() or any(legacy.glob("replay-*.jsonl")):
            # Spooled before spools were per replica: no replica replays it by itself.
            logger.warning(
                "log records spooled by an older serve are in %s; write them to Redis with "
                "`secondstage data replay-spool --dir %s`",
                legacy,
                legacy,
            )
        writer = LogWriter(
            client,
            # Each replica its own spool (a LogWriter locks its directory): replicas may share one var/ volume.
            settings.spool_dir,
            max_queue=settings.log_queue_size,
            linger=settings.log_linger_s,
            registry=metrics.registry,
            spool_max_bytes=int(settings.spool_max_mb * 2**20),
        )
        await writer.start()
        stack.push_async_callback(writer.stop)
        metrics.track_log_writer(lambda: writer.redis_down)
        recorder = Recorder(
            writer,
            lookup,
            keys,
            record_cls=Record,
            maxlen=settings.stream_maxlen,
            ttl_s=settings.retention_s,
            store_raw_output=settings.store_raw_output,
            unverified_window_s=settings.feedback_unverified_window_s,
        )
        app.state.writer = writer

    if engine is None:
        engine = ModelEngine.from_settings(settings, metrics)
        stack.callback(engine.shutdown)
    elif engine.metrics is None:
        engine.metrics = metrics
        metrics.set_active_version(engine.current.name)
    app.state.engine = engine

    policy = _policy_engine(settings, metrics, engine) if settings.policies_enabled else None
    app.state.policy = policy

    signals = SignalRecorder(engine, keys)
    pipeline = Pipeline(engine, recorder, metrics, policy, signals)
    app.state.chat = ChatService(pipeline)
    app.state.completions = CompletionService(pipeline, max_choices=settings.max_completion_choices)
    if recorder is not None:
        app.state.feedback = FeedbackService(recorder, metrics, policy, signals)

    stop = asyncio.Event()
    watcher = VersionWatcher(
        engine,
        client,
        keys,
        interval_s=settings.reconcile_interval_s,
        retry_initial_s=min(1.0, settings.version_retry_max_s),
        retry_max_s=settings.version_retry_max_s,
    )
    app.state.version_watcher = watcher
    metrics.track_version_skew(lambda: watcher.skew)
    # Serve the active version from the first request on, when Redis can tell us which.
    with contextlib.suppress(Exception):
        await watcher.reconcile(lookup)
    judge = CanaryJudge(
        signals,
        client,
        keys,
        Criteria(
            min_requests=settings.canary_min_requests,
            min_duration_s=settings.canary_min_duration_s,
            alpha=settings.canary_alpha,
            max_ttft_ratio=settings.canary_max_ttft_ratio,
            min_ratings=settings.canary_min_ratings,
            early_alpha=settings.canary_early_alpha,
            early_min_requests=settings.canary_early_min_requests,
        ),
        interval_s=settings.canary_eval_interval_s,
        metrics=metrics,
    )
    app.state.canary_judge = judge
    tasks = [
        asyncio.create_task(watcher.run(stop), name="version-watcher"),
        asyncio.create_task(judge.run(stop), name="canary-judge"),
    ]
    if policy is not None:
        tasks.append(asyncio.create_task(policy.watch(stop), name="policy-watcher"))
        from serve.policy.fanout import PolicyFanout  # with the policy engine: only when policies are on

        fanout = PolicyFanout(policy, client, keys, settings.replica_name)
        fanout.attach()
        tasks.append(asyncio.create_task(fanout.run(stop), name="policy-fanout"))

    async def stop_tasks() -> None:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    stack.push_async_callback(stop_tasks)

    if settings.admin_port is not None:
        # Started last, once everything it serves exists; it shares this app (see serve/auth/surface.py).
        operator = OperatorServer(app, settings.admin_host or settings.host, settings.admin_port)
        await operator.start()
        stack.push_async_callback(operator.stop)


class StartRefused(RuntimeError):
    """serve will not start as configured (e.g. open to the network without keys); the message says the fix."""


async def _authenticator(settings: ServeSettings, store: KeyStore) -> Authenticator:
    """The key checker; the admin credential in var/; refuse a non-loopback bind without keys."""
    loopback = is_loopback(settings.host)
    auth = Authenticator(store, anonymous_allowed=loopback or settings.allow_anonymous, cache_s=settings.auth_cache_s)
    try:
        await ensure_admin_credential(store, settings.admin_key_path)
        has_keys = await store.has_operator_keys()
    except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
        # Without Redis no key can be checked: requests get 503 until it answers (fail closed).
        logger.warning("cannot reach Redis to read the API keys (%s); key checks wait for it", exc)
        return auth
    if not has_keys and not loopback and not settings.allow_anonymous:
        raise StartRefused(
            f"host: {settings.host} is not a loopback address and no API key exists, so anyone who reaches the "
            "port could use the model. Create a key first (`secondstage keys create --name NAME --scopes chat,"
            "feedback`), or pass --allow-anonymous (SECONDSTAGE_ALLOW_ANONYMOUS=true) to serve without keys"
        )
    if not has_keys:
        logger.info("no API keys: chat and feedback are open to anyone who reaches %s (anonymous)", settings.host)
    return auth


def _policy_engine(settings: ServeSettings, metrics: Metrics, engine: ModelEngine) -> Any:
    from core.policy import PolicyEngine

    def count_tokens(text: str) -> int:
        return len(engine.tokenizer.encode(text, add_special_tokens=False))

    policy = PolicyEngine(settings.policies_dir, registry=metrics.registry, tokenizer_count=count_tokens)
    policy.load()
    return policy
