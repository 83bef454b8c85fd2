"""GET /v1/models: the served model, the version new requests get, and the active one it should be (skew)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serve.deps import CHAT_SCOPE, EngineDep, SettingsDep, StartedDep
from serve.protocol import ModelCard, ModelList
from serve.routers import error_responses

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 403), dependencies=[CHAT_SCOPE])
async def list_models(request: Request, engine: EngineDep, settings: SettingsDep, started: StartedDep) -> ModelList:
    watcher = getattr(request.app.state, "version_watcher", None)  # absent until lifespan started it
    card = ModelCard(
        id=engine.model_name,
        created=int(started),
        root=settings.model_path,
        max_model_len=engine.max_model_len,
        version=engine.current.name,
        wanted_version=watcher.wanted if watcher is not None and watcher.wanted is not None else engine.current.name,
    )
    return ModelList(data=[card])
