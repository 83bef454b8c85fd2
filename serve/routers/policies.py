"""Admin routes for the rule policies: GET /admin/policies and POST /admin/policies/reload.

HTTP translation only; the engine (`app.state.policy`, None when policies are disabled) does the work.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve.errors import NotFound, error_body
from serve.policy import PolicyEngine

router = APIRouter()


def _engine(request: Request) -> PolicyEngine:
    engine = getattr(request.app.state, "policy", None)
    if engine is None:
        raise NotFound("policies are disabled on this server (SECONDSTAGE_POLICIES_ENABLED=false)")
    return engine  # type: ignore[no-any-return]


@router.get("/admin/policies")
async def get_policies(request: Request) -> dict[str, Any]:
    ps = _engine(request).active
    return {
        "version": ps.version,
        "files": ps.files,
        "hold_back": ps.hold_back,
        "rules": ps.summary(),
    }


@router.post("/admin/policies/reload", response_model=None)
async def reload_policies(request: Request) -> dict[str, Any] | JSONResponse:
    engine = _engine(request)
    result = engine.reload()
    if result.error is not None:
        status = HTTPStatus.UNPROCESSABLE_ENTITY
        body = error_body(status, "PolicyError", str(result.error), result.error.field)
        body["error"].update(result.error.to_dict() | {"message": str(result.error)})
        body["active_version"] = result.version
        return JSONResponse(body, status_code=int(status))
    return {
        "version": result.version,
        "previous_version": result.previous_version,
        "changed": result.changed,
        "rules": len(engine.active.rules),
    }
