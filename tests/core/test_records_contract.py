"""The serve → align record contract (core/records.py), proven across the real code on both sides.

Records are written by the real app (`build_app` over the fake engine of tests/fakes.py, with policies and
a real redis-server) through its HTTP API, and read back by align's real `FeedbackReader` into dataset rows.
The unit tests below pin the two halves of the evolution rule: a value outside a closed set does not decode
(bench once wrote `status: "finished"`), and a field a reader does not know is ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from fastapi.testclient import TestClient

from align.datasets import build_datasets
from align.feedback import FeedbackBatch, FeedbackReader
from core.keys import SCHEMA_VERSION, Keys
from core.records import (
    SCHEMA,
    ChoiceRecord,
    CompletionRecord,
    FeedbackRecord,
    Manifest,
    Message,
    PolicyDecision,
    PolicyPair,
    PolicyTrace,
    RecordError,
    Usage,
    decode,
    encode,
)
from core.redis_server import PrivateRedis
from core.versions import Registry, VersionStore
from serve.app import build_app
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, fake_engine

RULES = """
version: 1
rules:
  - id: be.brief
    description: Operator instructions.
    kind: instructions
    text: Answer briefly.
  - id: out.email
    description: Redact emails in output.
    kind: preset
    preset: email
    stages: [output]
    action: redact
