"""Which align setting does what: the closed loop's simulated user, replayed offline under several align configurations.

    .venv/bin/python -m bench.align_ablation [--rounds 1] [--preference house-style] [--config NAME ...]

No server: answers come from transformers' greedy decoding of the demo model (plus the adapter being trained),
so one configuration's round costs one training run and two generation passes (~1-2 min here), where a
closed-loop round also starts and swaps a vLLM engine. Each round: generate answers to the training prompts →
the simulated user's feedback (thumbs up when it likes the answer, else thumbs down with a correction), made into
typed feedback/completion records → `align.datasets.build_datasets` → `align.train.train_adapter` (the same code
`secondstage align run` runs; the next round continues from this adapter, as the job continues from the parent) →
answer the held-out prompts. Per round: preferred rate, base content kept (the held-out answer equals the base
model's answer in the preferred form), degeneration (no end of turn within max_tokens, or a repeated word
loop). Configurations are AlignSettings overrides (CONFIGS below); the prompts, preferences and figures are the
closed loop's (bench/closed_loop.py), so the two benches measure the same thing. Writes
bench/results/align_ablation.json.

What it does not show: vLLM's answers can differ from transformers' in the last digits (the closed loop is the
figure of record), and nothing here goes through Redis, policies or the gate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from align.datasets import build_datasets
from align.feedback import FeedbackBatch, FeedbackItem
from align.settings import AlignSettings
from align.train import load_base, load_tokenizer, train_adapter
from bench.closed_loop import (
    CLOSE_CALL,
    PREFERENCES,
    Preference,
    all_prompts,
    correction,
    degenerate,
    instructions_message,
    likes,
    load_preference,
    split_prompts,
)
from bench.harness import DEMO, ensure_demo_model
from bench.results import write_result
from core.records import ChoiceRecord, CompletionRecord, FeedbackRecord, Message, Usage

console = Console(width=130)

CONFIGS: dict[str, dict[str, Any]] = {
    # The defaults before issue 9: lr 2e-3, 6 DPO epochs, a KTO row from every thumbs-down, no replay.
    "old-defaults": {"learning_rate": 2e-3, "epochs": 6.0, "kto_epochs": 2.0, "kto_on_corrected": True},
    # Only the dataset change: a thumbs-down that comes with a correction trains only as the DPO pair.
    "no-kto-dup": {"learning_rate": 2e-3, "epochs": 6.0, "kto_epochs": 2.0},
    # Only the step size: lower learning rate, fewer passes.
    "low-lr": {"learning_rate": 5e-4, "epochs": 3.0, "kto_on_corrected": True},
    # Both: no KTO row beside a correction, and the lower step size.
    "no-kto-dup+low-lr": {"learning_rate": 5e-4, "epochs": 3.0},
    # …and a larger β: DPO's sigmoid saturates after a margin of ~3/β nats, so it stops pushing the rejected answer
    # (the model's own content) down much sooner; the SFT term does the teaching.
    "no-kto-dup+low-lr+beta": {"learning_rate": 5e-4, "epochs": 3.0, "beta": 0.5},
    # The preference term at a tenth: the SFT term (on the corrections) does most of the teaching.
    "no-kto-dup+low-lr+dpo0.1": {"learning_rate": 5e-4, "epochs": 3.0, "dpo_weight": 0.1},
    # Length-normalised preference term (per-token margin, like the SFT term's per-token mean).
    "no-kto-dup+low-lr+norm": {"learning_rate": 5e-4, "epochs": 3.0, "dpo_loss": "sigmoid_norm", "beta": 2.0},
    # Rehearsal: 24 of the current model's own answers to other prompts as KTO-desirable rows, UNRATED (for a global
    # style these argue against the style: the parent does not have it yet).
    "defaults+replay24": {"replay": 24},
    # Issue 9 §1 levers on top of the defaults, one at a time (docs/performance.md, "Closed loop"):
    # only the corrections (SFT on the chosen answer): no preference term pushing the model's own answer down.
    "sft-only": {"dpo_weight": 0.0},
    # a larger β: the sigmoid saturates after a margin of ~3/β nats (30 at 0.1, 6 at 0.5).
    "beta0.5": {"beta": 0.5},
    # IPO (TRL's per-token form): a bounded target margin of 1/(2β) instead of an unbounded push.
    "ipo": {"dpo_loss": "ipo", "beta": 0.5},
    # a smaller step, and fewer passes.
    "lr2.5e-4": {"learning_rate": 2.5e-4},
    "epochs1": {"epochs": 1.0},
    "epochs6": {"epochs": 6.0},
    # fewer LoRA targets: the attention projections only, or the MLP only; a smaller rank.
    "attn-only": {"lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "mlp-only": {"lora_targets": ["gate_proj", "up_proj", "down_proj"]},
    "rank2": {"lora_rank": 2, "lora_alpha": 4},
    # only the demo model's last block (peft matches target names by suffix), or only its MLP.
    "last-layer": {
        "lora_targets": [
            f"layers.1.{m}"
            for m in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            )
        ]
    },
    "last-mlp": {"lora_targets": ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]},
    # twice the weight on the corrections' NLL.
    "sft2": {"sft_weight": 2.0},
    # liked answers (round 2 on) as SFT rows inside the DPO phase, rehearsed while the corrections train.
    "liked-sft": {"liked_as_sft": True},
    # both: corrections and liked answers through the SFT term only, in one phase.
    "sft-only+liked-sft": {"dpo_weight": 0.0, "liked_as_sft": True},
    # Regularising toward the parent (issue 9 §1): KL(parent ‖ new) per completion token in the SFT phase, on the
    # liked answers it rehearses (round 2 on: round 1 has no liked answers), or on every row, corrections included,
    "kl1-rehearsal": {"kl_weight": 1.0},
    "kl1-all": {"kl_weight": 1.0, "kl_tokens": "all"},
    "kl0.3-all": {"kl_weight": 0.3, "kl_tokens": "all"},
    # or only where the answer's token is the parent's first choice (the content a correction keeps).
    "kl1-agreed": {"kl_weight": 1.0, "kl_tokens": "agreed"},
    "kl0": {"kl_weight": 0.0},  # the SFT phase without the KL term (the defaults before kl_weight 5)
    "kl5-agreed": {"kl_weight": 5.0, "kl_tokens": "agreed"},
    "kl10-agreed": {"kl_weight": 10.0, "kl_tokens": "agreed"},
    "kl20-agreed": {"kl_weight": 20.0, "kl_tokens": "agreed"},
    # only the agreed tokens before the row's first departure from the parent's first choice.
    "kl5-leading": {"kl_weight": 5.0, "kl_tokens": "leading"},
    "kl10-leading": {"kl_weight": 10.0, "kl_tokens": "leading"},
    # `leading` on the corrections, every token of the liked answers (round 2 on).
    "kl5-leading-rehearsal": {"kl_weight": 5.0, "kl_tokens": "leading+rehearsal"},
    # The current defaults (align/settings.py), whatever they are.
    "defaults": {},
}
"""Per configuration: AlignSettings overrides, plus `kto_on_corrected` (build_datasets' switch) and `replay` (that
many KTO-desirable rows from the current model's own answers to other prompts, as unrated traffic in the log)."""
HARNESS_KEYS = ("kto_on_corrected", "replay")


def _record(prompt: list[dict[str, str]], text: str, finish: str, tokens: int) -> CompletionRecord:
    return CompletionRecord(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=time.time(),
        model="demo",
        version="bench",
        status="ok",
        messages=[Message(role=m["role"], content=m["content"]) for m in prompt],  # type: ignore[arg-type]
        choices=[ChoiceRecord(index=0, text=text, finish_reason=finish, completion_tokens=tokens)],  # type: ignore[arg-type]
        usage=Usage(completion_tokens=tokens),
        latency_s=0.0,
    )


class Generator:
    """Greedy answers from the demo model, with an adapter or without (transformers; batched, left-padded)."""

    def __init__(self, model_path: str, max_tokens: int) -> None:
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"
        self.model_path = model_path
        self.max_tokens = max_tokens
        self.system = instructions_message()

    def messages(self, prompt: str) -> list[dict[str, str]]:
        return [*self.system, {"role": "user", "content": prompt}]

    def answer(self, prompts: list[str], adapter: Path | None) -> list[tuple[str, str, int]]:
        import torch
        from peft import PeftModel

        model = load_base(self.model_path)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        texts = [
            self.tokenizer.apply_chat_template(self.messages(p), tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        out: list[tuple[str, str, int]] = []
        eos = self.tokenizer.eos_token_id
        for i in range(0, len(texts), 16):
            enc = self.tokenizer(texts[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(
                    **enc, max_new_tokens=self.max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
                )
            for row in gen[:, enc["input_ids"].shape[1] :].tolist():
                stopped = eos in row
                row = row[: row.index(eos)] if stopped else row
                text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
                out.append((text, "stop" if stopped else "length", len(row)))
        return out

    def min_gaps(self, prompts: list[str]) -> list[float]:
        """Per prompt: the smallest lead of the base model's greedy token over the runner-up (logits) along its
        answer, end of turn included. Below `CLOSE_CALL` the base answer is a near coin flip that any weight
        change may turn (bench.closed_loop.CLOSE_CALL)."""
        import torch

        model = load_base(self.model_path)
        model.eval()
        texts = [
            self.tokenizer.apply_chat_template(self.messages(p), tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        eos = self.tokenizer.eos_token_id
        out: list[float] = []
        for i in range(0, len(texts), 16):
            enc = self.tokenizer(texts[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=self.max_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            top2 = torch.stack([torch.topk(step, 2, dim=-1).values for step in gen.scores], dim=1)  # (b, steps, 2)
            gaps = (top2[..., 0] - top2[..., 1]).tolist()
            for row, row_gaps in zip(gen.sequences[:, enc["input_ids"].shape[1] :].tolist(), gaps, strict=True):
                n = row.index(eos) + 1 if eos in row else len(row)
                out.append(min(row_gaps[:n]))
        return out


def feedback_batch(
    gen: Generator,
    prompts: list[str],
    answers: list[tuple[str, str, int]],
    pref: Preference,
    reference: dict[str, str],
) -> tuple[FeedbackBatch, int]:
    """The (content-aware) simulated user's feedback on `answers`, as the typed items align's reader would return."""
    batch = FeedbackBatch()
    liked = 0
    for prompt, (text, finish, tokens) in zip(prompts, answers, strict=True):
        completion = _record(gen.messages(prompt), text, finish, tokens)
        if likes(pref, prompt, text, reference):
            liked += 1
            fb = FeedbackRecord(id=uuid.uuid4().hex, completion_id=completion.id, created=time.time(), thumbs="up")
        else:
            fb = FeedbackRecord(
                id=uuid.uuid4().hex,
                completion_id=completion.id,
                created=time.time(),
                thumbs="down",
                correction=correction(pref, prompt, text, reference),
            )
        batch.feedback.append(FeedbackItem(fb.id, "0-0", completion.id, fb, completion, "sim"))
    return batch, liked


def score(
    prompts: list[str],
    answers: list[tuple[str, str, int]],
    wanted: dict[str, str],
    pref: Preference,
    stable: set[str] | None = None,
) -> dict[str, float]:
    n = len(answers)
    kept = [p for p, a in zip(prompts, answers, strict=True) if a[0] == wanted[p]]
    out = {
        "preferred": sum(pref.prefers(p, a[0]) for p, a in zip(prompts, answers, strict=True)) / n,
        "content_kept": len(kept) / n,
        "degenerate": sum(degenerate(a[0], a[1]) for a in answers) / n,
    }
    if stable:
        # Content kept where the base answer is no close call (see Generator.min_gaps).
        out["content_kept_stable"] = sum(p in stable for p in kept) / len(stable)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--train", type=int, default=48)
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--preference", default="house-style", help=f"one of {', '.join(PREFERENCES)} or module:Class")
    p.add_argument("--config", action="append", help=f"configurations to run (default all: {', '.join(CONFIGS)})")
    p.add_argument("--set", action="append", default=[], help="extra KEY=VALUE AlignSettings override for all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at", type=float, default=0.9, help="stop a configuration once preferred reaches this…")
    p.add_argument("--keep-at", type=float, default=0.8, help="…and content kept reaches this")
    p.add_argument("--label", default=None, help="results file suffix (default: the preference)")
    args = p.parse_args()
    pref = load_preference(args.preference)
    train, heldout = split_prompts(args.train, args.heldout, args.seed)
    ensure_demo_model()
    gen = Generator(str(DEMO), args.max_tokens)
    background = [q for q in all_prompts() if q not in set(train) | set(heldout)]
    base_heldout = gen.answer(heldout, None)
    base_train = gen.answer(train, None)
    wanted = {q: pref.improve(q, a[0]) for q, a in zip(heldout, base_heldout, strict=True)}
    reference = {q: a[0] for q, a in zip(train, base_train, strict=True)}
    stable = {q for q, gap in zip(heldout, gen.min_gaps(heldout), strict=True) if gap >= CLOSE_CALL}
    console.print(f"{len(stable)} of {len(heldout)} held-out base answers win every token by ≥ {CLOSE_CALL} logits")
    extra = dict(kv.split("=", 1) for kv in args.set)
    results: dict[str, Any] = {}
    for name in args.config or list(CONFIGS):
        overrides = {**CONFIGS[name], **extra}
        kto_on_corrected = bool(overrides.get("kto_on_corrected", False))
        replay = int(overrides.get("replay", 0))
        settings = AlignSettings(model_path=str(DEMO), **{k: v for k, v in overrides.items() if k not in HARNESS_KEYS})
        rounds: list[dict[str, Any]] = [
            {"round": 0, **score(heldout, base_heldout, wanted, pref, stable), "events": 0, "seconds": 0.0}
        ]
        parent: Path | None = None
        answers = base_train
        with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
            for r in range(1, args.rounds + 1):
                t0 = time.monotonic()
                batch, _ = feedback_batch(gen, train, answers, pref, reference)
                data = build_datasets(batch, kto_on_corrected=kto_on_corrected)
                if replay:
                    others = background[(r - 1) * replay : r * replay]
                    for q, (text, _, _) in zip(others, gen.answer(others, parent), strict=True):
                        data.kto_rows.append(
                            {
                                "prompt": gen.messages(q),
                                "completion": [{"role": "assistant", "content": text}],
                                "label": True,
                            }
                        )
                        data.counts["kto_replay"] += 1
                trained = train_adapter(settings, data, Path(tmp) / f"r{r}", parent_adapter=parent, console=console)
                parent = trained.adapter_dir
                held = gen.answer(heldout, parent)
                rounds.append(
                    {
                        "round": r,
                        **score(heldout, held, wanted, pref, stable),
                        "events": len(batch.feedback),
                        "rows": data.summary(),
                        "seconds": round(time.monotonic() - t0, 1),
                        "loadavg_1m": round(os.getloadavg()[0], 1),
                        "train_metrics": {
                            k: v
                            for k, v in trained.metrics.items()
                            if k.endswith(("_steps", "_seconds", "_loss", "_kl", "_nll", "_liked_leading"))
                        },
                        "samples": [a[0] for a in held[:4]],
                        # Every held-out answer whose content broke: what the user wanted, what came out.
                        "misses": [[wanted[q], a[0]] for q, a in zip(heldout, held, strict=True) if a[0] != wanted[q]],
                    }
                )
                console.print(f"[bold]{name}[/] round {r}: {rounds[-1]}")
                if rounds[-1]["preferred"] >= args.stop_at and rounds[-1]["content_kept"] >= args.keep_at:
                    break
                answers = gen.answer(train, parent) if r < args.rounds else answers
        results[name] = {"overrides": overrides, "rounds": rounds}

    t = Table(title=f"Align ablation: {args.preference!r}, {len(train)} train / {len(heldout)} held-out prompts")
    cols = ("config", "round", "preferred", "content kept", "kept (stable)", "degenerate", "events", "s", "load")
    for col in cols:
        t.add_column(col, justify="left" if col == "config" else "right")
    for name, res in results.items():
        for x in res["rounds"]:
            t.add_row(
                name,
                str(x["round"]),
                f"{x['preferred']:.0%}",
                f"{x['content_kept']:.0%}",
                f"{x['content_kept_stable']:.0%}" if "content_kept_stable" in x else "-",
                f"{x['degenerate']:.0%}",
                str(x["events"]),
                f"{x['seconds']:.0f}",
                f"{x.get('loadavg_1m', '-')}",
            )
    console.print(t)
    label = args.label or args.preference.replace(":", "_")
    path = write_result(f"align_ablation_{label}", {"params": vars(args), "configs": results})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
