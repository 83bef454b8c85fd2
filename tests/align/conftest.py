"""Fixtures for the align tests: a tiny chat model, settings on the real Redis of tests/conftest.py, feedback writers.

The tiny model is the demo model (serve/demo) built smaller and barely trained (hidden 64, 2 layers, a few
steps): the same tokenizer, chat template and builder, so training runs offline in seconds on CPU.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from align.settings import AlignSettings
from core.keys import Keys
from core.records import (
    ChoiceRecord,
    CompletionRecord,
    FeedbackRecord,
    Message,
    PolicyPair,
    Usage,
    encode,
)
from core.redis_server import PrivateRedis
from serve.demo import DemoModelSpec, build_demo_model

# The demo model's pieces at a size align trains in seconds; a few steps teach it the chat template's shape.
TINY_SPEC = DemoModelSpec(hidden_size=64, num_heads=2, intermediate_size=128)
TINY_STEPS = 20


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-model") / "model"
    return build_demo_model(out, spec=TINY_SPEC, steps=TINY_STEPS, progress=False)


@pytest.fixture
def settings(redis_server: PrivateRedis, tmp_path: Path) -> AlignSettings:
    """Settings on this test's Redis (tests/conftest.py) and a fresh var/ directory; no model (see `train_settings`).

    Nothing is held out for the gate (heldout_share 0): the completion ids are random, so a held-out share would
    move a random part of each test's rows out of training; tests/align/test_gate_*.py set their own share.
    """
    return AlignSettings(
        redis_url=redis_server.url, var_dir=tmp_path / "var", model=str(tmp_path / "no-model"), heldout_share=0.0
    )


@pytest.fixture
def train_settings(settings: AlignSettings, tiny_model: Path) -> AlignSettings:
    """`settings` on the tiny model, with a short, strong training schedule (epochs decide the steps)."""
    return settings.model_copy(
        update={"model": str(tiny_model), "learning_rate": 5e-3, "epochs": 3.0, "min_dpo_steps": 0}
    )


@pytest.fixture
def client(settings: AlignSettings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(settings.redis_url or "")
    yield c
    c.close()


class Server:
    """Writes completion records, feedback and policy pairs the way serve's Recorder does (core/records.py)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def completion(
        self, prompt: str, *answers: str, user: str | None = None, key: str | None = None, cid: str | None = None
    ) -> str:
        cid = cid or f"chatcmpl-{uuid.uuid4().hex[:12]}"
        record = CompletionRecord(
            id=cid,
            created=time.time(),
            model="tiny",
            version="base",
            status="ok",
            messages=[Message(role="user", content=prompt)],
            params={"temperature": 0.0, "n": len(answers)},
            choices=[
                ChoiceRecord(index=i, text=a, finish_reason="stop", completion_tokens=3) for i, a in enumerate(answers)
            ],
            usage=Usage(prompt_tokens=5, completion_tokens=3 * len(answers), total_tokens=5 + 3 * len(answers)),
            latency_s=0.01,
            user=user,
            key=key,
        )
        data = encode(record)
        self.client.set(self.keys.completion(cid), data)
        self.client.xadd(self.keys.completions, {"schema": record.schema, "id": cid, "data": data})
        return cid

    def feedback(self, completion_id: str, *, fb_id: str | None = None, **fields: Any) -> str:
        record = FeedbackRecord(
            id=fb_id or f"fb-{uuid.uuid4().hex[:12]}", completion_id=completion_id, created=time.time(), **fields
        )
        self.client.xadd(
            self.keys.feedback,
            {"schema": record.schema, "id": record.id, "completion_id": completion_id, "data": encode(record)},
        )
        return record.id

    def policy_pair(self, prompt: str, rejected: str, chosen: str, *, pair_id: str | None = None) -> str:
        pair = PolicyPair(
            id=pair_id or f"pp-{uuid.uuid4().hex[:12]}",
            completion_id="chatcmpl-x",
            prompt=[Message(role="user", content=prompt)],
            rejected=rejected,
            chosen=chosen,
            rule_ids=["no-rudeness"],
            ruleset_version="test-1",
        )
        assert pair.id is not None
        self.client.xadd(
            self.keys.policy_pairs,
            {"schema": pair.schema, "id": pair.id, "completion_id": "chatcmpl-x", "data": encode(pair)},
        )
        return pair.id


@pytest.fixture
def server(client: redis.Redis, settings: AlignSettings) -> Server:
    return Server(client, Keys(settings.redis_prefix))
