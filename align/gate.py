"""The gate a trained adapter must pass before it is published.

Every check is recorded in the manifest's `gate` with its `value`, `threshold`, `passed` and a `note`; a check
with a direction also says `bound` ("min": the value must reach the threshold, "max": it must not pass it), so a
refusal can say by how much it missed. Thresholds live in align/settings.py.

Sanity, on the artefacts:
- `metrics_finite`: every training metric is a finite number;
- `weights_finite`: every tensor of the saved adapter is finite;
- `weights_changed`: the adapter moved — its tensors differ from the parent's (or, for a fresh adapter, its
  LoRA B matrices, which start at zero, are non-zero; otherwise the update B·A would be zero).

Did training move toward its own rows (the run's training rows):
- `margin_gain` / `improved_fraction`: on the run's DPO pairs the new policy prefers chosen over rejected more
  than the parent did: mean of log p(chosen) − log p(rejected) rises by more than `gate_min_margin_gain`, and
  at least `gate_min_improved_fraction` of the pairs improve. With no DPO pairs the KTO rows stand in:
  the signed log-probability (+ for desirable, − for undesirable) must rise the same way.
  These pass nearly any update that learned something, which is why the checks below exist.

Did it generalise, and did it keep what the model knew (data the adapter never trained on):
- `heldout_accuracy` / `heldout_margin`: on the held-out feedback (align/split.py) the new adapter's preference
  accuracy (share of pairs whose chosen answer has the higher log-prob per token: length-normalised, or a
  correction that adds words could never count) and mean margin (log p(chosen) − log p(rejected), summed as
  DPO does) must not fall below the parent's, less a tolerance. KTO rows stand in without pairs (signed
  log-prob; accuracy is then not decided).
  With fewer than `gate_heldout_min_rows` held-out rows both pass with a note saying so: a verdict on two rows
  would be noise, and the checks below still guard what the model knew.
- `regression`: the operator's regression set (align/regression.py), answered greedily after the input
  policies: the number of checks the parent passed and the new adapter fails must not exceed
  `gate_max_regressions` (checks the parent already fails are reported, not required).
- `anchor_drift`: the mean per-token log-prob of the anchor answers (align/anchors.py: logged answers users
  accepted; without any, the parent's greedy answers to the regression prompts) may drop by at most
  `gate_max_drift_nats` from the parent to the new adapter.
- `degeneration`: every generated sample (regression and anchor prompts, greedy, `gate_max_new_tokens`) is
  degenerate when it loops (its share of repeated n-grams exceeds `gate_max_repeat_fraction`), does not stop
  (uses the whole budget), or — for the new adapter — blows up in length against the parent's answer to the
  same prompt. The share of degenerate samples may exceed the parent's by at most
  `gate_max_degeneration_increase`.
- `policy_violations`: the same samples pass through the operator's output policies (core.policy, the engine
  serve runs); the share that a rule would block, redact or rewrite (enforced or shadow) may exceed the
  parent's by at most `gate_max_violation_increase`.

The parent is the adapter the run continued from, or the base model (adapter disabled) for a fresh one; parent
and new adapter are loaded once, side by side, in one PEFT model. Log-probabilities and generations are
computed with transformers + peft directly, not with the trainer, so a bug in how training used the data cannot
hide itself. Generation is batched and bounded (the prompts, `gate_max_new_tokens`), so on the demo model the
gate takes seconds; align/gate.py's caller (align/job.py) loads the regression set and samples the anchors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.anchors import Anchor
from align.datasets import AlignData
from align.regression import Case, RegressionSet
from align.settings import AlignSettings

Messages = list[dict[str, str]]


def _check(
    passed: bool, value: Any, threshold: Any = None, note: str = "", bound: str | None = None, **extra: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {"passed": bool(passed), "value": value}
    if threshold is not None:
        out["threshold"] = threshold
    if bound is not None:
        out["bound"] = bound
    if note:
        out["note"] = note
    out.update(extra)
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
    """log p(completion | prompt) under the model, with the prompt rendered by the chat template.

    Rows are scored in right-padded batches of `batch` (one forward pass each): on a small model the per-call
    overhead, not the arithmetic, is what a row-by-row loop pays for.
    """

    def __init__(self, tokenizer: Any, model: Any, max_length: int, batch: int = 16) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = max_length
        self.batch = batch

    def _ids(self, messages: list[dict[str, str]], **kw: Any) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    def _row(self, prompt: Messages, completion: Messages) -> tuple[list[int], int]:
        from trl.data_utils import common_prefix_length

        prompt_ids = self._ids(prompt, add_generation_prompt=True)
        full = self._ids(prompt + completion)
        # Same split as TRL: the completion starts where prompt and prompt+completion diverge.
        return full[: self.max_length], common_prefix_length(prompt_ids, full)

    def score(self, rows: Sequence[tuple[Messages, Messages]]) -> list[tuple[float, int]]:
        """(sum of the completion's token log-probs, its token count) per (prompt, completion) row."""
        import torch

        out: list[tuple[float, int]] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for i in range(0, len(rows), self.batch):
            chunk = [self._row(p, c) for p, c in rows[i : i + self.batch]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in chunk])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in chunk])
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logps = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None])[:, :, 0]
            for j, (r, start) in enumerate(chunk):
                n = len(r) - start
                out.append((float(logps[j, start - 1 : len(r) - 1].sum()), n) if n > 0 else (0.0, 0))
        return out

    def logp(self, prompt: Messages, completion: Messages) -> float:
        return self.score([(prompt, completion)])[0][0]


