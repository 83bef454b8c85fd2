"""Identity from the key: feedback ownership, the anonymous local mode, the admin credential, the refusal to
open a network port without keys, and how fast a revoke reaches a replica."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from core.keys import Keys
from serve.app import StartRefused, build_app
from serve.auth import Authenticator, KeyStore
from serve.caller import key_id_of
from serve.engine import ModelEngine
from serve.errors import Unauthorized
from serve.settings import ServeSettings
from tests.serve.auth.conftest import bearer, make_key, run_store

MSG = [{"role": "user", "content": "hi"}]


def _chat(client: TestClient, secret: str | None, **extra: object) -> str:
    r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, **extra}, headers=bearer(secret))
    assert r.status_code == 200, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def _feedback(client: TestClient, secret: str | None, cid: str) -> int:
    return client.post("/v1/feedback", json={"completion_id": cid, "thumbs": "up"}, headers=bearer(secret)).status_code


def test_only_the_owner_or_an_admin_posts_feedback(auth_client: TestClient, auth_settings: ServeSettings) -> None:
    a = make_key(auth_settings, "alice", "chat,feedback")
    b = make_key(auth_settings, "bob", "chat,feedback")
    admin = make_key(auth_settings, "ops", "admin,feedback")
    cid = _chat(auth_client, a, user="claims-to-be-bob")
    # B gets the 404 an unknown id gets (not 403): a stranger learns nothing about ids that are not theirs.
    r = auth_client.post("/v1/feedback", json={"completion_id": cid, "thumbs": "down"}, headers=bearer(b))
    assert r.status_code == 404 and r.json()["error"]["param"] == "completion_id"
    assert r.json()["error"]["message"] == f"no completion with id {cid!r}"
    assert _feedback(auth_client, admin, cid) == 200
    assert _feedback(auth_client, a, cid) == 200
    # The same once the completion is known only to Redis (another replica, a restart).
    rc = redis.Redis.from_url(auth_settings.redis_url)
    keys = Keys(auth_settings.redis_prefix)
    deadline = time.time() + 5
    while rc.get(keys.completion(cid)) is None and time.time() < deadline:
        time.sleep(0.05)
    auth_client.app.state.feedback.recorder._recent.clear()  # type: ignore[attr-defined]
    assert _feedback(auth_client, b, cid) == 404
    assert _feedback(auth_client, a, cid) == 200

    # Records name the authenticated identity; the body's `user` stays metadata.
    completion = json.loads(rc.get(keys.completion(cid)))  # type: ignore[arg-type]
    assert completion["key"] == key_id_of(a) and completion["user"] == "claims-to-be-bob"
    deadline = time.time() + 5
    while rc.xlen(keys.feedback) < 3 and time.time() < deadline:
        time.sleep(0.05)
    posters = [json.loads(f[b"data"])["key"] for _, f in rc.xrange(keys.feedback)]
    assert posters == [key_id_of(admin), key_id_of(a), key_id_of(a)]


def test_anonymous_local_mode(client: TestClient, settings: ServeSettings) -> None:
    """Loopback, no keys: chat and feedback open (even with a made-up key, as OpenAI clients send one)."""
    cid = _chat(client, None)
    assert _feedback(client, None, cid) == 200
    assert _feedback(client, "sk-anything", cid) == 200
    assert client.get("/v1/models", headers=bearer("sk-anything")).status_code == 200
    # Admin routes never open: they need the generated admin key.
    r = client.get("/admin/policies")
    assert r.status_code == 401 and "admin" in r.json()["error"]["message"]
    admin = settings.admin_key_path.read_text().strip()
    assert client.get("/admin/policies", headers=bearer(admin)).status_code == 404  # policies off in this fixture
    # The admin key also chats in this mode, under its own identity.
    assert _feedback(client, admin, _chat(client, admin)) == 200

    # Once an operator creates a key, the open mode ends (within the cache time; 2 s by default).
    key = make_key(settings, "first", "chat,feedback")
    client.app.state.auth.cache_s = 0.0  # type: ignore[attr-defined]
    client.app.state.auth._has_keys = (float("-inf"), None)  # type: ignore[attr-defined]
    assert client.get("/v1/models").status_code == 401
    # An anonymous completion is nobody's: a key holder cannot claim it.
    assert _feedback(client, key, cid) == 404


def test_admin_credential_is_generated_0600_and_reused(
    settings: ServeSettings, engine: ModelEngine, caplog: pytest.LogCaptureFixture
) -> None:
    path = settings.admin_key_path
    assert not path.exists()
    with caplog.at_level("INFO", logger="secondstage.auth"), TestClient(build_app(settings, engine=engine)):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in caplog.text
    secret = path.read_text().strip()
    [entry] = run_store(settings, "list")  # type: ignore[misc]
    assert entry.id == key_id_of(secret) and entry.scopes == ["admin"] and entry.local_admin
    assert secret not in json.dumps([str(v) for v in redis.Redis.from_url(settings.redis_url).hgetall(
        Keys(settings.redis_prefix).api_keys
    ).values()])  # fmt: skip
    with TestClient(build_app(settings, engine=engine)) as c:
        assert path.read_text().strip() == secret
        assert c.get("/admin/policies", headers=bearer(secret)).status_code == 404  # authorised; policies off
    assert len(run_store(settings, "list")) == 1  # type: ignore[arg-type]


def test_a_network_bind_without_keys_refuses_to_start(settings: ServeSettings, engine: ModelEngine) -> None:
    public = settings.model_copy(update={"host": "0.0.0.0"})
    with pytest.raises(StartRefused, match="--allow-anonymous"), TestClient(build_app(public, engine=engine)):
        pass
    opened = public.model_copy(update={"allow_anonymous": True})
    with TestClient(build_app(opened, engine=engine)) as c:
        assert c.get("/v1/models").status_code == 200
    # With a key, a network bind starts, and every route needs a key.
    key = make_key(settings, "app", "chat")
    with TestClient(build_app(public, engine=engine)) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers=bearer(key)).status_code == 200


def test_a_revoke_reaches_a_replica_within_the_cache_time(settings: ServeSettings) -> None:
    now = [0.0]

    async def go() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        store = KeyStore(client, Keys(settings.redis_prefix))
        auth = Authenticator(store, anonymous_allowed=False, cache_s=2.0, clock=lambda: now[0])
        secret, entry = await store.create("app", ["chat"])
        assert (await auth.caller(secret)).key_id == entry.id
        await store.revoke(entry.id)
        now[0] = 1.9  # still cached: no Redis round trip per request
        assert (await auth.caller(secret)).scopes == {"chat"}
        now[0] = 2.1
        with pytest.raises(Unauthorized, match="revoked"):
            await auth.caller(secret)
        await client.aclose()

    asyncio.run(go())


def test_admin_port_serves_the_operator_surface(settings: ServeSettings, engine: ModelEngine, tmp_path: Path) -> None:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    split = settings.model_copy(update={"admin_port": port})
    with TestClient(build_app(split, engine=engine)) as c:
        admin = bearer(split.admin_key_path.read_text().strip())
        # The public port (TestClient's): no operator routes, as if they did not exist.
        assert c.get("/metrics").status_code == 404
        assert c.post("/admin/policies/reload", headers=admin).status_code == 404
        assert c.get("/v1/models").status_code == 200 and c.get("/health").status_code == 200
        # The operator port, a real socket served by the same app.
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/metrics").status_code == 200
        assert httpx.get(base + "/admin/policies").status_code == 401
        assert httpx.get(base + "/v1/models").status_code == 404
        assert httpx.get(base + "/health").status_code == 200


def test_a_keys_stored_limits_are_enforced(auth_settings: ServeSettings, engine: ModelEngine) -> None:
    """The limits given at `keys create` reach the rate limiter through the real key store."""
    from serve.caller import KeyLimits

    secret, _ = run_store(auth_settings, "create", "limited", ["chat"], KeyLimits(rpm=2))  # type: ignore[misc]
    other = make_key(auth_settings, "other", "chat")
    with TestClient(build_app(auth_settings, engine=engine)) as c:
        codes = [
            c.post("/v1/chat/completions", json={"messages": MSG}, headers=bearer(secret)).status_code for _ in range(3)
        ]
        assert codes == [200, 200, 429]
        assert c.post("/v1/chat/completions", json={"messages": MSG}, headers=bearer(other)).status_code == 200


def test_two_replicas_creating_the_admin_key_at_once_share_one(tmp_path: Path) -> None:
    """The second replica to start on a fresh var/ reads the key the first wrote instead of failing."""
    from serve.auth import credential

    path = tmp_path / "admin.key"
    first = credential._create(path)
    assert first is not None and credential._create(path) is None
    assert credential._read(path) == first
