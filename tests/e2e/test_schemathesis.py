"""schemathesis against our own /openapi.json: generated requests on the public routes, real engine.

For every public operation, schema-valid and schema-invalid requests are generated from
the OpenAPI document the server publishes. Checks: no 5xx for any input, every status
declared, every body matching its declared schema, content types and headers as declared.

Not checked, by design (docs/api.md): "schema-valid input accepted" — some rules span fields
or need the model (`top_logprobs` needs `logprobs`, token ids within the vocabulary, prompt
within the context, feedback on a completion that exists), so a schema-valid body can rightly
get a 400/404; and "schema-invalid input rejected" — like vLLM's server we parse with pydantic's
lax mode, which takes `"1"` or `true` where an integer is declared.

Bounded: a fixed number of examples per operation and mode, and a handful of tokens per
generation (`keep_small` caps `max_tokens`, `n` and prompt lists of schema-valid bodies).
After the fuzzing, a completion and its feedback must still reach Redis: no generated input may stop
the log writer. Run: `.venv/bin/python -m pytest tests/e2e/test_schemathesis.py`.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from core.keys import Keys
from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

PUBLIC = re.compile(r"^/(v1/(chat/completions|completions|models|feedback)|tokenize|detokenize|health)$")
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/feedback"),
    ("GET", "/health"),
]
# See the module docstring; request parsing is lax like vLLM's (`"1"` or `true` pass as an integer),
# so "schema-invalid input rejected" cannot hold for every generated body either.
NOT_CHECKED = [positive_data_acceptance, negative_data_rejection]
GENERATING = {"/v1/chat/completions", "/v1/completions"}
MAX_TOKENS = 4
EXAMPLES = 25


@pytest.fixture(scope="module")
def api_schema(server: Server) -> Any:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_every_public_route_is_fuzzed(api_schema: Any) -> None:
    published = {
        (method.upper(), path)
        for path, ops in api_schema.raw_schema["paths"].items()
        for method in ops
        if PUBLIC.match(path)
    }
    assert published == set(OPERATIONS)


def keep_small(case: Any) -> None:
    """Cap the generation a schema-valid body asks for: the point is the HTTP layer, not long texts."""
    body = case.body
    if case.path not in GENERATING or not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and not isinstance(body.get(field), bool):
            body[field] = max(1, min(body[field], MAX_TOKENS))
    if body.get("max_completion_tokens") is None:
        body["max_tokens"] = min(body.get("max_tokens") or MAX_TOKENS, MAX_TOKENS)
    if isinstance(body.get("min_tokens"), int):
        body["min_tokens"] = min(body["min_tokens"], 1)
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 2)
    if isinstance(body.get("prompt"), list):
        body["prompt"] = body["prompt"][:3]


# Both modes for every operation that takes input; GET routes without parameters have nothing to make invalid.
CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or method != "GET"
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_route_conforms_to_openapi(method: str, path: str, mode: GenerationMode, api_schema: Any) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        if mode is GenerationMode.POSITIVE:
            keep_small(case)  # schema-invalid bodies are rejected before the engine: leave them as generated
        case.call_and_validate(excluded_checks=NOT_CHECKED, timeout=120)

    run()


def test_after_the_fuzzing_a_completion_and_its_feedback_still_reach_redis(server: Server) -> None:
    """Nothing the fuzzer sent stopped the log writer (issue 10: one lone surrogate used to)."""
    # Runs after the fuzzing tests above (pytest keeps a module's order).
    with httpx.Client(base_url=server.url, timeout=120) as http:
        done = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        )
        assert done.status_code == 200, done.text
        cid = done.json()["id"]
        fb = http.post("/v1/feedback", json={"completion_id": cid, "thumbs": "up"})
        assert fb.status_code == 200, fb.text

        keys = Keys(server.env.get("SECONDSTAGE_REDIS_PREFIX", "secondstage"))
        rc = redis.Redis.from_url(server.redis.url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            feedback = [f.get(b"completion_id") for _, f in rc.xrange(keys.feedback)]
            if rc.exists(keys.completion(cid)) and cid.encode() in feedback:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"completion {cid} and its feedback did not reach Redis after the fuzzing")

        writer = http.get("/health").json()["log_writer"]
        assert writer["alive"] and writer["redis_reachable"] and writer["restarts"] == 0, writer
