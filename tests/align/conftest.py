"""Fixtures for the align tests: a tiny chat model, settings on the real Redis of tests/conftest.py, feedback writers.

The tiny model is a randomly initialised Llama (hidden 64, 2 layers) with a byte-level BPE tokenizer trained
here on a few sentences and a minimal chat template, so training runs offline in seconds on CPU.
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

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<s>", "<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "The capital of France is Paris.",
    "The sky is blue because of Rayleigh scattering.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Please answer politely and briefly.",
    "What colour is the sky? What is the capital of France? How hot is boiling water?",
    "Thank you for asking, here is the answer you wanted.",
    "I do not know the answer to that question.",
    "Cats sleep most of the day and dogs like to walk.",
]


def build_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Save a tiny random Llama chat model + tokenizer to `path` (offline, deterministic)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture
def settings(redis_server: PrivateRedis, tmp_path: Path) -> AlignSettings:
    """Settings on this test's Redis (tests/conftest.py) and a fresh var/ directory; no model (see `train_settings`)."""
    return AlignSettings(redis_url=redis_server.url, var_dir=tmp_path / "var", model=str(tmp_path / "no-model"))


@pytest.fixture
def train_settings(settings: AlignSettings, tiny_model: Path) -> AlignSettings:
    """`settings` on the tiny model, with a short, strong training schedule."""
    return settings.model_copy(update={"model": str(tiny_model), "learning_rate": 5e-3, "epochs": 3.0})


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

    def completion(self, prompt: str, *answers: str, user: str | None = None, cid: str | None = None) -> str:
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