"""

REPLIES = {
    "sky": "The sky is green.",
    "mail": "Write to jane.doe@example.com today.",
    "boil": "Water boils at 100 C.",
}


@pytest.fixture
def settings(tmp_path: Path, redis_server: PrivateRedis) -> ServeSettings:
    rules = tmp_path / "policies"
    rules.mkdir()
    (rules / "contract.yaml").write_text(RULES)
    return ServeSettings(
        var_dir=tmp_path / "var",
        redis_url=redis_server.url,
        served_model_name="demo",
        max_model_len=512,
        policies_enabled=True,
        policies_dir=rules,
    )


@pytest.fixture
def app(settings: ServeSettings) -> Iterator[TestClient]:
    llm = FakeLLM(reply=lambda prompt: next((v for k, v in REPLIES.items() if k in prompt), "fine"))
    with TestClient(build_app(settings, engine=fake_engine(llm, settings))) as c:
        yield c


@pytest.fixture
def rc(settings: ServeSettings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(settings.redis_url or "")
    yield c
    c.close()


def _wait(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_serve_writes_what_align_reads(app: TestClient, rc: redis.Redis, settings: ServeSettings) -> None:
    keys = Keys(settings.redis_prefix)
    chat = app.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "What colour is the sky?"}], "user": "alice", "n": 2},
    ).json()
    with app.stream(
        "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "mail?"}], "stream": True}
    ) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]  # read to the end
    mail_id = chunks[0]["id"]
    legacy = app.post(
        "/v1/completions", json={"prompt": "When does water boil?", "user": "bob", "max_tokens": 64}
    ).json()
    for body in (
        {"completion_id": chat["id"], "choice_index": 1, "thumbs": "down", "correction": "The sky is blue."},
        {"completion_id": legacy["id"], "rating": 5, "comment": "right"},
    ):
        assert app.post("/v1/feedback", json=body).status_code == 200
    _wait(lambda: rc.xlen(keys.feedback) == 2 and rc.xlen(keys.policy_pairs) == 1, "the feedback and the pair")
    _wait(lambda: all(rc.exists(keys.completion(c)) for c in (chat["id"], mail_id, legacy["id"])), "the completions")

    # The layout on Redis is the one docs/architecture.md describes.
    [(_, entry)] = [e for e in rc.xrange(keys.completions) if e[1][b"id"] == chat["id"].encode()]
    assert entry[b"schema"] == SCHEMA_VERSION.encode() and entry[b"data"] == rc.get(keys.completion(chat["id"]))

    batch = FeedbackReader(rc, keys).read()
    assert batch.skipped == {}
    by_completion = {item.completion_id: item for item in batch.feedback}
    sky = by_completion[chat["id"]]
    # The body's `user` is metadata on the record; the identity (anonymous here: no keys) is what caps key on.
    assert sky.user == "anonymous" and sky.completion.user == "alice"
    assert sky.feedback.thumbs == "down" and sky.feedback.choice_index == 1
    record = sky.completion
    assert record.status == "ok" and record.endpoint == "chat" and record.version == "base"
    assert record.messages == [
        Message(role="system", content="Answer briefly."),
        Message(role="user", content="What colour is the sky?"),
    ]
    assert [(c.index, c.text, c.finish_reason) for c in record.choices] == [
        (0, "The sky is green.", "stop"),
        (1, "The sky is green.", "stop"),
    ]
    assert record.usage.completion_tokens == 2 * len("The sky is green.") and record.params["n"] == 2
    [instruct] = record.policy.decisions
    assert (instruct.rule_id, instruct.action, instruct.stage, instruct.choice) == (
        "be.brief",
        "instruct",
        "input",
        None,
    )
    assert record.policy.ruleset == instruct.ruleset_version

    boil = by_completion[legacy["id"]]
    assert boil.completion.endpoint == "completions" and boil.completion.user == "bob" and boil.user == "anonymous"
    assert boil.feedback.rating == 5 and boil.feedback.thumbs is None

    [pair] = batch.policy_pairs
    assert (pair.id, pair.completion_id) == (f"pp-{mail_id}-0", mail_id)
    # The rejected side masks what the rule caught (store_raw_output keeps it in clear).
    assert pair.pair.rejected == "Write to [withheld] today." and pair.pair.chosen == "Write to [EMAIL] today."
    assert pair.pair.rule_ids == ["out.email"]
    mail = decode(rc.get(keys.completion(mail_id)) or b"", CompletionRecord)
    [redact] = [d for d in mail.policy.decisions if d.stage == "output"]
    assert (redact.action, redact.mode, redact.choice, redact.span) == ("redact", "enforce", 0, (9, 29))
    assert mail.choices[0].raw_text is None  # the unfiltered text only with store_raw_output

    data = build_datasets(batch)
    sky_prompt = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What colour is the sky?"},
    ]
    # The sky's thumbs-down came with a correction: its DPO pair says what was wrong, no KTO row beside it
    # (align/datasets.py: an undesirable row would push the whole answer down, correct content included).
    assert data.counts["kto_covered_by_correction"] == 1
    assert data.kto_rows == [
        {
            "prompt": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "When does water boil?"},
            ],
            "completion": [{"role": "assistant", "content": "Water boils at 100 C."}],
            "label": True,
        },
    ]
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in data.dpo_rows] == [
        ("The sky is blue.", "The sky is green."),
        ("Write to [EMAIL] today.", "Write to [withheld] today."),
    ]
    assert data.dpo_rows[0]["prompt"] == sky_prompt
    assert sorted(data.feedback_ids) == sorted(item.id for item in batch.feedback)
    assert data.policy_pair_ids == [f"pp-{mail_id}-0"]


# -- the evolution rule -----------------------------------------------------------------------------------


def completion(**changes: Any) -> CompletionRecord:
    record = CompletionRecord(
        id="chatcmpl-1",
        created=1.0,
        model="demo",
        version="v3",
        status="ok",
        messages=[Message(role="user", content="Hi?")],
        choices=[ChoiceRecord(index=0, text="Hello.", finish_reason="stop", completion_tokens=2)],
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        latency_s=0.5,
        policy=PolicyTrace(
            ruleset="abc",
            decisions=[
                PolicyDecision(
                    rule_id="r",
                    kind="instructions",
                    action="instruct",
                    mode="enforce",
                    stage="input",
                    ruleset_version="abc",
                )
            ],
        ),
    )
    return msgspec.structs.replace(record, **changes)


def _json(record: Any) -> dict[str, Any]:
    return json.loads(encode(record))


def test_schema_version_of_records_and_stream_entries_agree() -> None:
    assert str(SCHEMA) == SCHEMA_VERSION
    assert _json(completion())["schema"] == SCHEMA and _json(completion())["kind"] == "completion"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("status",), "finished"),  # what bench/logwriter.py used to write
        (("policy", "decisions", 0, "action"), "prepend"),  # ditto
        (("endpoint",), "embeddings"),
        (("choices", 0, "finish_reason"), "done"),
        (("messages", 0, "role"), "robot"),
        (("kind",), "feedback"),
        (("schema",), 2),  # a breaking version this reader does not know
    ],
)
def test_a_value_outside_the_contract_does_not_decode(path: tuple[Any, ...], value: Any) -> None:
    data = _json(completion())
    target = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(RecordError, match=str(path[-1])):
        decode(json.dumps(data), CompletionRecord)


@pytest.mark.parametrize(
    "change", [{"thumbs": "sideways"}, {"rating": 9}, {"choice_index": -1}, {"completion_id": None}]
)
def test_invalid_feedback_does_not_decode(change: dict[str, Any]) -> None:
    data = _json(FeedbackRecord(id="fb-1", completion_id="chatcmpl-1", created=1.0, thumbs="up"))
    with pytest.raises(RecordError):
        decode(json.dumps({**data, **change}), FeedbackRecord)


def test_unknown_fields_are_ignored_and_missing_defaults_filled() -> None:
    data = _json(completion())
    data["served_by"] = "replica-7"  # a field a newer server added
    data["choices"][0]["logprob_sum"] = -1.5
    data["policy"]["decisions"][0]["severity"] = "high"
    del data["endpoint"], data["policy"], data["metadata"]  # fields an older server may not have written
    record = decode(json.dumps(data), CompletionRecord)
    assert record == completion(policy=PolicyTrace())
    assert record.endpoint == "chat"


def test_reader_skips_a_drifted_completion_and_reads_a_newer_feedback(redis_server: PrivateRedis) -> None:
    client = redis.Redis.from_url(redis_server.url)
    keys = Keys("contract")
    try:
        drifted = {**_json(completion(id="chatcmpl-old")), "status": "finished"}
        client.set(keys.completion("chatcmpl-old"), json.dumps(drifted))
        client.set(keys.completion("chatcmpl-1"), encode(completion()))
        for fb_id, cid in (("fb-old", "chatcmpl-old"), ("fb-new", "chatcmpl-1")):
            newer = {**_json(FeedbackRecord(id=fb_id, completion_id=cid, created=1.0, thumbs="up")), "mood": "happy"}
            client.xadd(keys.feedback, {"schema": SCHEMA_VERSION, "id": fb_id, "data": json.dumps(newer)})
        client.xadd(keys.feedback, {"schema": SCHEMA_VERSION, "id": "fb-bad", "data": '{"thumbs": "up"}'})
        # A pair written before pairs carried their ids: the ids come from the entry's fields.
        old_pair = {k: v for k, v in _json(PolicyPair(prompt=[], chosen="a", rejected="b")).items() if k != "id"}
        client.xadd(
            keys.policy_pairs, {"schema": "1", "id": "pp-1", "completion_id": "c", "data": json.dumps(old_pair)}
        )
        batch = FeedbackReader(client, keys).read(consume=False)
    finally:
        client.close()
    assert [f.id for f in batch.feedback] == ["fb-new"]
    assert batch.skipped == {"malformed_completion": 1, "missing_completion": 1, "malformed": 1}
    assert [(p.id, p.completion_id) for p in batch.policy_pairs] == [("pp-1", "c")]
    assert build_datasets(FeedbackBatch(feedback=batch.feedback)).kto_rows[0]["label"] is True


def test_manifest_round_trips_and_reads_manifests_written_before_the_schema_field(
    tmp_path: Path, redis_server: PrivateRedis
) -> None:
    store = VersionStore(tmp_path / "versions")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    manifest = Manifest(
        version="v1", base_model="demo", feedback_ids=["fb-1"], datasets={"dpo": 1}, gate={"passed": True}
    )
    store.write(manifest, adapter)
    assert store.manifest("v1") == manifest
    assert json.loads((tmp_path / "versions" / "v1" / "manifest.json").read_text())["schema"] == SCHEMA
    # The pydantic Manifest of earlier versions wrote no `schema`; such files still read.
    old = {k: v for k, v in _json(manifest).items() if k != "schema"}
    (tmp_path / "versions" / "v1" / "manifest.json").write_text(json.dumps(old))
    assert store.manifest("v1") == manifest
    client = redis.Redis.from_url(redis_server.url)
    try:
        registry = Registry(client, Keys("contract"))
        registry.register(manifest)
        assert registry.manifests() == {"v1": manifest}
    finally:
        client.close()
