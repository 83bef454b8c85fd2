"""Admin routes for the rule policies: GET /admin/policies and POST /admin/policies/reload.

HTTP translation only; the policy engine (`PolicyDep`, a 404 when policies are disabled) does the work.
A reload compiles in a worker thread (streams keep flowing); one runs at a time, and a reload requested
while one runs is a 409 (the one running already reads the files as they are now,
or nearly: retry when it has finished to be sure of the latest).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from core.policy.loading import ReloadBusy
from serve.deps import ADMIN_SCOPE, PolicyDep
from serve.errors import PolicyRejected, ReloadInProgress
from serve.routers import error_responses

# Admin routes: an admin key always, also in the anonymous local mode.
router = APIRouter(dependencies=[ADMIN_SCOPE], responses=error_responses(401, 403, 404))


@router.get("/admin/policies")
async def get_policies(engine: PolicyDep) -> dict[str, Any]:
    ps = engine.active
    return {
        "version": ps.version,
        "files": ps.files,
        "hold_back": ps.hold_back,
        "rules": ps.summary(),
    }


@router.post("/admin/policies/reload", response_model=None)
async def reload_policies(engine: PolicyDep) -> dict[str, Any]:
    try:
        result = await engine.reload_off_loop(wait=False)
    except ReloadBusy as exc:
        raise ReloadInProgress(
            "a policy reload is already running; retry when it has finished (GET /admin/policies shows the "
            "version it activated)",
        ) from exc
    if result.error is not None:
        where = {k: v for k, v in result.error.to_dict().items() if k != "message"}
        raise PolicyRejected(
            str(result.error),
            param=result.error.field,
            details=where,
            context={"active_version": result.version},
        )
    return {
        "version": result.version,
        "previous_version": result.previous_version,
        "changed": result.changed,
        "rules": len(engine.active.rules),
    }
