"""The auth matrix: every route x no key / wrong key / chat / feedback / admin / revoked key -> its status.

Refused requests write nothing to Redis; the scope errors are in OpenAI's shape (401 `invalid_api_key`,
403 naming the scope).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis
from fastapi.testclient import TestClient

from core.keys import Keys
from core.records import ChoiceRecord, CompletionRecord, Message, Usage, encode
from serve.caller import key_id_of
from serve.settings import ServeSettings
from tests.serve.auth.conftest import bearer, make_key, run_store

MSG = [{"role": "user", "content": "hi"}]
ROUTES: list[tuple[str, str, str, dict[str, Any] | None]] = [
    # (scope, method, path, body); feedback's body is filled per caller (a completion that caller owns)
    ("chat", "POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 4}),
    ("chat", "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4}),
    ("chat", "GET", "/v1/models", None),
    ("chat", "POST", "/tokenize", {"prompt": "hi"}),
    ("chat", "POST", "/detokenize", {"tokens": [104, 105]}),
    ("feedback", "POST", "/v1/feedback", None),
    ("admin", "GET", "/admin/policies", None),
    ("admin", "POST", "/admin/policies/reload", None),
]


def _owned_completion(rc: redis.Redis, keys: Keys, secret: str | None) -> str:
    """A completion record in Redis made by `secret`'s key, as serve would have stored it."""
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    record = CompletionRecord(
        id=cid,
        created=time.time(),
        model="demo",
        version="base",
        status="ok",
        messages=[Message(role="user", content="hi")],
        choices=[ChoiceRecord(index=0, text="hello", finish_reason="stop", completion_tokens=1)],
        usage=Usage(),
        latency_s=0.0,
        key=key_id_of(secret) if secret else None,
    )
    rc.set(keys.completion(cid), encode(record))
    return cid


def _snapshot(rc: redis.Redis, keys: Keys) -> tuple[int, int, int]:
    return rc.xlen(keys.completions), rc.xlen(keys.feedback), rc.xlen(keys.policy_pairs)


def test_every_route_by_every_kind_of_key(auth_client: TestClient, auth_settings: ServeSettings) -> None:
    rc = redis.Redis.from_url(auth_settings.redis_url)
    keys = Keys(auth_settings.redis_prefix)
    callers = {
        "none": None,
        "wrong": "sk-ss-not-a-key",
        "chat": make_key(auth_settings, "chatty", "chat"),
        "feedback": make_key(auth_settings, "critic", "feedback"),
        "admin": make_key(auth_settings, "ops", "admin"),
        "revoked": make_key(auth_settings, "gone", "chat,feedback,admin"),
    }
    run_store(auth_settings, "revoke", key_id_of(callers["revoked"]))  # type: ignore[arg-type]
    owned = {name: _owned_completion(rc, keys, secret) for name, secret in callers.items()}

    def expected(caller: str, scope: str) -> int:
        if caller in ("none", "wrong", "revoked"):
            return 401
        return 200 if caller == scope else 403

    def call(caller: str, method: str, path: str, body: dict[str, Any] | None) -> Any:
        if path == "/v1/feedback":
            body = {"completion_id": owned[caller], "thumbs": "up"}
        return auth_client.request(method, path, json=body, headers=bearer(callers[caller]))

    # Refused first: nothing they send may reach Redis.
    before = _snapshot(rc, keys)
    for caller in callers:
        for scope, method, path, body in ROUTES:
            want = expected(caller, scope)
            if want == 200:
                continue
            r = call(caller, method, path, body)
            assert r.status_code == want, (caller, path, r.text)
            error = r.json()["error"]
            assert error["param"] is None, error
            if want == 401:
                assert error["code"] == "invalid_api_key" and error["type"] == "AuthenticationError", error
            else:
                assert error["code"] == 403 and f"`{scope}` scope" in error["message"], error
    time.sleep(0.5)  # the log writer flushes within milliseconds; give it time to show a leak
    assert _snapshot(rc, keys) == before

    for caller in callers:
        for scope, method, path, body in ROUTES:
            if expected(caller, scope) == 200:
                r = call(caller, method, path, body)
                assert r.status_code == 200, (caller, path, r.text)


def test_revoked_key_message_names_the_key(auth_client: TestClient, auth_settings: ServeSettings) -> None:
    secret = make_key(auth_settings, "soon-gone", "chat")
    assert auth_client.get("/v1/models", headers=bearer(secret)).status_code == 200
    run_store(auth_settings, "revoke", key_id_of(secret))
    r = auth_client.get("/v1/models", headers=bearer(secret))
    assert r.status_code == 401 and key_id_of(secret) in r.json()["error"]["message"]
