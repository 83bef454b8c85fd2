"""The gate a trained adapter must pass before it is published.

Checks, each recorded in the manifest with its value and threshold:

- `metrics_finite`: every training metric is a finite number;
- `weights_finite`: every tensor of the saved adapter is finite;
- `weights_changed`: the adapter moved — its tensors differ from the parent's (or, for a fresh adapter, its
  LoRA B matrices, which start at zero, are non-zero; otherwise the update B·A would be zero);
- `margin_gain` / `improved_fraction`: on the run's DPO pairs the new policy prefers chosen over rejected more
  than the parent did: mean of log p(chosen) − log p(rejected) rises by more than `gate_min_margin_gain`, and
  at least `gate_min_improved_fraction` of the pairs improve. With no DPO pairs the KTO rows stand in:
  the signed log-probability (+ for desirable, − for undesirable) must rise the same way.

The margin checks run on the training rows: the gate asks "did training move the model toward this feedback,
without breaking it", not "does it generalise"; a held-out evaluation belongs to a later gate.
Log-probabilities are computed with transformers + peft directly, not with the trainer, so a bug in how
training used the data cannot hide itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from align.datasets import AlignData
from align.settings import AlignSettings


def _check(passed: bool, value: Any, threshold: Any = None, note: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"passed": bool(passed), "value": value}
    if threshold is not None:
        out["threshold"] = threshold
    if note:
        out["note"] = note
    return out


def _load_tensors(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no adapter weights at {path}")
    return load_file(str(path))


def weight_checks(adapter_dir: Path, parent_adapter: Path | None) -> dict[str, dict[str, Any]]:
    import torch

    tensors = _load_tensors(adapter_dir)
    finite = all(bool(torch.isfinite(t).all()) for t in tensors.values())
    if parent_adapter is not None:
        parent = _load_tensors(parent_adapter)
        if set(parent) == set(tensors) and all(parent[k].shape == t.shape for k, t in tensors.items()):
            sq = sum(float((t.float() - parent[k].float()).pow(2).sum()) for k, t in tensors.items())
            note = "L2 distance to the parent adapter"
        else:
            sq, note = math.inf, "layout differs from the parent adapter"
    else:
        sq = sum(float(t.float().pow(2).sum()) for k, t in tensors.items() if "lora_B" in k)
        note = "L2 norm of the LoRA B matrices (zero at init)"
    delta = math.sqrt(sq) if math.isfinite(sq) else sq
    return {
        "weights_finite": _check(finite, finite),
        "weights_changed": _check(delta > 0 and finite, delta if math.isfinite(delta) else "inf", 0.0, note),
    }


class _Scorer:
    """Sums log p(completion | prompt) under the model, with the prompt rendered by the chat template."""

    def __init__(self, tokenizer: Any, model: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = max_length

    def _ids(self, messages: list[dict[str, str]], **kw: Any) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    def logp(self, prompt: list[dict[str, str]], completion: list[dict[str, str]]) -> float:
        import torch
        from trl.data_utils import common_prefix_length

        prompt_ids = self._ids(prompt, add_generation_prompt=True)
        full = self._ids(prompt + completion)
        # Same split as TRL: the completion starts where prompt and prompt+completion diverge.
        start = common_prefix_length(prompt_ids, full)
        full = full[: self.max_length]
        if start >= len(full):
            return 0.0
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
        return float(logps[start - 1 :].sum())


def _scores(
    scorer: _Scorer, data: AlignData, max_rows: int, use: Callable[[], AbstractContextManager[Any]]
) -> tuple[list[float], list[float]]:
    """(DPO margins, signed KTO log-probs) under the adapter selected by `use`."""
    with use():
        margins = [
            scorer.logp(r["prompt"], r["chosen"]) - scorer.logp(r["prompt"], r["rejected"])
            for r in data.dpo_rows[:max_rows]
        ]
        signed = [
            (1.0 if r["label"] else -1.0) * scorer.logp(r["prompt"], r["completion"]) for r in data.kto_rows[:max_rows]
        ]
    return margins, signed


def preference_checks(
    settings: AlignSettings, data: AlignData, adapter_dir: Path, parent_adapter: Path | None
) -> dict[str, dict[str, Any]]:
    import torch
    from peft import PeftModel

    from align.train import load_base, load_tokenizer

    torch.set_num_threads(settings.threads)
    tokenizer = load_tokenizer(settings.model_path)
    base = load_base(settings.model_path)
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="new")
    if parent_adapter is not None:
        model.load_adapter(str(parent_adapter), adapter_name="parent")
    model.eval()
    scorer = _Scorer(tokenizer, model, settings.max_length)

    def use(name: str | None) -> Callable[[], AbstractContextManager[Any]]:
        def ctx() -> AbstractContextManager[Any]:
            if name is None:
                return model.disable_adapter()
            model.set_adapter(name)
            return nullcontext()

        return ctx

    before_m, before_k = _scores(scorer, data, settings.gate_max_rows, use("parent" if parent_adapter else None))
    after_m, after_k = _scores(scorer, data, settings.gate_max_rows, use("new"))
    if before_m:
        basis, before, after = "dpo_margin", before_m, after_m
    else:
        basis, before, after = "kto_signed_logp", before_k, after_k
    n = len(before)
    gain = (sum(after) - sum(before)) / n if n else 0.0
    improved = sum(a > b for a, b in zip(after, before, strict=True)) / n if n else 0.0
    checks = {
        "margin_gain": _check(
            n > 0 and math.isfinite(gain) and gain > settings.gate_min_margin_gain,
            round(gain, 6),
            settings.gate_min_margin_gain,
            f"mean {basis} after − before, over {n} rows (nats)",
        ),
        "improved_fraction": _check(
            n > 0 and improved >= settings.gate_min_improved_fraction,
            round(improved, 4),
            settings.gate_min_improved_fraction,
            f"share of rows whose {basis} rose",
        ),
    }
    checks["margin_gain"]["before"] = round(sum(before) / n, 6) if n else None
    checks["margin_gain"]["after"] = round(sum(after) / n, 6) if n else None
    return checks


def evaluate_gate(
    settings: AlignSettings,
    data: AlignData,
    adapter_dir: Path,
    metrics: dict[str, float],
    *,
    parent_adapter: Path | None = None,
) -> dict[str, Any]:
    """Run every check; the result (`passed`, `checks`, `failed`) goes into the manifest."""
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    checks: dict[str, dict[str, Any]] = {"metrics_finite": _check(not bad, bad or "all finite")}
    checks.update(weight_checks(adapter_dir, parent_adapter))
    if checks["weights_finite"]["passed"]:
        checks.update(preference_checks(settings, data, adapter_dir, parent_adapter))
    failed = [name for name, c in checks.items() if not c["passed"]]
    return {"passed": not failed, "failed": failed, "checks": checks}


def describe_failure(gate: dict[str, Any]) -> str:
    """One line per failed check, for the operator."""
    lines = []
    for name in gate.get("failed", []):
        c = gate["checks"][name]
        bound = f" (threshold {c['threshold']})" if "threshold" in c else ""
        note = f" — {c['note']}" if c.get("note") else ""
        lines.append(f"{name}: {c['value']}{bound}{note}")
    return "; ".join(lines)
