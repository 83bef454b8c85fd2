"""/v1/completions, /tokenize and /detokenize over a fake engine."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient


def test_completion_prompts_and_echo(client: TestClient) -> None:
    r = client.post(
        "/v1/completions", json={"prompt": ["<user>ab", "<user>cd"], "n": 2, "max_tokens": 64, "echo": True}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == "<user>ab" + "echo: ab"
    assert body["choices"][3]["text"] == "<user>cd" + "echo: cd"
    assert body["usage"]["prompt_tokens"] == 16
    assert body["system_fingerprint"] == "base"


def test_completion_default_max_tokens_and_logprobs(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "<user>hello there, a long one", "logprobs": 1})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["text"]) == 16  # OpenAI's default max_tokens
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 16 and lp["text_offset"][:2] == [0, 1] and len(lp["top_logprobs"][0]) == 1


def test_completion_stream(client: TestClient) -> None:
    with client.stream(
        "POST",
        "/v1/completions",
        json={"prompt": [list(b"<user>hi")], "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]).endswith("hi")
    assert chunks[-1]["usage"]["prompt_tokens"] == 8


def test_completion_errors(client: TestClient) -> None:
    for body, param in [
        ({"prompt": []}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x" * 600}, "prompt"),
        ({"prompt": "x", "model": "nope"}, "model"),
    ]:
        r = client.post("/v1/completions", json=body)
        assert r.status_code in (400, 404), (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())


def test_tokenize_detokenize(client: TestClient) -> None:
    r = client.post("/tokenize", json={"prompt": "hi"})
    assert r.json() == {"count": 2, "max_model_len": 512, "tokens": [104, 105]}
    r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["count"] == len("<user>hi<assistant>")
    assert client.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    r = client.post("/detokenize", json={"tokens": [999999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert client.post("/tokenize", json={}).status_code == 400
