"""POST /admin/policies/reload compiles off the event loop: streams keep flowing, one reload at a time.

Compiling a large rule set takes seconds (hyperscan databases); on the event loop it stalled every stream
for that long. The test reloads the repository's rule files plus 400 generated keyword rules (the shipped
files alone now compile in well under a second, too quick to show a stall), streams a chat answer from the
fake engine (one byte every 10 ms) while the reload runs, and measures the largest gap between two chunks;
a second reload sent meanwhile is a 409, and the first still succeeds.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from serve.app import build_app
from serve.settings import ServeSettings
from tests.core.policy.conftest import keyword_rules
from tests.fakes import FakeLLM, fake_engine

POLICIES = Path(__file__).resolve().parents[3] / "policies"


@contextmanager
def serving(app: FastAPI) -> Iterator[httpx.Client]:
    """The app on a real socket (the test client buffers whole responses, so it cannot time chunks)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        # 120 s: on the shared 2-core machine the first response took 55-65 s to start (load average 17).
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=120) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_streams_keep_flowing_while_policies_reload(settings: ServeSettings, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "zz-bulk.yaml").write_text(keyword_rules(400))
    update = {"policies_enabled": True, "policies_dir": policies, "max_model_len": 4096}
    settings = settings.model_copy(update=update)
    llm = FakeLLM(delay=0.01, reply=lambda _prompt: "The weather is mild and the sky is clear today. " * 8)
    with serving(build_app(settings, engine=fake_engine(llm, settings))) as client:
        # Admin routes need the admin key, also locally: the one the server wrote on start.
        admin = {"Authorization": f"Bearer {settings.admin_key_path.read_text().strip()}"}
        results: dict[str, httpx.Response] = {}
        reload_window: list[float] = []

        def reload() -> None:
            reload_window.append(time.monotonic())
            results["first"] = client.post("/admin/policies/reload", headers=admin)
            reload_window.append(time.monotonic())

        gaps: list[tuple[float, float]] = []  # (arrival time, gap since the previous chunk)
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 400}
        reloader = threading.Thread(target=reload)
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            last = None
            for line in r.iter_lines():
                now = time.monotonic()
                if last is None:
                    reloader.start()
                    time.sleep(0.2)  # the reload is compiling now
                    results["second"] = client.post("/admin/policies/reload", headers=admin)
                    now = time.monotonic()
                elif line:
                    gaps.append((now, now - last))
                last = now
        reloader.join()

    assert results["first"].status_code == 200, results["first"].text
    assert results["second"].status_code == 409, results["second"].text
    assert results["second"].json()["error"]["type"] == "ConflictError"
    start, end = reload_window
    assert end - start > 0.5, "the reload was too quick to show anything"
    during = [gap for at, gap in gaps if start + 0.3 < at < end]
    assert during, f"no chunk arrived while the reload ran ({start=}, {end=}, {gaps[:3]=}, {gaps[-3:]=}, {len(gaps)=})"
    # A reload on the event loop stalls streams for (nearly) all of it; relative to the reload's own length the
    # bound holds on a slower or faster machine alike.
    assert max(during) < (end - start) / 3, f"a stream stalled {max(during):.2f}s during a {end - start:.2f}s reload"
