"""The hostile-input matrix (issue 10): what an outsider can send, and what each earns.

Every case goes through the real app (fake engine, real redis-server) as raw bytes, and must end in a
4xx naming the parameter (OpenAI's error shape, `param` the dotted path) or be served correctly, within a
few seconds: never a 500, never a stall. The last test sends the whole matrix to one server and then checks
that a completion and its feedback still reach Redis and that /health still reports a live log writer,
which a lone surrogate used to kill (its records then stayed in memory while /health said ok).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from fastapi.testclient import TestClient

from core.keys import Keys
from serve.app import build_app
from serve.engine import ModelEngine
from serve.settings import ServeSettings

MSG = [{"role": "user", "content": "hi"}]
LONE = "a\ud800b"  # json.dumps writes it as the escape "a\ud800b", as an attacker would
SERVED = 200


@dataclass
class Case:
    id: str
    path: str
    body: bytes
    status: int  # expected status: 400, 413, or 200 (served correctly)
    param: str | None = None

    def __str__(self) -> str:
        return self.id


def j(value: object) -> bytes:
    return json.dumps(value).encode()


def chat(**fields: object) -> bytes:
    return j({"model": "demo", "messages": MSG, **fields})


def completion(**fields: object) -> bytes:
    return j({"model": "demo", "prompt": "hi", "max_tokens": 4, **fields})


def nested(depth: int) -> object:
    value: object = "deep"
    for _ in range(depth):
        value = {"x": [value]}
    return value


CASES = [
    # -- lone surrogates in every string field --
    Case("surrogate-content", "/v1/chat/completions", j({"messages": [{"role": "user", "content": LONE}]}), 400,
         "messages.0.content"),
    Case("surrogate-content-part", "/v1/chat/completions",
         j({"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]}), 400,
         "messages.0.content.0.text"),
    Case("surrogate-name", "/v1/chat/completions", j({"messages": [{"role": "user", "content": "hi", "name": LONE}]}),
         400, "messages.0.name"),
    Case("surrogate-user", "/v1/chat/completions", chat(user=LONE), 400, "user"),
    Case("surrogate-user-stream", "/v1/chat/completions", chat(user=LONE, stream=True), 400, "user"),
    Case("surrogate-metadata-value", "/v1/chat/completions", chat(metadata={"k": LONE}), 400, "metadata.k"),
    Case("surrogate-metadata-key", "/v1/chat/completions", chat(metadata={LONE: "v"}), 400, "metadata.a\\ud800b"),
    Case("surrogate-stop", "/v1/chat/completions", chat(stop=["ok", LONE]), 400, "stop.1"),
    Case("surrogate-stop-str", "/v1/completions", completion(stop=LONE), 400, "stop"),
    Case("surrogate-model", "/v1/chat/completions", j({"model": LONE, "messages": MSG}), 400, "model"),
    Case("surrogate-extra-field", "/v1/chat/completions", chat(vendor={"tags": ["ok", LONE]}), 400, "vendor.tags.1"),
    Case("surrogate-prompt", "/v1/completions", completion(prompt=LONE), 400, "prompt"),
    Case("surrogate-prompt-list", "/v1/completions", completion(prompt=["ok", LONE]), 400, "prompt.1"),
    Case("surrogate-tokenize", "/tokenize", j({"prompt": LONE}), 400, "prompt"),
    Case("surrogate-feedback-comment", "/v1/feedback", j({"completion_id": "chatcmpl-x", "comment": LONE}), 400,
         "comment"),
    Case("surrogate-feedback-user", "/v1/feedback", j({"completion_id": "chatcmpl-x", "thumbs": "up", "user": LONE}),
         400, "user"),
    Case("surrogate-feedback-id", "/v1/feedback", j({"completion_id": LONE, "thumbs": "up"}), 400, "completion_id"),
    # -- bytes that are not UTF-8 --
    Case("utf8-encoded-surrogate", "/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]}', 400, "messages.0.content"),
    Case("invalid-utf8", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\xff\xfeb"}]}', 400),
    Case("invalid-utf8-feedback", "/v1/feedback", b'{"completion_id": "\xc3", "thumbs": "up"}', 400),
    # -- huge lists --
    Case("many-messages", "/v1/chat/completions", chat(messages=MSG * 5000), 400, "messages"),
    Case("many-content-parts", "/v1/chat/completions",
         j({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 5000}]}), 400,
         "messages.0.content"),
    Case("many-prompts", "/v1/completions", completion(prompt=["x"] * 50_000), 400, "prompt"),
    Case("prompts-times-n", "/v1/completions", completion(prompt=["x"] * 100, n=16), 400, "prompt"),
    Case("many-token-prompts", "/v1/completions", completion(prompt=[[1]] * 50_000), 400, "prompt"),
    Case("many-stops", "/v1/chat/completions", chat(stop=["x"] * 100_000), 400, "stop"),
    Case("many-logit-bias", "/v1/chat/completions", chat(logit_bias={str(i): 1 for i in range(20_000)}), 400,
         "logit_bias"),
    Case("many-stop-token-ids", "/v1/chat/completions", chat(stop_token_ids=[1] * 100_000), 400, "stop_token_ids"),
    Case("many-metadata", "/v1/chat/completions", chat(metadata={f"k{i}": "v" for i in range(10_000)}), 400,
         "metadata"),
    Case("long-metadata-value", "/v1/chat/completions", chat(metadata={"k": "v" * 10_000}), 400, "metadata.k"),
    Case("many-detokenize", "/detokenize", j({"tokens": [1] * 150_000}), 400, "tokens"),
    # -- deep nesting --
    Case("deep-json", "/v1/chat/completions", b"[" * 200_000 + b"]" * 200_000, 400),
    Case("deep-json-in-limit", "/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    Case("deep-extra-field", "/v1/chat/completions", chat(vendor=nested(300)), SERVED),
    Case("deep-content-part", "/v1/chat/completions",
         j({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": nested(300)}]}]}), SERVED),
    # -- oversized bodies --
    Case("oversized-body", "/v1/chat/completions", chat(pad="x" * 2_000_000), 413),
    Case("oversized-feedback", "/v1/feedback", j({"completion_id": "c", "comment": "x" * 2_000_000}), 413),
    # -- absurd numbers --
    Case("huge-max-tokens", "/v1/chat/completions", chat(max_tokens=10**30), 400, "messages"),
    Case("huge-n", "/v1/chat/completions", chat(n=10**9), 400, "n"),
    Case("nan-temperature", "/v1/chat/completions", chat(temperature=float("nan")), 400, "temperature"),
    Case("inf-top-p", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}',
         400, "top_p"),
    Case("inf-repetition-penalty", "/v1/chat/completions", chat(repetition_penalty=float("inf")), 400,
         "repetition_penalty"),
    Case("nan-logit-bias", "/v1/chat/completions", chat(logit_bias={"1": float("nan")}), 400, "logit_bias.1"),
    Case("huge-seed", "/v1/chat/completions", chat(seed=2**64), 400, "seed"),
    Case("huge-top-k", "/v1/chat/completions", chat(top_k=10**30), 400, "top_k"),
    Case("huge-min-tokens", "/v1/chat/completions", chat(min_tokens=10**30), 400, "min_tokens"),
    Case("huge-priority", "/v1/chat/completions", chat(priority=-(2**70)), 400, "priority"),
    Case("huge-top-logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=10**6), 400, "top_logprobs"),
    Case("huge-stop-token-id", "/v1/chat/completions", chat(stop_token_ids=[10**30]), 400, "stop_token_ids.0"),
    Case("huge-token-prompt", "/v1/completions", completion(prompt=[10**30]), 400, "prompt"),
    Case("huge-logit-bias-key", "/v1/chat/completions", chat(logit_bias={"9" * 5000: 1}), 400, "logit_bias"),
    Case("huge-detokenize-id", "/detokenize", j({"tokens": [10**30]}), 400, "tokens.0"),
    Case("huge-rating", "/v1/feedback", j({"completion_id": "c", "rating": 10**30}), 400, "rating"),
    Case("huge-integer-literal", "/v1/chat/completions", b'{"messages": [], "n": ' + b"9" * 5000 + b"}", 400),
]  # fmt: skip


@pytest.fixture
def app_client(settings: ServeSettings, engine: ModelEngine) -> Iterator[TestClient]:
    # A 500 must show as a status here, not as an exception the test client re-raises.
    with TestClient(build_app(settings, engine=engine), raise_server_exceptions=False) as c:
        # The first served request imports vLLM's sampling module (seconds): not what a case is timed for.
        assert c.post("/v1/chat/completions", json={"messages": MSG}).status_code == 200
        yield c


def send(client: TestClient, case: Case) -> None:
    start = time.perf_counter()
    r = client.post(case.path, content=case.body, headers={"content-type": "application/json"})
    took = time.perf_counter() - start
    assert r.status_code == case.status, (case.id, r.status_code, r.text[:500])
    # A stall (a quadratic parse, a blocked loop) takes far longer than this; 1 s failed only under load (1.2 s for
    # 50,000 token prompts at load average 10 on 2 shared cores), which is not what this guards against.
    assert took < 5.0, f"{case.id} took {took:.2f}s"
    if case.status == SERVED:
        return
    error = r.json()["error"]
    assert error["code"] == case.status and error["type"] and error["message"], error
    if case.param is not None:
        assert error["param"] == case.param, (case.id, error)
        assert case.param.split(".")[0] in error["message"], error


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_input_is_refused_naming_the_parameter_or_served(app_client: TestClient, case: Case) -> None:
    send(app_client, case)


def test_a_lone_surrogate_message_names_the_fix(app_client: TestClient) -> None:
    r = app_client.post("/v1/chat/completions", content=chat(user=LONE), headers={"content-type": "application/json"})
    message = r.json()["error"]["message"]
    assert "U+D800" in message and "position 1" in message and "UTF-8" in message


def test_after_the_whole_matrix_completions_and_feedback_still_reach_redis(
    app_client: TestClient, settings: ServeSettings
) -> None:
    for case in CASES:
        send(app_client, case)
    cid = app_client.post("/v1/chat/completions", json={"messages": MSG}).json()["id"]
    r = app_client.post("/v1/feedback", json={"completion_id": cid, "thumbs": "up"})
    assert r.status_code == 200, r.text

    rc = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.redis_prefix)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        feedback = [json.loads(f[b"data"]) for _, f in rc.xrange(keys.feedback)]
        if rc.exists(keys.completion(cid)) and any(f["completion_id"] == cid for f in feedback):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the completion and its feedback did not reach Redis")

    health = app_client.get("/health").json()
    assert health["status"] == "ok", health
    writer = health["log_writer"]
    assert writer["alive"] and writer["redis_reachable"] and writer["restarts"] == 0, writer
    assert writer["rejected"] == 0, writer  # refused at the door: nothing had to be set aside


def test_health_is_degraded_while_the_log_writer_is_not_running(app_client: TestClient) -> None:
    writer = app_client.app.state.writer  # type: ignore[attr-defined]
    assert app_client.get("/health").json()["status"] == "ok"
    app_client.portal.call(writer.stop)  # type: ignore[union-attr]  # as if its task were gone
    health = app_client.get("/health").json()
    assert health["status"] == "degraded" and "log writer is not running" in health["reason"]
    assert health["log_writer"]["alive"] is False
    assert "secondstage_log_writer_up 0.0" in app_client.get("/metrics").text
