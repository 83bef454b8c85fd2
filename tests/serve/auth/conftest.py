"""Fixtures for who-may-do-what: keys made in the real Redis, and an app with policies on (so admin routes answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from core.keys import Keys
from serve.app import build_app
from serve.auth import KeyStore
from serve.engine import ModelEngine
from serve.settings import ServeSettings

RULES = "rules:\n  - {id: a, description: alpha, kind: keywords, keywords: [alpha], action: redact}\n"


def run_store(settings: ServeSettings, method: str, *args: object) -> object:
    """Call a `KeyStore` method against the test's Redis, as `secondstage keys` would."""

    async def go() -> object:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            return await getattr(KeyStore(client, Keys(settings.redis_prefix)), method)(*args)
        finally:
            await client.aclose()

    return asyncio.run(go())


def make_key(settings: ServeSettings, name: str, scopes: str) -> str:
    secret, _ = run_store(settings, "create", name, scopes.split(","))  # type: ignore[misc]
    return secret  # type: ignore[no-any-return]


def bearer(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


@pytest.fixture
def auth_settings(settings: ServeSettings, tmp_path: Path) -> ServeSettings:
    rules = tmp_path / "policies"
    rules.mkdir()
    (rules / "a.yaml").write_text(RULES)
    # No cache: each request sees the store as it is now (the cache has its own test).
    return settings.model_copy(update={"policies_enabled": True, "policies_dir": rules, "auth_cache_s": 0.0})


@pytest.fixture
def auth_client(auth_settings: ServeSettings, engine: ModelEngine) -> Iterator[TestClient]:
    with TestClient(build_app(auth_settings, engine=engine)) as c:
        yield c