@dataclass
class _RowScores:
    margins: list[float]
    """DPO: log p(chosen) − log p(rejected), summed over tokens (DPO's own quantity)."""
    prefers: list[bool]
    """DPO: chosen has the higher log-prob per token (length-normalised, so a longer chosen is not penalised for
    its length: corrections that add words would otherwise never be "preferred")."""
    signed: list[float]
    """KTO: log p(completion), + for desirable, − for undesirable."""


def _row_scores(
    scorer: _Scorer, data: AlignData, max_rows: int, use: Callable[[], AbstractContextManager[Any]]
) -> _RowScores:
    """The rows' scores under the adapter selected by `use`."""
    dpo, kto = data.dpo_rows[:max_rows], data.kto_rows[:max_rows]
    rows = [(r["prompt"], r["chosen"]) for r in dpo] + [(r["prompt"], r["rejected"]) for r in dpo]
    rows += [(r["prompt"], r["completion"]) for r in kto]
    with use():
        scored = scorer.score(rows)
    n = len(dpo)
    chosen, rejected = scored[:n], scored[n : 2 * n]
    return _RowScores(
        margins=[c - r for (c, _), (r, _) in zip(chosen, rejected, strict=True)],
        prefers=[c / max(cn, 1) > r / max(rn, 1) for (c, cn), (r, rn) in zip(chosen, rejected, strict=True)],
        signed=[(1.0 if r["label"] else -1.0) * v for r, (v, _) in zip(kto, scored[2 * n :], strict=True)],
    )


def _scores(
    scorer: _Scorer, data: AlignData, max_rows: int, use: Callable[[], AbstractContextManager[Any]]
) -> tuple[list[float], list[float]]:
    """(DPO margins, signed KTO log-probs) under the adapter selected by `use`."""
    s = _row_scores(scorer, data, max_rows, use)
    return s.margins, s.signed


def preference_checks(settings: AlignSettings, models: _Models, data: AlignData) -> dict[str, dict[str, Any]]:
    """`margin_gain` / `improved_fraction` on the run's training rows (see the module docstring)."""
    before_m, before_k = _scores(models.scorer, data, settings.gate_max_rows, models.use("parent"))
    after_m, after_k = _scores(models.scorer, data, settings.gate_max_rows, models.use("new"))
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
            f"mean {basis} after − before, over {n} training rows (nats)",
        ),
        "improved_fraction": _check(
            n > 0 and improved >= settings.gate_min_improved_fraction,
            round(improved, 4),
            settings.gate_min_improved_fraction,
            f"share of training rows whose {basis} rose",
            bound="min",
        ),
    }
    checks["margin_gain"]["before"] = round(sum(before) / n, 6) if n else None
    checks["margin_gain"]["after"] = round(sum(after) / n, 6) if n else None
    return checks


