"""The app factory's process-wide choices: the server process freezes the startup heap, an embedded app does not."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from serve.app import build_app
from serve.engine import ModelEngine
from serve.settings import ServeSettings


def test_the_server_freezes_its_startup_heap_an_embedded_app_does_not(
    settings: ServeSettings, engine: ModelEngine
) -> None:
    gc.unfreeze()
    try:
        with TestClient(build_app(settings, engine=engine)) as client:
            assert client.get("/health").status_code == 200
            assert gc.get_freeze_count() == 0
        with TestClient(build_app(settings, engine=engine, freeze_heap=True)) as client:
            assert client.get("/health").status_code == 200
            assert gc.get_freeze_count() > 0  # collections no longer walk what start-up made
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
