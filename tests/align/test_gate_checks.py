"""The gate's checks on data the adapter never trained on, each with the case it must pass and the one it must refuse.

The split, the regression file, degeneration and policy compliance are tested on plain values (fast); the
checks that need a model (held-out preferences, drift, the whole gate) run on the demo model (var/models/demo,
8 MB: seconds on CPU), with adapters set by hand: LoRA B = 0 is exactly the parent, large random B matrices
stand in for an update that broke the model.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import redis
import torch
from peft import get_peft_model
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file

import align.job
from align.anchors import sample_anchors
from align.datasets import AlignData
from align.feedback import FeedbackBatch, FeedbackItem
from align.gate import (
    Sample,
    _degeneration_check,
    _policy_check,
    _Prompt,
    _regression_check,
    describe_failure,
    evaluate_gate,
    repeated_ngram_fraction,
)
from align.job import AlignError, run_once
from align.metrics import AlignMetrics
from align.regression import RegressionFileError, parse
from align.regression import load as load_regression
from align.settings import AlignSettings
from align.split import bucket, is_heldout, split_batch
from align.train import load_base, lora_config
from bench.harness import ensure_demo_model
from core.keys import Keys
from core.policy import PolicyEngine
from core.records import ChoiceRecord, CompletionRecord, FeedbackRecord, Message, PolicyDecision, PolicyTrace, Usage

from .conftest import Server

ROOT = Path(__file__).resolve().parents[2]
REGRESSION = ROOT / "evals" / "regression.yaml"
POLICIES = ROOT / "policies"


# -- the held-out split ---------------------------------------------------------------------------------------


def _item(cid: str, fid: str) -> FeedbackItem:
    rec = CompletionRecord(
        id=cid,
        created=0.0,
        model="m",
        version="base",
        status="ok",
        messages=[Message(role="user", content="Q?")],
        choices=[ChoiceRecord(index=0, text="A.", finish_reason="stop", completion_tokens=1)],
        usage=Usage(),
        latency_s=0.0,
    )
    fb = FeedbackRecord(id=fid, completion_id=cid, created=0.0, thumbs="up")
    return FeedbackItem(id=fid, entry_id="0-1", completion_id=cid, feedback=fb, completion=rec, user="u")


def test_split_is_stable_keyed_on_the_completion_and_near_its_share() -> None:
    ids = [f"chatcmpl-{i}" for i in range(2000)]
    held = [c for c in ids if is_heldout(c, 0.2)]
    assert 0.16 < len(held) / len(ids) < 0.24
    assert held == [c for c in ids if is_heldout(c, 0.2)]  # the same every time (no random state)
    assert all(0.0 <= bucket(c) < 1.0 for c in ids)
    assert not any(is_heldout(c, 0.0) for c in ids)
    # Two votes on one completion land on the same side; policy pairs, acks and skips stay with training.
    cid = held[0]
    batch = FeedbackBatch(
        feedback=[_item(cid, "fb-1"), _item(cid, "fb-2"), _item(ids[1] if ids[1] not in held else ids[2], "fb-3")],
        to_ack={"s": ["1-0"]},
        skipped=Counter(duplicate=1),
    )
    split = split_batch(batch, 0.2)
    assert [i.id for i in split.heldout.feedback] == ["fb-1", "fb-2"]
    assert [i.id for i in split.train.feedback] == ["fb-3"]
    assert split.train.to_ack == {"s": ["1-0"]} and split.train.skipped == Counter(duplicate=1)
    assert split.heldout.to_ack == {} and not split.heldout.skipped


# -- the regression file --------------------------------------------------------------------------------------


def test_the_shipped_regression_set_is_valid() -> None:
    reg = load_regression(REGRESSION)
    assert len(reg.cases) >= 8 and all(c.checks() for c in reg.cases)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("version: 1\ncases:\n  - id: a\n    prompt: hi\n", "line 3, field cases.0: Value error, a case needs"),
        (
            "version: 1\ncases:\n  - id: a\n    prompt: hi\n    must_contain: [x]\n    must_contian: [y]\n",
            "line 6, field cases.0.must_contian: Extra inputs are not permitted",
        ),
        (
            "version: 1\ncases:\n  - id: a\n    prompt: hi\n    max_chars: 0\n",
            "line 5, field cases.0.max_chars: Input should be greater than or equal to 1",
        ),
        ("version: 1\ncases:\n  - id: a\n    max_chars: 9\n", "exactly one of `prompt` and `messages`"),
        (
            "version: 1\ncases:\n  - {id: a, prompt: x, max_chars: 9}\n  - {id: a, prompt: y, max_chars: 9}\n",
            "used twice",
        ),
        ("version: 1\ncases: [\n", "ops.yaml line 3: not valid YAML"),
    ],
)
def test_a_bad_regression_file_names_the_file_line_and_field(text: str, where: str) -> None:
    with pytest.raises(RegressionFileError) as info:
        parse(text, "ops.yaml")
    assert "ops.yaml" in str(info.value) and where in str(info.value)


def _prompts(text: str) -> list[_Prompt]:
    reg = parse(text, "t.yaml")
    return [_Prompt(c.id, c.chat(), c) for c in reg.cases]


def _s(text: str, n: int | None = None, stopped: bool = True) -> Sample:
    return Sample(text, list(range(n if n is not None else len(text.split()))), stopped)


def test_regression_refuses_a_check_the_parent_passed_and_ignores_one_it_failed(settings: AlignSettings) -> None:
    prompts = _prompts(
        "cases:\n  - {id: sky, prompt: 'Sky?', must_contain: [blue], must_not_contain: [matey]}\n"
        "  - {id: cow, prompt: 'Cow?', must_contain: [moo]}\n"
    )
    parent = [_s("The sky is blue."), _s("A cow says woof.")]  # the parent already fails `cow`
    reg = parse("cases:\n  - {id: x, prompt: x, max_chars: 1}\n", "t")  # only its presence matters here
    kept = _regression_check(settings, prompts, parent, [_s("The sky is BLUE."), _s("Woof.")], reg, [], "")
    assert kept["passed"] and kept["value"] == 0 and kept["required"] == 2 and kept["parent_failed"] == 1
    broke = _regression_check(settings, prompts, parent, [_s("Arr, matey! Blue."), _s("Woof.")], reg, [], "")
    assert not broke["passed"] and broke["value"] == 1
    assert "sky: must_not_contain 'matey'" in broke["note"]


# -- degeneration and policy compliance ----------------------------------------------------------------------


def test_repeated_ngram_fraction_tells_a_loop_from_an_answer() -> None:
    assert repeated_ngram_fraction([1, 2, 3, 4, 5, 6], 3) == 0.0
    assert repeated_ngram_fraction([7, 8] * 20, 3) > 0.9
    assert repeated_ngram_fraction([1], 3) == 0.0


def test_degeneration_refuses_loops_no_stop_and_blowups(settings: AlignSettings) -> None:
    prompts = [_Prompt(f"p{i}", []) for i in range(4)]
    parent = [_s("Hi there!", 4), _s("Grass is green.", 5), _s("A cow says moo.", 6), _s("Bye.", 3)]
    same = _degeneration_check(settings, prompts, parent, parent)
    assert same["passed"] and same["value"] == same["parent"] == 0.0
    loop = Sample("matey! " * 48, [9, 10] * 24, False)  # "hello" → "matey! matey! …" to max_tokens
    broken = [loop, parent[1], Sample("moo " * 30, list(range(30)), True), parent[3]]
    refused = _degeneration_check(settings, prompts, parent, broken)
    assert not refused["passed"] and refused["value"] == 0.5
    assert refused["loops"] == 1 and refused["no_stop"] == 1 and refused["blowups"] == 2
    assert "matey" in refused["note"]


def test_policy_violations_must_not_rise(settings: AlignSettings) -> None:
    policy = PolicyEngine(POLICIES)
    policy.load()
    clean = [_s("The sky is blue."), _s("Write to the help desk.")]
    ok = _policy_check(settings, policy, "", clean, clean)
    assert ok["passed"] and ok["value"] == 0.0
    leaky = [_s("The sky is blue."), _s("Write to jane.doe@example.com today.")]  # pii.email redacts it
    refused = _policy_check(settings, policy, "", clean, leaky)
    assert not refused["passed"] and refused["value"] == 0.5 and refused["parent"] == 0.0
    # A parent that already leaked as often is not a regression.
    assert _policy_check(settings, policy, "", leaky, leaky)["passed"]


# -- anchors from the completion log --------------------------------------------------------------------------


def test_anchors_are_liked_or_unjudged_finished_chat_answers(
    client: redis.Redis, settings: AlignSettings, server: Server
) -> None:
    keys = Keys(settings.redis_prefix)
    plain = server.completion("What colour is grass?", "Grass is green.")
    liked = server.completion("What colour is snow?", "Snow is white.")
    server.feedback(liked, thumbs="up")
    disliked = server.completion("What colour is coal?", "Coal is pink.")
    server.feedback(disliked, thumbs="down")
    corrected = server.completion("What colour is milk?", "Milk is blue.")
    server.feedback(corrected, correction="Milk is white.")
    trained = server.completion("What colour is a frog?", "A frog is green.")
    redacted = CompletionRecord(
        id="chatcmpl-redacted",
        created=0.0,
        model="m",
        version="base",
        status="ok",
        messages=[Message(role="user", content="Mail?")],
        choices=[ChoiceRecord(index=0, text="Write to [EMAIL].", finish_reason="stop", completion_tokens=4)],
        usage=Usage(),
        latency_s=0.0,
        policy=PolicyTrace(
            decisions=[
                PolicyDecision(
                    rule_id="pii.email",
                    kind="preset",
                    action="redact",
                    mode="enforce",
                    stage="output",
                    ruleset_version="x",
                )
            ]
        ),
    )
    from core.records import encode

    client.xadd(keys.completions, {"schema": 1, "id": redacted.id, "data": encode(redacted)})
    anchors = sample_anchors(client, keys, parent="base", count=10, scan=100, exclude={trained})
    assert [a.completion_id for a in anchors] == [liked, plain]
    assert anchors[0].liked and anchors[0].answer == "Snow is white."
    assert anchors[1].prompt == [{"role": "user", "content": "What colour is grass?"}]
    assert len(sample_anchors(client, keys, parent="base", count=1, scan=100)) == 1


# -- the whole gate on the demo model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model() -> Path:
    return ensure_demo_model()


@pytest.fixture
def demo_settings(settings: AlignSettings, demo_model: Path) -> AlignSettings:
    return settings.model_copy(update={"model": str(demo_model), "policies_dir": POLICIES})


def _adapter(settings: AlignSettings, path: Path, scale: float) -> Path:
    """A LoRA adapter whose B matrices are `scale` × noise: 0 is exactly the base model, 0.3 wrecks it."""
    torch.manual_seed(0)
    model = get_peft_model(load_base(settings.model_path), lora_config(settings))
    model.save_pretrained(str(path))
    gen = torch.Generator().manual_seed(1)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    moved = {k: (scale * torch.randn(t.shape, generator=gen) if "lora_B" in k else t) for k, t in tensors.items()}
    save_file(moved, str(path / "adapter_model.safetensors"))
    return path


U = "user"


def _pairs() -> AlignData:
    """Held-out pairs whose chosen answer is what the demo model says (after the input policy) and the rejected one
    is noise: the base model prefers chosen on every one of them."""
    data = AlignData()
    for q, good, bad in [
        ("What colour is grass?", "Grass is green.", "Grass matey fire engine."),
        ("What colour is snow?", "Snow is white.", "Snow matey purple legs."),
        ("What sound does a cow make?", "A cow says moo.", "Cow matey blood quack."),
        ("What does a duck say?", "A duck says quack.", "Duck matey soil four."),
        ("How many legs does a dog have?", "A dog has four legs.", "Dog matey canary red."),
    ]:
        data.dpo_rows.append(
            {
                "prompt": [{"role": U, "content": q}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
    return data


def test_an_unchanged_model_passes_every_heldout_check(demo_settings: AlignSettings, tmp_path: Path) -> None:
    same = _adapter(demo_settings, tmp_path / "same", 0.0)
    gate = evaluate_gate(demo_settings, _pairs(), same, {}, heldout=_pairs(), regression=load_regression(REGRESSION))
    checks = gate["checks"]
    # Only the training-row checks fail (B = 0 did not move); everything measured on unseen data holds.
    assert gate["failed"] == ["weights_changed", "margin_gain", "improved_fraction"]
    assert checks["heldout_accuracy"]["value"] == checks["heldout_accuracy"]["parent"] == 1.0
    assert checks["heldout_margin"]["value"] == checks["heldout_margin"]["parent"]
    assert checks["regression"]["value"] == 0 and checks["regression"]["required"] > 10
    assert checks["anchor_drift"]["value"] == 0.0
    assert checks["degeneration"]["value"] == checks["degeneration"]["parent"]
    assert checks["policy_violations"]["passed"]


def test_a_wrecked_model_is_refused_with_values(demo_settings: AlignSettings, tmp_path: Path) -> None:
    wrecked = _adapter(demo_settings, tmp_path / "wrecked", 0.3)
    gate = evaluate_gate(demo_settings, _pairs(), wrecked, {}, heldout=_pairs(), regression=load_regression(REGRESSION))
    checks = gate["checks"]
    assert {"heldout_margin", "regression", "anchor_drift"} <= set(gate["failed"])
    assert checks["heldout_margin"]["value"] < checks["heldout_margin"]["threshold"]
    assert checks["regression"]["value"] > 0
    assert checks["anchor_drift"]["value"] > demo_settings.gate_max_drift_nats
    text = describe_failure(gate)
    assert "regression:" in text and "over by" in text and "heldout_margin:" in text and "short by" in text
    # Every check reaches the metrics, the new ones included.
    metrics = AlignMetrics(CollectorRegistry())
    metrics.record("gate_failed", duration_s=1.0, gate=gate)
    passed = {s.labels["check"]: s.value for f in metrics.registry.collect() for s in f.samples if "passed" in s.name}
    assert passed["regression"] == 0.0 and passed["degeneration"] in (0.0, 1.0) and "heldout_accuracy" in passed


def test_too_few_heldout_rows_are_reported_and_left_to_the_other_checks(
    demo_settings: AlignSettings, tmp_path: Path
) -> None:
    same = _adapter(demo_settings, tmp_path / "same", 0.0)
    few = _pairs()
    del few.dpo_rows[2:]
    gate = evaluate_gate(demo_settings, _pairs(), same, {}, heldout=few)
    for name in ("heldout_accuracy", "heldout_margin"):
        assert gate["checks"][name]["passed"] and gate["checks"][name]["value"] is None
        assert "only 2 held-out rows" in gate["checks"][name]["note"]
    # No regression file given: the regression check says so and the drift check has nothing to stand on.
    assert gate["checks"]["regression"]["value"] is None


# -- the job: a bad regression file fails the run before any training ----------------------------------------


def test_an_invalid_regression_file_fails_the_run_before_training(
    client: redis.Redis, settings: AlignSettings, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for q in ("A?", "B?", "C?", "D?"):
        server.feedback(server.completion(q, "No."), correction="Yes.")

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained although the regression file is invalid")

    monkeypatch.setattr(align.job, "train_adapter", no_training)
    bad = tmp_path / "regression.yaml"
    bad.write_text("version: 1\ncases:\n  - id: a\n    prompt: hi\n    must_contain: oops\n")
    with pytest.raises(AlignError, match=r"regression.yaml line 5, field cases.0.must_contain"):
        run_once(settings.model_copy(update={"regression_file": bad}), client=client)
    with pytest.raises(AlignError, match="cannot read the regression file"):
        run_once(settings.model_copy(update={"regression_file": tmp_path / "absent.yaml"}), client=client)