class _Models:
    """The base model with the new adapter (and the parent's, if any) loaded side by side; `use` picks one."""

    def __init__(self, settings: AlignSettings, adapter_dir: Path, parent_adapter: Path | None) -> None:
        import torch
        from peft import PeftModel

        from align.train import load_base, load_tokenizer

        torch.set_num_threads(settings.gate_threads)
        self.tokenizer = load_tokenizer(settings.model_path)
        model = PeftModel.from_pretrained(load_base(settings.model_path), str(adapter_dir), adapter_name="new")
        if parent_adapter is not None:
            model.load_adapter(str(parent_adapter), adapter_name="parent")
        model.eval()
        self.model = model
        self.has_parent = parent_adapter is not None
        self.scorer = _Scorer(self.tokenizer, model, settings.max_length)

    def use(self, which: str) -> Callable[[], AbstractContextManager[Any]]:
        """A context factory selecting "new" or "parent" (the base model when there is no parent adapter)."""

        def ctx() -> AbstractContextManager[Any]:
            if which == "parent" and not self.has_parent:
                return self.model.disable_adapter()
            self.model.set_adapter(which)
            return nullcontext()

        return ctx

    def generate(self, prompts: Sequence[Messages], max_new_tokens: int) -> list[Sample]:
        """Greedy answers to `prompts`, in one left-padded batch, under the adapter selected by the caller."""
        import torch

        if not prompts:
            return []
        tok = self.tokenizer
        rows = [
            list(tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
            for p in prompts
        ]
        width = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=list(eos_ids),
            )
        samples = []
        for row in out[:, width:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
            tokens = row if stop is None else row[:stop]
            samples.append(Sample(tok.decode(tokens, skip_special_tokens=True), tokens, stop is not None))
        return samples


@dataclass(frozen=True)
class Sample:
    text: str
    tokens: list[int]
    stopped: bool
    """It ended with an end-of-turn token, within the budget."""


def repeated_ngram_fraction(tokens: Sequence[int], n: int) -> float:
    """Share of the n-grams of `tokens` that already occurred earlier in it (0 for loops-free text, → 1 for a
    loop). Hand-written: it is five lines, and the libraries that have it (nltk, evaluate) are not dependencies."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


@dataclass
class _Prompt:
    name: str
    messages: Messages
    case: Case | None = None


def _prompts(
    settings: AlignSettings, regression: RegressionSet | None, anchors: Sequence[Anchor], policy: Any
) -> tuple[list[_Prompt], list[str]]:
    """The gate's generation prompts: regression cases after the input policies (as serve renders them), then the
    anchors (logged after the input policies already). Returns notes on cases the input policy blocked."""
    out: list[_Prompt] = []
    notes: list[str] = []
    for case in regression.cases if regression is not None else []:
        messages = case.chat()
        if policy is not None:
            from core.policy.scope import RequestContext

            checked = policy.check_input(messages, RequestContext(api_key=None, user=None, model=_model_name(settings)))
            if checked.blocked:
                notes.append(f"{case.id}: blocked by the input policy, not asked")
                continue
            messages = [{"role": m["role"], "content": m["content"]} for m in checked.messages]
        out.append(_Prompt(f"regression:{case.id}", messages, case))
    out += [_Prompt(f"anchor:{a.completion_id}", a.prompt) for a in anchors]
    return out, notes


def _model_name(settings: AlignSettings) -> str:
    # What serve reports as the model (its served_model_name defaults to the model directory's name); rules
    # scoped to models match on it.
    return Path(settings.model_path.rstrip("/")).name


def _load_policy(settings: AlignSettings) -> tuple[Any, str]:
    """The operator's policy engine, or None with the reason (no rule files)."""
    from core.policy import PolicyEngine

    if not settings.policies_dir.is_dir() or not any(settings.policies_dir.glob("*.yaml")):
        return None, f"no policy files in {settings.policies_dir}"
    engine = PolicyEngine(settings.policies_dir)
    engine.load()  # an invalid rule set raises PolicyError: the run fails, as serve would refuse to start
    return engine, ""


def heldout_checks(settings: AlignSettings, models: _Models, heldout: AlignData | None) -> dict[str, dict[str, Any]]:
    rows = (len(heldout.dpo_rows) + len(heldout.kto_rows)) if heldout is not None else 0
    if heldout is None or rows < settings.gate_heldout_min_rows:
        note = (
            f"only {rows} held-out rows (< gate_heldout_min_rows {settings.gate_heldout_min_rows}): not decided "
            "here; the regression, drift, degeneration and policy checks decide"
        )
        return {
            "heldout_accuracy": _check(True, None, note=note, rows=rows),
            "heldout_margin": _check(True, None, note=note, rows=rows),
        }
    parent = _row_scores(models.scorer, heldout, settings.gate_max_rows, models.use("parent"))
    new = _row_scores(models.scorer, heldout, settings.gate_max_rows, models.use("new"))
    parent_m, parent_k, new_m, new_k = parent.margins, parent.signed, new.margins, new.signed
    checks: dict[str, dict[str, Any]] = {}
    if parent_m:
        n = len(parent_m)
        acc_p = sum(parent.prefers) / n
        acc_n = sum(new.prefers) / n
        bound_acc = acc_p - settings.gate_heldout_accuracy_tolerance
        checks["heldout_accuracy"] = _check(
            acc_n >= bound_acc,
            round(acc_n, 4),
            round(bound_acc, 4),
            f"share of {n} held-out DPO pairs whose chosen answer has the higher log-prob per token; "
            f"parent {acc_p:.4f}, tolerance {settings.gate_heldout_accuracy_tolerance}",
            bound="min",
            parent=round(acc_p, 4),
            rows=n,
        )
        basis, before, after = "dpo_margin", parent_m, new_m
    else:
        n = len(parent_k)
        checks["heldout_accuracy"] = _check(
            True, None, note=f"no held-out DPO pairs ({n} KTO rows): accuracy not decided", rows=n
        )
        basis, before, after = "kto_signed_logp", parent_k, new_k
    mean_p, mean_n = sum(before) / n, sum(after) / n
    bound_m = mean_p - settings.gate_heldout_margin_tolerance
    checks["heldout_margin"] = _check(
        math.isfinite(mean_n) and mean_n >= bound_m,
        round(mean_n, 6),
        round(bound_m, 6),
        f"mean held-out {basis} over {n} rows (nats); parent {mean_p:.4f}, "
        f"tolerance {settings.gate_heldout_margin_tolerance}",
        bound="min",
        parent=round(mean_p, 6),
        rows=n,
    )
    return checks


def _regression_check(
    settings: AlignSettings,
    prompts: Sequence[_Prompt],
    parent: Sequence[Sample],
    new: Sequence[Sample],
    regression: RegressionSet | None,
    notes: list[str],
    missing: str,
) -> dict[str, Any]:
    if regression is None:
        return _check(True, None, note=missing)
    checked = required = 0
    regressions: list[str] = []
    parent_failed: list[str] = []
    for p, ps, ns in zip(prompts, parent, new, strict=False):
        if p.case is None:
            continue
        for c in p.case.checks():
            checked += 1
            if not p.case.passes(c, ps.text):
                parent_failed.append(c.describe())
                continue
            required += 1
            if not p.case.passes(c, ns.text):
                regressions.append(f"{c.describe()} — answer {ns.text[:80]!r}")
    n = len(regressions)
    note = f"{n} of {required} checks the parent passed now fail ({checked} checks in {len(regression.cases)} cases)"
    if regressions:
        note += "; " + "; ".join(regressions[:5]) + (" …" if n > 5 else "")
    if parent_failed:
        note += f"; not required (the parent fails them): {', '.join(parent_failed[:5])}"
    if notes:
        note += "; " + "; ".join(notes)
    return _check(
        n <= settings.gate_max_regressions,
        n,
        settings.gate_max_regressions,
        note,
        bound="max",
        required=required,
        parent_failed=len(parent_failed),
    )


def _drift_check(
    settings: AlignSettings,
    models: _Models,
    anchors: Sequence[Anchor],
    prompts: Sequence[_Prompt],
    parent: Sequence[Sample],
) -> dict[str, Any]:
    if anchors:
        pairs = [(a.prompt, a.answer) for a in anchors]
        source = f"{len(pairs)} logged answers with positive or no negative feedback"
    else:
        pairs = [(p.messages, s.text) for p, s in zip(prompts, parent, strict=False) if s.text.strip()]
        source = f"no logged anchors; the parent's greedy answers to {len(pairs)} regression prompts"
    if not pairs:
        return _check(True, None, note="no anchors and no regression prompts: drift not measured")
    rows = [(prompt, [{"role": "assistant", "content": text}]) for prompt, text in pairs]
    means: dict[str, float] = {}
    for which in ("parent", "new"):
        with models.use(which)():
            per = [total / n for total, n in models.scorer.score(rows) if n > 0]
        means[which] = sum(per) / len(per) if per else 0.0
    drift = means["parent"] - means["new"]
    return _check(
        math.isfinite(drift) and drift <= settings.gate_max_drift_nats,
        round(drift, 6) if math.isfinite(drift) else "inf",
        settings.gate_max_drift_nats,
        f"drop of the mean per-token log-prob (nats/token), parent {means['parent']:.4f} → new "
        f"{means['new']:.4f}, on {source}",
        bound="max",
        parent=round(means["parent"], 6),
        new=round(means["new"], 6),
    )


def _degeneration_check(
    settings: AlignSettings, prompts: Sequence[_Prompt], parent: Sequence[Sample], new: Sequence[Sample]
) -> dict[str, Any]:
    if not prompts:
        return _check(True, None, note="no prompts to sample (no regression set, no anchors)")
    n = settings.gate_repeat_ngram

    def loops(s: Sample) -> bool:
        return repeated_ngram_fraction(s.tokens, n) > settings.gate_max_repeat_fraction

    p_loop = [loops(s) for s in parent]
    p_nostop = [not s.stopped for s in parent]
    n_loop = [loops(s) for s in new]
    n_nostop = [not s.stopped for s in new]
    n_blowup = [
        len(ns.tokens) > settings.gate_length_blowup * len(ps.tokens) + settings.gate_length_slack_tokens
        for ps, ns in zip(parent, new, strict=True)
    ]
    rate_p = _rate([a or b for a, b in zip(p_loop, p_nostop, strict=True)])
    flags_n = [a or b or c for a, b, c in zip(n_loop, n_nostop, n_blowup, strict=True)]
    rate_n = _rate(flags_n)
    bound = rate_p + settings.gate_max_degeneration_increase
    worst = [f"{p.name}: {s.text[:60]!r}" for p, s, f in zip(prompts, new, flags_n, strict=True) if f][:3]
    note = (
        f"share of {len(new)} greedy samples that loop (repeated {n}-grams > {settings.gate_max_repeat_fraction}), "
        f"do not stop within {settings.gate_max_new_tokens} tokens, or blow up (> {settings.gate_length_blowup}× the "
        f"parent's length + {settings.gate_length_slack_tokens}); parent {rate_p:.4f}, allowed increase "
        f"{settings.gate_max_degeneration_increase}"
    ) + (f"; e.g. {'; '.join(worst)}" if worst else "")
    return _check(
        rate_n <= bound,
        round(rate_n, 4),
        round(bound, 4),
        note,
        bound="max",
        parent=round(rate_p, 4),
        loops=sum(n_loop),
        no_stop=sum(n_nostop),
        blowups=sum(n_blowup),
        parent_loops=sum(p_loop),
        parent_no_stop=sum(p_nostop),
    )


def _violations(policy: Any, settings: AlignSettings, samples: Sequence[Sample]) -> list[bool]:
    from core.policy.scope import RequestContext

    ctx = RequestContext(api_key=None, user=None, model=_model_name(settings))
    out = []
    for s in samples:
        f = policy.output_filter(ctx)
        try:
            f.feed(s.text)
            f.finish()
            out.append(any(d.stage == "output" and d.action in ("block", "redact", "rewrite") for d in f.decisions))
        finally:
            f.close()
    return out


def _policy_check(
    settings: AlignSettings, policy: Any, why_none: str, parent: Sequence[Sample], new: Sequence[Sample]
) -> dict[str, Any]:
    if policy is None:
        return _check(True, None, note=f"{why_none}: compliance not measured")
    if not new:
        return _check(True, None, note="no samples (no regression set, no anchors)")
    rate_p = _rate(_violations(policy, settings, parent))
    rate_n = _rate(_violations(policy, settings, new))
    bound = rate_p + settings.gate_max_violation_increase
    return _check(
        rate_n <= bound,
        round(rate_n, 4),
        round(bound, 4),
        f"share of {len(new)} greedy samples an output rule of {settings.policies_dir} would block, redact or "
        f"rewrite; parent {rate_p:.4f}, allowed increase {settings.gate_max_violation_increase}",
        bound="max",
        parent=round(rate_p, 4),
    )


def evaluate_gate(
    settings: AlignSettings,
    data: AlignData,
    adapter_dir: Path,
    metrics: dict[str, float],
    *,
    parent_adapter: Path | None = None,
    heldout: AlignData | None = None,
    regression: RegressionSet | None = None,
    regression_note: str = "",
    anchors: Sequence[Anchor] = (),
) -> dict[str, Any]:
    """Run every check; the result (`passed`, `failed`, `checks`, `duration_s`, `phases_s`) goes into the manifest.

    `regression` is the loaded regression set (None: none, for the reason in `regression_note`); `heldout` the
    held-out rows; `anchors` the sampled anchors. align/job.py gathers them before training.
    """
    import time

    started = time.monotonic()
    phases: dict[str, float] = {}
    mark = started

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round(now - mark, 3)
        mark = now

    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    checks: dict[str, dict[str, Any]] = {"metrics_finite": _check(not bad, bad or "all finite")}
    checks.update(weight_checks(adapter_dir, parent_adapter))
    if checks["weights_finite"]["passed"]:
        models = _Models(settings, adapter_dir, parent_adapter)
        lap("load_models")
        policy, why_none = _load_policy(settings)
        lap("load_policies")
        checks.update(preference_checks(settings, models, data))
        checks.update(heldout_checks(settings, models, heldout))
        lap("score_rows")
        prompts, notes = _prompts(settings, regression, anchors, policy)
        with models.use("parent")():
            parent = models.generate([p.messages for p in prompts], settings.gate_max_new_tokens)
        with models.use("new")():
            new = models.generate([p.messages for p in prompts], settings.gate_max_new_tokens)
        lap("generate")
        missing = regression_note or "no regression set"
        checks["regression"] = _regression_check(settings, prompts, parent, new, regression, notes, missing)
        checks["anchor_drift"] = _drift_check(settings, models, anchors, prompts, parent)
        checks["degeneration"] = _degeneration_check(settings, prompts, parent, new)
        checks["policy_violations"] = _policy_check(settings, policy, why_none, parent, new)
        lap("judge")
    failed = [name for name, c in checks.items() if not c["passed"]]
    return {
        "passed": not failed,
        "failed": failed,
        "checks": checks,
        "duration_s": round(time.monotonic() - started, 3),
        "phases_s": phases,
    }


def describe_failure(gate: dict[str, Any]) -> str:
    """One line per failed check, for the operator: value, threshold, by how much it missed, and the note."""
    lines = []
    for name in gate.get("failed", []):
        c = gate["checks"][name]
        bound = f" (threshold {c['threshold']})" if "threshold" in c else ""
        value, threshold = c.get("value"), c.get("threshold")
        by = ""
        if c.get("bound") in ("min", "max") and isinstance(value, int | float) and isinstance(threshold, int | float):
            miss = (threshold - value) if c["bound"] == "min" else (value - threshold)
            by = f", {'short' if c['bound'] == 'min' else 'over'} by {miss:.4g}"
        note = f" — {c['note']}" if c.get("note") else ""
        lines.append(f"{name}: {value}{bound}{by}{note}")
    return "; ".join(lines)
