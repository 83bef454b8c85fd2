"""Fixtures for the HTTP layer: the real app factory over a fake engine and a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.redis_server import PrivateRedis
from serve.app import build_app
from serve.engine import ModelEngine
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, fake_engine


@pytest.fixture
def fake_llm() -> FakeLLM:
    return FakeLLM()


@pytest.fixture
def settings(tmp_path: Path, redis_server: PrivateRedis) -> ServeSettings:
    return ServeSettings(
        var_dir=tmp_path / "var",
        redis_url=redis_server.url,
        served_model_name="demo",
        max_model_len=512,
        policies_enabled=False,
        reconcile_interval_s=0.2,
    )


@pytest.fixture
def engine(fake_llm: FakeLLM, settings: ServeSettings) -> ModelEngine:
    return fake_engine(fake_llm, settings)


@pytest.fixture
def client(settings: ServeSettings, engine: ModelEngine) -> Iterator[TestClient]:
    with TestClient(build_app(settings, engine=engine)) as c:
        yield c
