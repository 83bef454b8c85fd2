"""Operations routes: GET /health (503 when the engine is dead) and GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from serve.deps import EngineDep, MetricsDep
from serve.errors import Unavailable
from serve.routers import error_responses

router = APIRouter()


@router.get("/health", responses=error_responses(503))
async def health(engine: EngineDep) -> dict[str, str]:
    try:
        await engine.check_health()
    except Exception as exc:
        raise Unavailable(f"engine is not healthy: {exc}") from exc
    return {"status": "ok", "version": engine.current.name}


@router.get("/metrics", include_in_schema=False)
async def metrics(metrics: MetricsDep) -> Response:
    # Ours live on the app's registry; vLLM's `vllm:` metrics on the global one.
    body = generate_latest(metrics.registry)
    if metrics.registry is not REGISTRY:
        body += generate_latest(REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
