"""Operations routes: GET /health (liveness and details), GET /health/ready (readiness), GET /metrics.

`/health` is 503 only when the engine is dead; a private Redis that is down or being restarted
makes it answer 200 with `"status": "degraded"` and the reason, because chat goes on (records
spool to disk). `/health/ready` is what an orchestrator should route traffic by: 503 when the
engine is dead or the private Redis cannot be brought back (records would pile up in the spool,
and align cannot read them), 200 while a restart is merely under way.

`/health` also reports the log writer (`log_writer`: alive, Redis reachable, queue depth, age of the
oldest queued record, spool, restarts, rejected records); a writer that is not running makes the status
`degraded` (still 200: chat goes on, records wait in memory until shutdown spools them). Redis itself
keeps its rule above: the writer's `redis_reachable` is reported, and lags the supervisor by a retry.

With replicas, `/health` names this one (`replica`) and reports version skew: `wanted` is the active version
in Redis, `skew` is true while this replica serves another (it failed to load it and retries with backoff;
serve/swap.py); the status is then `degraded` (still 200: it serves, just not the version it should).
While a canary runs, `canary` names it with its share and run; a canary this replica could not load is
skew too (everyone here gets the incumbent meanwhile).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from core.redis_supervisor import FAILED
from serve.deps import EngineDep, MetricsDep, RedisSupervisorDep
from serve.engine import ModelEngine
from serve.errors import Unavailable
from serve.routers import error_responses

router = APIRouter()


async def _check_engine(engine: ModelEngine) -> None:
    try:
        await engine.check_health()
    except Exception as exc:
        raise Unavailable(f"engine is not healthy: {exc}") from exc


@router.get("/health", responses=error_responses(503))
async def health(request: Request, engine: EngineDep, supervisor: RedisSupervisorDep) -> dict[str, Any]:
    await _check_engine(engine)
    body: dict[str, Any] = {"status": "ok", "version": engine.current.name}
    reasons: list[str] = []
    if supervisor is None:
        body["redis"] = "external"  # SECONDSTAGE_REDIS_URL: not ours to watch
    else:
        body["redis"] = supervisor.state
        body["redis_restarts"] = supervisor.restarts
        if not supervisor.up:
            reasons.append(
                f"private Redis {supervisor.state}: {supervisor.reason}; completions spool to disk meanwhile"
            )
    body["replica"] = request.app.state.settings.replica_name
    watcher = getattr(request.app.state, "version_watcher", None)
    if watcher is not None:
        body["wanted"] = watcher.wanted if watcher.wanted is not None else engine.current.name
        body["skew"] = watcher.skew
        route, wanted_canary = engine.canary, watcher.wanted_canary
        if route is not None:
            body["canary"] = {"version": route.version.name, "share": route.share, "run": route.run}
        if watcher.wanted is not None and watcher.wanted != engine.current.name:
            reasons.append(
                f"serving version {engine.current.name} but the active one is {watcher.wanted}: it failed to "
                "load (see the log and secondstage_swaps_total); retrying with backoff"
            )
        elif watcher.skew and wanted_canary is not None:
            reasons.append(
                f"canary {wanted_canary.version} is not routed to here: it failed to load (see the log and "
                f"secondstage_swaps_total); {engine.current.name} serves everyone meanwhile, retrying with backoff"
            )
    writer = getattr(request.app.state, "writer", None)  # absent when logging is disabled
    if writer is not None:
        body["log_writer"] = writer.health()
        if not writer.alive:
            reasons.append("the log writer is not running; completions wait in memory until shutdown spools them")
    if reasons:
        body["status"] = "degraded"
        body["reason"] = "; ".join(reasons)
    return body


@router.get("/health/ready", responses=error_responses(503))
async def ready(engine: EngineDep, supervisor: RedisSupervisorDep) -> dict[str, str]:
    await _check_engine(engine)
    if supervisor is not None and supervisor.state == FAILED:
        raise Unavailable(
            f"the private Redis in {supervisor.server.data_dir} cannot be brought back ({supervisor.reason}); "
            "chat still works but its records only reach the disk spool: repair the data directory "
            "(the supervisor keeps retrying) or restart serve"
        )
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
async def metrics(metrics: MetricsDep) -> Response:
    # Ours live on the app's registry; vLLM's `vllm:` metrics on the global one.
    body = generate_latest(metrics.registry)
    if metrics.registry is not REGISTRY:
        body += generate_latest(REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
