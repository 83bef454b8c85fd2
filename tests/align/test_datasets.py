"""Dataset building from each kind of feedback (no Redis, no training)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from datasets import load_dataset

from align.datasets import build_datasets, export_jsonl, kto_label
from align.feedback import FeedbackBatch, FeedbackItem, PolicyPairItem
from core.records import ChoiceRecord, CompletionRecord, FeedbackRecord, Message, PolicyPair, Usage

PROMPT = [{"role": "user", "content": "What colour is the sky?"}]


def completion(*answers: str) -> CompletionRecord:
    return CompletionRecord(
        id="chatcmpl-1",
        created=0.0,
        model="tiny",
        version="base",
        status="ok",
        messages=[Message(role="user", content="What colour is the sky?")],
        choices=[
            ChoiceRecord(index=i, text=a, finish_reason="stop", completion_tokens=1) for i, a in enumerate(answers)
        ],
        usage=Usage(),
        latency_s=0.0,
    )


def feedback(fb_id: str = "f", **fields: Any) -> FeedbackRecord:
    return FeedbackRecord(id=fb_id, completion_id="chatcmpl-1", created=0.0, **fields)


def item(fb_id: str, record: CompletionRecord, **fields: Any) -> FeedbackItem:
    return FeedbackItem(
        id=fb_id,
        entry_id=f"{fb_id}-0",
        completion_id=record.id,
        feedback=feedback(fb_id, **fields),
        completion=record,
        user="u",
    )


def test_thumbs_become_kto_rows_in_conversational_format() -> None:
    rec = completion("Green.")
    data = build_datasets(FeedbackBatch(feedback=[item("a", rec, thumbs="up"), item("b", rec, thumbs="down")]))
    assert data.dpo_rows == []
    assert data.kto_rows == [
        {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "Green."}], "label": True},
        {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "Green."}], "label": False},
    ]
    assert data.feedback_ids == ["a", "b"]
    assert data.summary()["kto_desirable"] == 1 and data.summary()["kto_undesirable"] == 1


def test_ratings_map_to_labels_and_thumbs_win() -> None:
    assert kto_label(feedback(rating=5)) is True
    assert kto_label(feedback(rating=4)) is True
    assert kto_label(feedback(rating=3)) is None
    assert kto_label(feedback(rating=2)) is False
    assert kto_label(feedback(rating=1)) is False
    assert kto_label(feedback(thumbs="up", rating=1)) is True
    assert kto_label(feedback(comment="meh")) is None
    rec = completion("Green.")
    data = build_datasets(FeedbackBatch(feedback=[item("a", rec, rating=3, comment="ok")]))
    assert data.usable == 0 and data.feedback_ids == []
    assert data.summary()["feedback_without_rows"] == 1


def test_correction_becomes_dpo_pair_against_the_answered_choice() -> None:
    rec = completion("Green.", "Red.")
    data = build_datasets(FeedbackBatch(feedback=[item("a", rec, choice_index=1, correction="Blue.")]))
    assert data.dpo_rows == [
        {
            "prompt": PROMPT,
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Red."}],
        }
    ]
    assert data.summary()["dpo_correction"] == 1


def test_correction_with_thumbs_down_trains_only_as_the_pair() -> None:
    # An undesirable KTO row would push down the whole answer, the content the correction kept included.
    rec = completion("Green.")
    data = build_datasets(FeedbackBatch(feedback=[item("a", rec, thumbs="down", correction="Blue.")]))
    assert len(data.dpo_rows) == 1 and data.kto_rows == []
    assert data.usable == 1 and data.feedback_ids == ["a"]
    assert data.summary()["kto_covered_by_correction"] == 1


def test_correction_with_thumbs_down_gives_both_rows_when_asked() -> None:
    rec = completion("Green.")
    batch = FeedbackBatch(feedback=[item("a", rec, thumbs="down", correction="Blue."), item("b", rec, thumbs="down")])
    data = build_datasets(batch, kto_on_corrected=True)
    assert len(data.dpo_rows) == 1 and len(data.kto_rows) == 1  # the identical thumbs-down row is kept once
    assert "kto_covered_by_correction" not in data.summary()


def test_thumbs_up_with_correction_keeps_its_desirable_row() -> None:
    rec = completion("Blue.")
    data = build_datasets(FeedbackBatch(feedback=[item("a", rec, thumbs="up", correction="Blue!")]))
    assert len(data.dpo_rows) == 1 and [r["label"] for r in data.kto_rows] == [True]


def test_thumbs_down_without_correction_is_still_undesirable() -> None:
    rec = completion("You fool.")
    data = build_datasets(FeedbackBatch(feedback=[item("a", rec, thumbs="down", correction="  ")]))
    assert [r["label"] for r in data.kto_rows] == [False] and data.dpo_rows == []


def test_preferred_choice_pairs_against_each_other_choice() -> None:
    rec = completion("Blue.", "Green.", "Red.", "Blue.")
    data = build_datasets(FeedbackBatch(feedback=[item("a", rec, preferred_choice=0)]))
    chosen = {r["chosen"][0]["content"] for r in data.dpo_rows}
    rejected = [r["rejected"][0]["content"] for r in data.dpo_rows]
    assert chosen == {"Blue."}
    # The identical fourth choice is no preference; it is counted, not trained on.
    assert sorted(rejected) == ["Green.", "Red."]
    assert data.summary()["skipped_same_text"] == 1


def test_policy_pairs_become_dpo_pairs() -> None:
    pair = PolicyPairItem(
        id="pp-1",
        entry_id="1-0",
        completion_id="chatcmpl-1",
        pair=PolicyPair(
            prompt=[Message(role="user", content="What colour is the sky?")],
            chosen="I can't help with that.",
            rejected="Here is how to do it.",
            rule_ids=["r1"],
            ruleset_version="1",
        ),
    )
    data = build_datasets(FeedbackBatch(policy_pairs=[pair]))
    assert data.policy_pair_ids == ["pp-1"]
    assert data.dpo_rows[0]["chosen"] == [{"role": "assistant", "content": "I can't help with that."}]
    assert data.summary()["dpo_policy"] == 1


def test_identical_rows_are_kept_once() -> None:
    rec = completion("Green.")
    batch = FeedbackBatch(feedback=[item(f"f{i}", rec, correction="Blue.") for i in range(5)])
    data = build_datasets(batch)
    assert len(data.dpo_rows) == 1
    assert data.summary()["duplicate_rows"] == 4
    assert data.feedback_ids == ["f0"]


def test_bad_choice_index_is_counted_not_trained() -> None:
    rec = completion("Green.")
    data = build_datasets(FeedbackBatch(feedback=[item("a", rec, choice_index=3, thumbs="up")]))
    assert data.usable == 0
    assert data.summary()["skipped_bad_choice"] == 1


def test_skips_from_reading_are_reported() -> None:
    data = build_datasets(FeedbackBatch(skipped=Counter(missing_completion=2, duplicate=1)))
    assert data.summary()["skipped_missing_completion"] == 2
    assert data.summary()["skipped_duplicate"] == 1


def test_export_writes_jsonl_that_datasets_loads(tmp_path: Path) -> None:
    data = build_datasets(
        FeedbackBatch(
            feedback=[
                item("a", completion("Green."), correction="Blue."),
                item("b", completion("Green."), thumbs="down"),
            ]
        )
    )
    paths = export_jsonl(data, tmp_path / "out")
    lines = paths["dpo"].read_text().splitlines()
    assert [json.loads(x) for x in lines] == data.dpo_rows
    loaded = load_dataset("json", data_files=str(paths["kto"]), split="train")
    assert loaded[0]["label"] is False
    assert loaded[0]["completion"] == [{"role": "assistant", "content": "Green."}]
