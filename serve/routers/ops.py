"""Operations routes: GET /health (503 when the engine is dead) and GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from serve.errors import Unavailable
from serve.routers import error_responses

router = APIRouter()


@router.get("/health", responses=error_responses(503))
async def health(request: Request) -> dict[str, str]:
    try:
        await request.app.state.engine.check_health()
    except Exception as exc:
        raise Unavailable(f"engine is not healthy: {exc}") from exc
    return {"status": "ok", "version": request.app.state.engine.current.name}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    # Ours live on the app's registry; vLLM's `vllm:` metrics on the global one.
    body = generate_latest(request.app.state.metrics.registry)
    if request.app.state.metrics.registry is not REGISTRY:
        body += generate_latest(REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
