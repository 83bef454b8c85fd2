"""The app factory's process-wide choices: the server process freezes its startup heap and keeps off the engine
workers' cores; an embedded app does neither."""

from __future__ import annotations

import gc

import pytest
from fastapi.testclient import TestClient

import serve.app
from serve.app import build_app
from serve.engine import ModelEngine
from serve.settings import ServeSettings


@pytest.fixture
def placements(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """Calls of the placement (recorded, not made: moving the test process would outlive the test)."""
    calls: list[None] = []
    monkeypatch.setattr(serve.app, "keep_off_workers", lambda: calls.append(None))
    return calls


def test_the_server_freezes_its_startup_heap_an_embedded_app_does_not(
    settings: ServeSettings, engine: ModelEngine, placements: list[None]
) -> None:
    settings = settings.model_copy(update={"keep_off_worker_cpus": True})
    gc.unfreeze()
    try:
        with TestClient(build_app(settings, engine=engine)) as client:
            assert client.get("/health").status_code == 200
            assert gc.get_freeze_count() == 0
            assert placements == []
        with TestClient(build_app(settings, engine=engine, own_process=True)) as client:
            assert client.get("/health").status_code == 200
            assert gc.get_freeze_count() > 0  # collections no longer walk what start-up made
            assert placements == [None]  # once, after the engine started
    finally:
        gc.unfreeze()  # the rest of the test session collects as before


def test_the_server_stays_where_the_kernel_puts_it_unless_told_to_move(
    settings: ServeSettings, engine: ModelEngine, placements: list[None]
) -> None:
    assert ServeSettings.model_fields["keep_off_worker_cpus"].default is False  # opt-in: the setting says why
    unplaced = settings.model_copy(update={"keep_off_worker_cpus": False})
    try:
        with TestClient(build_app(unplaced, engine=engine, own_process=True)) as client:
            assert client.get("/health").status_code == 200
            assert placements == []
    finally:
        gc.unfreeze()
