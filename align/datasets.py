"""Turn feedback into TRL datasets, in TRL's conversational format so the model's chat template applies.

- thumbs up/down → a KTO row (`prompt` = the request messages, `completion` = [assistant answer], `label`);
  without thumbs, a rating ≥ 4 is desirable and ≤ 2 undesirable (3 says nothing);
- a correction → a DPO pair: chosen = the correction, rejected = the model's answer for that choice. A thumbs-down
  (or low rating) that comes with a correction makes no KTO row: the pair already says what was wrong, and an
  undesirable row would push down every token of the answer, including the content the correction kept (counted
  as `kto_covered_by_correction`);
- a preferred choice (n > 1) → DPO pairs: the preferred answer against each other choice;
- a policy pair → a DPO pair: chosen = the enforced rewrite, rejected = what the model said.

The records arrive typed and validated (core/records.py), so a row is built from fields, never guessed from dict
keys. Identical rows are kept once (a cap against copy-paste poisoning). `export_jsonl` writes the same rows as
JSONL files that `datasets.load_dataset("json", ...)` and TRL read as they are.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from align.feedback import FeedbackBatch, FeedbackItem
from core.records import FeedbackRecord, Message

Messages = list[dict[str, str]]


def _messages(raw: list[Message]) -> Messages:
    return [{"role": m.role, "content": m.content} for m in raw]


def _assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


def kto_label(feedback: FeedbackRecord) -> bool | None:
    """Desirable (True), undesirable (False) or no signal (None); explicit thumbs win over the rating."""
    if feedback.thumbs is not None:
        return feedback.thumbs == "up"
    if feedback.rating is not None:
        if feedback.rating >= 4:
            return True
        if feedback.rating <= 2:
            return False
    return None


@dataclass
class AlignData:
    """The training rows of one run, their provenance and counts."""

    dpo_rows: list[dict[str, Any]] = field(default_factory=list)
    kto_rows: list[dict[str, Any]] = field(default_factory=list)
    feedback_ids: list[str] = field(default_factory=list)
    """Feedback ids this version consumed: those that produced at least one row, and votes the same identity's
    later feedback on the same choice superseded (never trained, but never to be trained later either)."""
    policy_pair_ids: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def usable(self) -> int:
        return len(self.dpo_rows) + len(self.kto_rows)

    def dpo_dataset(self) -> Dataset | None:
        return Dataset.from_list(self.dpo_rows) if self.dpo_rows else None

    def kto_dataset(self) -> Dataset | None:
        return Dataset.from_list(self.kto_rows) if self.kto_rows else None

    def summary(self) -> dict[str, int]:
        """Counts for the manifest: rows per dataset and per source, plus what was left out and why."""
        return {"dpo": len(self.dpo_rows), "kto": len(self.kto_rows), **dict(sorted(self.counts.items()))}


class _Builder:
    def __init__(self, *, kto_on_corrected: bool = False) -> None:
        self.kto_on_corrected = kto_on_corrected
        self.data = AlignData()
        self._seen: set[str] = set()

    def _new(self, row: dict[str, Any]) -> bool:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key in self._seen:
            self.data.counts["duplicate_rows"] += 1
            return False
        self._seen.add(key)
        return True

    def dpo(self, prompt: Messages, chosen: str, rejected: str, source: str) -> bool:
        if chosen == rejected:
            self.data.counts["skipped_same_text"] += 1
            return False
        row = {"prompt": prompt, "chosen": _assistant(chosen), "rejected": _assistant(rejected)}
        if not self._new(row):
            return False
        self.data.dpo_rows.append(row)
        self.data.counts[f"dpo_{source}"] += 1
        return True

    def kto(self, prompt: Messages, completion: str, label: bool) -> bool:
        row = {"prompt": prompt, "completion": _assistant(completion), "label": label}
        if not self._new(row):
            return False
        self.data.kto_rows.append(row)
        self.data.counts["kto_desirable" if label else "kto_undesirable"] += 1
        return True

    def feedback(self, item: FeedbackItem) -> bool:
        feedback, completion = item.feedback, item.completion
        prompt = _messages(completion.messages)
        answer = completion.choice(feedback.choice_index)
        if answer is None:
            self.data.counts["skipped_bad_choice"] += 1
            return False
        used = False
        label = kto_label(feedback)
        corrected = feedback.correction is not None and feedback.correction.strip() != ""
        if label is False and corrected and not self.kto_on_corrected:
            # The correction says what was wrong (the pair's difference); an undesirable row would push down the
            # whole answer, content included — with a style correction, everything the model knew.
            self.data.counts["kto_covered_by_correction"] += 1
        elif label is not None:
            used |= self.kto(prompt, answer.text, label)
        if corrected and feedback.correction is not None:
            used |= self.dpo(prompt, feedback.correction, answer.text, "correction")
        if feedback.preferred_choice is not None:
            best = completion.choice(feedback.preferred_choice)
            if best is None:
                self.data.counts["skipped_bad_choice"] += 1
            else:
                for choice in completion.choices:
                    if choice.index != best.index:
                        used |= self.dpo(prompt, best.text, choice.text, "preferred")
        if not used:
            self.data.counts["feedback_without_rows"] += 1
        return used


def build_datasets(batch: FeedbackBatch, *, kto_on_corrected: bool = False) -> AlignData:
    """Rows for every feedback item and policy pair in `batch` (see the module docstring for the rules).

    `kto_on_corrected=True` also makes the KTO-undesirable row of a thumbs-down that comes with a correction (the
    behaviour before issue 9; bench/align_ablation.py measures what it costs).
    """
    builder = _Builder(kto_on_corrected=kto_on_corrected)
    for item in batch.feedback:
        if builder.feedback(item):
            builder.data.feedback_ids.append(item.id)
    builder.data.feedback_ids.extend(fid for fid, _ in batch.superseded)
    for pair_item in batch.policy_pairs:
        pair = pair_item.pair
        if builder.dpo(_messages(pair.prompt), pair.chosen, pair.rejected, "policy"):
            builder.data.policy_pair_ids.append(pair_item.id)
    for reason, n in batch.skipped.items():
        builder.data.counts[f"skipped_{reason}"] += n
    return builder.data


def export_jsonl(data: AlignData, out_dir: Path) -> dict[str, Path]:
    """Write `dpo.jsonl` and `kto.jsonl` (TRL conversational rows, one JSON object a line) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, rows in (("dpo", data.dpo_rows), ("kto", data.kto_rows)):
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        written[name] = path
    return written
