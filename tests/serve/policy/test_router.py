"""GET /admin/policies and POST /admin/policies/reload on a minimal app."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.policy import PolicyEngine
from serve.caller import Caller
from serve.errors import install_error_handlers
from serve.routers.policies import router

RULES = "rules:\n  - {id: a, description: alpha, kind: keywords, keywords: [alpha], action: redact}\n"


class _AnyoneIsAdmin:
    """Stands in for the authenticator: the matrix in tests/serve/test_auth.py covers who may call these."""

    async def caller(self, key: str | None) -> Caller:
        return Caller(api_key="admin", scopes=frozenset({"admin"}))


def _client(engine: PolicyEngine | None) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.policy = engine
    app.state.auth = _AnyoneIsAdmin()
    return TestClient(app)


def test_get_and_reload(make_engine: Callable[..., PolicyEngine]) -> None:
    engine = make_engine(RULES)
    client = _client(engine)
    body = client.get("/admin/policies").json()
    assert body["version"] == engine.active.version
    assert body["rules"][0]["id"] == "a" and body["rules"][0]["action"] == "redact"
    assert body["hold_back"] == engine.active.hold_back

    old = engine.active.version
    path = engine.policies_dir / "rules.yaml"
    path.write_text(RULES.replace("action: redact", "action: explode"))
    resp = client.post("/admin/policies/reload")
    assert resp.status_code == 422
    err = resp.json()
    assert err["active_version"] == old
    assert err["error"]["type"] == "PolicyError" and err["error"]["code"] == 422
    assert err["error"]["param"] == "action" and err["error"]["rule_id"] == "a"
    assert str(path) in err["error"]["message"]

    path.write_text(RULES.replace("[alpha]", "[alpha, beta]"))
    resp = client.post("/admin/policies/reload")
    assert resp.status_code == 200
    assert resp.json()["changed"] is True and resp.json()["previous_version"] == old
    assert client.get("/admin/policies").json()["version"] == engine.active.version != old


def test_disabled_policies_are_404() -> None:
    client = _client(None)
    resp = client.get("/admin/policies")
    assert resp.status_code == 404
    assert "disabled" in resp.json()["error"]["message"]
    assert client.post("/admin/policies/reload").status_code == 404
