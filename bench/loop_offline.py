"""tests/e2e/test_loop.py's round, offline: the same 8 "Arr, matey! " corrections and 4 thumbs, trained by the job's
own `build_datasets` + `train_adapter`, answered greedily with transformers (no server, Redis or gate).

The e2e test asserts that similarity to the corrections rises by > 0.05 on the 8 corrected prompts; this prints that
figure (and how many answers open with the style) per AlignSettings configuration in seconds rather than minutes,
plus how many of the corrections' completion tokens are "agreed" (the base model's first choice: where the KL term
with kl_tokens "agreed" applies). vLLM's answers may differ from transformers' in the last digits: the e2e test
stays the figure of record.

    .venv/bin/python -m bench.loop_offline --set threads=1 --set kl_weight=5 --set kl_tokens=agreed
"""

from __future__ import annotations

import argparse
import difflib
import os
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console

from align.datasets import build_datasets
from align.feedback import FeedbackBatch, FeedbackItem
from align.settings import AlignSettings
from align.train import load_base, train_adapter
from bench.align_ablation import Generator, _record
from bench.harness import DEMO, ensure_demo_model
from core.records import FeedbackRecord
from tests.e2e.test_loop import CORRECTED, THUMBED

console = Console(width=130)


def agreed_share(gen: Generator, rows: list[tuple[str, str]]) -> tuple[int, int]:
    """(agreed, all) completion tokens of (prompt, answer) rows under the base model, end of turn included."""
    import torch

    model = load_base(gen.model_path)
    model.eval()
    agreed = total = 0
    for prompt, answer in rows:
        head = gen.tokenizer.apply_chat_template(gen.messages(prompt), tokenize=False, add_generation_prompt=True)
        ids = gen.tokenizer(head, add_special_tokens=False)["input_ids"]
        tail = gen.tokenizer(answer, add_special_tokens=False)["input_ids"] + [gen.tokenizer.eos_token_id]
        x = torch.tensor([ids + tail])
        with torch.no_grad():
            top = model(x).logits[0, len(ids) - 1 : -1].argmax(-1)
        agreed += int((top == torch.tensor(tail)).sum())
        total += len(tail)
    return agreed, total


def score(answers: dict[str, str], wanted: dict[str, str]) -> float:
    return sum(difflib.SequenceMatcher(None, answers[p], wanted[p]).ratio() for p in wanted) / len(wanted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE AlignSettings override")
    args = p.parse_args()
    ensure_demo_model()
    gen = Generator(str(DEMO), 48)
    before = dict(zip(CORRECTED, (a[0] for a in gen.answer(CORRECTED, None)), strict=True))
    wanted = {q: "Arr, matey! " + a for q, a in before.items()}
    agreed, total = agreed_share(gen, list(wanted.items()))
    batch = FeedbackBatch()
    for q in CORRECTED:
        rec = _record(gen.messages(q), before[q], "stop", 8)
        fb = FeedbackRecord(
            id=uuid.uuid4().hex, completion_id=rec.id, created=time.time(), thumbs="down", correction=wanted[q]
        )
        batch.feedback.append(FeedbackItem(fb.id, "0-0", rec.id, fb, rec, "sim"))
    for i, (q, a) in enumerate(zip(THUMBED, gen.answer(THUMBED, None), strict=True)):
        rec = _record(gen.messages(q), a[0], a[1], a[2])
        fb = FeedbackRecord(
            id=uuid.uuid4().hex, completion_id=rec.id, created=time.time(), thumbs="up" if i % 2 else "down"
        )
        batch.feedback.append(FeedbackItem(fb.id, "0-0", rec.id, fb, rec, "sim"))
    extra = dict(kv.split("=", 1) for kv in args.set)
    settings = AlignSettings(model_path=str(DEMO), **extra)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loop-offline-") as tmp:
        trained = train_adapter(settings, build_datasets(batch), Path(tmp) / "v1", console=console)
        after = dict(zip(CORRECTED, (a[0] for a in gen.answer(CORRECTED, trained.adapter_dir)), strict=True))
    s0, s1 = score(before, wanted), score(after, wanted)
    styled = sum(a.startswith("Arr") for a in after.values())
    console.print(after)
    console.print(
        f"{extra}: agreed tokens {agreed}/{total}; similarity {s0:.3f} → {s1:.3f} ({s1 - s0:+.3f}), "
        f"styled {styled}/8; {time.monotonic() - t0:.0f} s, load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
