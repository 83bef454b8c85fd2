"""Train a LoRA adapter on the served base model with TRL: KTO on thumbs, then the corrections (the "DPO phase").

Both phases train the same adapter, KTO first so that the corrections (DPO), the most specific feedback,
shape the final adapter. It starts from the parent version's adapter when there is one (so
alignment is iterative: each version refines the last), else from a fresh `peft.LoraConfig` on every
projection of the Llama block (`lora_targets`). TRL makes the reference policy a frozen copy of the adapter as it
is at the start of each phase ("ref"): KTO is anchored to the parent, DPO to the KTO result.

The DPO phase's loss is an NLL term on the chosen answer (weighted by `sft_weight`) plus, when `dpo_weight` > 0, a
preference term (`dpo_loss`, e.g. "sigmoid": the RPO recipe). The default is the NLL term alone: the preference
term pushes down the rejected answer's tokens, which for a correction of a styled answer include the style, and in
the closed loop it moved the model's own answers past the gate's drift limit (docs/performance.md, "Closed loop at
200 events a round"). With `liked_as_sft` (default) liked answers train in this phase too, so the model's own good
answers are rehearsed while the corrections train; the KTO phase keeps the thumbs-downs without a correction.

Which TRL trainer runs the DPO phase depends on that weight:
- `dpo_weight` > 0: `DPOTrainer` (loss_type [dpo_loss, "sft"]); liked answers are pairs whose chosen and rejected
  are the same answer (the pairwise term has no gradient on them, `phase_rows`).
- `dpo_weight` 0 (default): `SFTTrainer` on prompt/completion rows — each correction's chosen answer and each
  liked answer, once (`sft_phase_rows`) — with the loss on the completion tokens only. The objective is the same
  as DPOTrainer's "sft" term (the mean NLL per completion token of the batch), but DPOTrainer would also run the
  reference model on chosen and rejected and the policy on the rejected answer every step, all of it discarded at
  weight 0: one policy forward and backward per row is what is left (docs/performance.md: seconds per step).
  Both trainers tokenize a row the same way, as the gate and serve see it: the prompt through the chat template
  with the generation prompt, then the answer and the end-of-turn token, so the model learns to stop.
  The SFT phase adds a KL(reference ‖ new) term (`kl_weight`, `kl_tokens`; hand-written in `compute_loss`: TRL's
  SFTTrainer has none): the base model, adapter disabled (`kl_reference` "base", the default: every round anchored
  to the root, so drift does not add up round over round), or a frozen copy of the adapter as the phase starts
  (`kl_reference` "parent"), called "parent" in the code below, gives the next-token distribution to stay near
  on the completion tokens where the answer agrees with the parent's first choice before it first departs from it
  (`kl_tokens` "leading", the default) — the parent's own answer that a correction keeps — while the tokens a
  correction changes, and what follows them, train freely (docs/performance.md).

Runs on CPU with fp32 (the demo model is tiny); on a CUDA machine TRL/accelerate pick the GPU.

What a phase prints: one rich progress bar with the current loss (align/progress.py) on an interactive stderr, else
one line per phase — not transformers' per-step log dicts and tqdm bars (its printing callbacks are removed and
the datasets' map bars switched off while training); the figures themselves stay in `TrainResult.metrics`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from align.datasets import AlignData
from align.settings import AlignSettings

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every linear layer of a Llama block (the default of `AlignSettings.lora_targets`); vLLM's LoRA supports all."""


class TrainError(Exception):
    """Training cannot start or produced nothing usable."""


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    phases: list[str] = field(default_factory=list)
    lora_rank: int = 8


def _use_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not getattr(tokenizer, "chat_template", None):
        raise TrainError(
            f"the tokenizer of {model_path!r} has no chat template; align trains on chat conversations, so use a "
            "chat model (or add `chat_template` to its tokenizer_config.json)"
        )
    if tokenizer.pad_token is None:
        # Padding positions are masked out of every loss; any token will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model_path: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if _use_cpu() else torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)


def lora_config(settings: AlignSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _common_args(settings: AlignSettings, work_dir: Path, epochs: float, learning_rate: float) -> dict[str, Any]:
    cpu = _use_cpu()
    return {
        "output_dir": str(work_dir),
        "use_cpu": cpu,
        "bf16": not cpu,
        "fp16": False,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "dataloader_num_workers": 0,
        "gradient_checkpointing": False,  # tiny models: recomputation costs more than the memory it saves
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": learning_rate,
        # Few steps on few rows: a decaying schedule would spend half the run at a fraction of the rate.
        "lr_scheduler_type": "constant",
        "num_train_epochs": epochs,
        "max_steps": settings.max_steps if settings.max_steps > 0 else -1,
        # Every step is logged (into state.log_history, read by _phase_metrics, and the progress bar's loss);
        # printing the logs is LossProgress's job, see _run_phase.
        "logging_strategy": "steps",
        "logging_steps": 1,
        "seed": settings.seed,
        "data_seed": settings.seed,
        "max_length": settings.max_length,
        "disable_tqdm": True,
        "save_only_model": True,
    }


@contextlib.contextmanager
def _no_tqdm_bars() -> Iterator[None]:
    """No tqdm bars from transformers (loading weights) or datasets (the trainers' tokenizing maps) meanwhile.

    Both switches are process-wide, so each is restored as it was found.
    """
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_bars, hf_bars = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def _phase_metrics(prefix: str, trainer: Any, output: Any, seconds: float) -> dict[str, float]:
    """Final loss and the last logged value of each TRL metric, prefixed by phase (dpo_*, kto_*)."""
    metrics: dict[str, float] = {
        f"{prefix}_steps": float(output.global_step),
        f"{prefix}_train_loss": float(output.training_loss),
        f"{prefix}_seconds": round(seconds, 3),
    }
    wanted = {
        "loss": "loss",
        "rewards/accuracies": "reward_accuracy",
        "rewards/margins": "reward_margin",
        "rewards/chosen": "reward_chosen",
        "rewards/rejected": "reward_rejected",
        "logps/chosen": "logp_chosen",
        "logps/rejected": "logp_rejected",
        "kl": "kl",
        "mean_token_accuracy": "token_accuracy",  # SFTTrainer's: share of completion tokens the model ranks first
        "nll": "nll",  # the SFT phase's NLL term, logged apart when the KL term (kl_weight) is on
        # Share of the liked answers' completion tokens that kl_tokens "leading" holds (KL term on, round 2 on).
        "liked_leading": "liked_leading",
    }
    for entry in trainer.state.log_history:
        for key, name in wanted.items():
            value = entry.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"{prefix}_{name}"] = float(value)
    if f"{prefix}_loss" in metrics:
        metrics[f"{prefix}_final_loss"] = metrics.pop(f"{prefix}_loss")
    return metrics


PARENT_ADAPTER = "parent"
"""The frozen copy of the adapter that the SFT phase's KL term compares with (`_add_parent_adapter`)."""


def _drop_ref_adapter(model: Any) -> None:
    """Remove TRL's frozen reference copy (and the KL term's parent) so the next phase and saving see only the
    trained adapter."""
    for name in ("ref", PARENT_ADAPTER):
        if name in getattr(model, "peft_config", {}):
            model.set_adapter("default")
            model.delete_adapter(name)
    model.set_adapter("default")


def dpo_losses(settings: AlignSettings) -> tuple[list[str], list[float]]:
    """TRL DPOConfig `loss_type` and `loss_weights`: the preference term and the SFT term, each when weighted > 0."""
    losses: list[str] = []
    weights: list[float] = []
    if settings.dpo_weight > 0:
        losses, weights = [settings.dpo_loss], [settings.dpo_weight]
    if settings.sft_weight > 0:
        losses, weights = [*losses, "sft"], [*weights, settings.sft_weight]
    if not losses:
        raise TrainError("dpo_weight and sft_weight are both 0: the DPO phase would have no loss; set one above 0")
    return losses, weights


def phase_rows(settings: AlignSettings, data: AlignData) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(DPO-phase rows, KTO-phase rows). With `liked_as_sft` the desirable KTO rows move into the DPO phase as
    pairs whose chosen and rejected are the same answer: every pairwise term (sigmoid, IPO, …) depends on chosen −
    rejected only, so its gradient on such a pair is zero and only the SFT term trains it."""
    if not settings.liked_as_sft:
        return list(data.dpo_rows), list(data.kto_rows)
    if settings.sft_weight <= 0:
        raise TrainError(
            "liked_as_sft trains liked answers through the SFT term, but sft_weight is 0; raise it, or set "
            "liked_as_sft false to train them in the KTO phase"
        )
    liked = [r for r in data.kto_rows if r["label"]]
    rehearsal = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"]} for r in liked]
    return [*data.dpo_rows, *rehearsal], [r for r in data.kto_rows if not r["label"]]


def uses_sft_trainer(settings: AlignSettings) -> bool:
    """Whether the DPO phase trains with TRL's SFTTrainer: the preference term is off, so only its NLL term is left."""
    return settings.dpo_weight == 0


def sft_phase_rows(settings: AlignSettings, data: AlignData) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(SFTTrainer rows of the DPO phase, KTO-phase rows) when the preference term is off (`uses_sft_trainer`).

    The DPO phase's rows as TRL prompt/completion rows: the chosen answer of every pair, then with `liked_as_sft`
    every liked answer. A row that is already there is kept once (two pairs with the same chosen answer, e.g. a
    preferred choice against each other choice, or a liked answer that is also a correction's chosen one): the
    pairs' rejected answers, which made them different rows, take no part in this loss."""
    dpo_rows, kto_rows = phase_rows(settings, data)
    pairs = len(data.dpo_rows) if settings.liked_as_sft else len(dpo_rows)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, r in enumerate(dpo_rows):
        row = {"prompt": r["prompt"], "completion": r["chosen"]}
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            # `rehearsal`: a liked answer (the model's own), where the KL term (kl_weight) holds it to its parent.
            rows.append({**row, "rehearsal": i >= pairs})
    return rows, kto_rows


def dpo_steps(settings: AlignSettings, pairs: int) -> int:
    """DPOConfig.max_steps: settings.max_steps when set, else -1 (epochs decide) unless that is < min_dpo_steps."""
    if settings.max_steps > 0:
        return settings.max_steps
    from_epochs = math.ceil(math.ceil(pairs / settings.batch_size) * settings.epochs)
    return settings.min_dpo_steps if from_epochs < settings.min_dpo_steps else -1


def _train_dpo(
    settings: AlignSettings,
    model: Any,
    tokenizer: Any,
    dataset: Any,
    work_dir: Path,
    metrics: dict[str, float],
    console: Console,
) -> Any:
    from trl import DPOConfig, DPOTrainer

    console.print(
        f"[bold]DPO[/] on {len(dataset)} pairs (β={settings.beta}, {settings.dpo_loss} weight "
        f"{settings.dpo_weight}, sft_weight={settings.sft_weight})"
    )
    losses, weights = dpo_losses(settings)
    common = _common_args(settings, work_dir, settings.epochs, settings.learning_rate)
    common["max_steps"] = dpo_steps(settings, len(dataset))
    args = DPOConfig(
        **common,
        beta=settings.beta,
        loss_type=losses,
        loss_weights=weights,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return _run_phase("dpo", trainer, metrics, console)


def _train_sft(
    settings: AlignSettings,
    model: Any,
    tokenizer: Any,
    dataset: Any,
    work_dir: Path,
    metrics: dict[str, float],
    console: Console,
) -> Any:
    """The DPO phase without its preference term (`uses_sft_trainer`): TRL's SFTTrainer on prompt/completion rows.

    The same steps, epochs and learning rate as the DPOTrainer phase it stands for (`dpo_steps`), and the same loss:
    `sft_weight` × the mean NLL per completion token of the batch (DPOTrainer's "sft" term). Its metrics keep the
    phase's `dpo_` prefix (dpo_steps, dpo_final_loss, … are what the manifests and benches read)."""
    from trl import SFTConfig

    console.print(
        f"[bold]SFT[/] on {len(dataset)} rows (the DPO phase with dpo_weight 0: chosen and liked answers, "
        f"sft_weight={settings.sft_weight})"
    )
    common = _common_args(settings, work_dir, settings.epochs, settings.learning_rate)
    common["max_steps"] = dpo_steps(settings, len(dataset))
    args = SFTConfig(
        **common,
        # The loss on the answer only (the completion: answer + end of turn), as DPOTrainer's "sft" term; the
        # prompt is context. Not assistant_only_loss: that needs a chat template with {% generation %} markers.
        completion_only_loss=True,
        assistant_only_loss=False,
        loss_type="nll",
        packing=False,
    )
    if settings.kl_weight > 0 and settings.kl_reference == "parent":
        _add_parent_adapter(model)  # kl_reference "base" compares with the adapter disabled: no copy needed
    trainer = _sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        sft_weight=settings.sft_weight,
        kl_weight=settings.kl_weight,
        kl_tokens=settings.kl_tokens,
        kl_reference=settings.kl_reference,
    )
    metrics["dpo_sft_trainer"] = 1.0
    return _run_phase("dpo", trainer, metrics, console, label="SFT")


def _add_parent_adapter(model: Any) -> None:
    """A frozen copy of the adapter as the phase starts, "parent", for the KL term (as TRL's DPOTrainer makes its
    "ref"): for a run that continues from a parent version that is the parent's adapter, for a fresh one an adapter
    whose B matrices are zero, i.e. the base model (after a KTO phase: the KTO result)."""
    model.add_adapter(PARENT_ADAPTER, model.peft_config["default"])
    for name, param in model.named_parameters():
        if f".{PARENT_ADAPTER}." in name:
            param.data.copy_(model.get_parameter(name.replace(f".{PARENT_ADAPTER}.", ".default.")).data)
            param.requires_grad_(False)
    model.set_adapter("default")


def _sft_trainer_class() -> Any:
    """TRL's SFTTrainer with the loss scaled by `sft_weight` (built on first use: importing TRL takes seconds)."""
    from trl import SFTTrainer

    class WeightedSFTTrainer(SFTTrainer):  # type: ignore[misc]  # TRL is untyped for mypy here
        def __init__(
            self,
            *args: Any,
            sft_weight: float = 1.0,
            kl_weight: float = 0.0,
            kl_tokens: str = "rehearsal",
            kl_reference: str = "base",
            **kwargs: Any,
        ) -> None:
            # Set before TRL's __init__, which asks for the signature columns.
            self.sft_weight, self.kl_weight, self.kl_tokens = sft_weight, kl_weight, kl_tokens
            self.kl_reference = kl_reference
            self._liked_tokens = self._liked_leading = 0  # the liked_leading metric's counts (_loss_with_kl)
            super().__init__(*args, **kwargs)
            if kl_weight > 0:
                self.data_collator = _RehearsalCollator(self.data_collator)

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            # The rows' `rehearsal` flag reaches compute_loss (transformers drops columns the model does not take).
            columns: list[str] = list(self._signature_columns or [])
            if self.kl_weight > 0 and "rehearsal" not in columns:
                # transformers initialises the attribute to None and fills it here, so mypy types it None.
                self._signature_columns = [*columns, "rehearsal"]  # type: ignore[assignment]

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            rehearsal = inputs.pop("rehearsal", None)
            if self.kl_weight > 0 and not return_outputs:
                return self._loss_with_kl(model, inputs, rehearsal)
            out = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if self.sft_weight == 1.0:
                return out
            # A weight is not a no-op under AdamW: gradient clipping (max_grad_norm) sees the scaled gradient.
            if return_outputs:
                loss, outputs = out
                return loss * self.sft_weight, outputs
            return out * self.sft_weight

        def _loss_with_kl(self, model: Any, inputs: dict[str, Any], rehearsal: Any) -> Any:
            """sft_weight × NLL of the completions + kl_weight × KL(reference ‖ new) per completion token that
            `kl_tokens` names; the reference ("parent" below) is the parent copy or, with kl_reference "base", the
            base model. Hand-written: TRL's SFTTrainer has no KL term (its loss is NLL or DFT), and
            DPOTrainer's reference model is compared on the sampled answers' log-probs, not the whole distribution
            the next token is drawn from, which is what keeps the answers to other prompts where they were."""
            import torch
            from trl.trainer.utils import use_adapter

            labels = inputs["labels"]
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            target = labels[:, 1:]
            mask = target != -100
            # The reference first, without a graph: switching adapters toggles requires_grad on their weights.
            # kl_reference "base": the base model, adapter disabled — every round held near the root, not near
            # the previous round (whose drift would otherwise add up round over round).
            unwrapped = self.accelerator.unwrap_model(model)
            reference = (
                unwrapped.disable_adapter() if self.kl_reference == "base" else use_adapter(unwrapped, PARENT_ADAPTER)
            )
            with torch.no_grad(), reference:
                parent = torch.log_softmax(model(**forward, use_cache=False).logits[:, :-1].float(), dim=-1)
            logp = torch.log_softmax(model(**forward, use_cache=False).logits[:, :-1].float(), dim=-1)
            token_logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll = -(token_logp * mask).sum() / mask.sum().clamp(min=1)
            kl_mask = kl_token_mask(self.kl_tokens, parent, target, mask, rehearsal)
            kl_token = (parent.exp() * (parent - logp)).sum(-1)
            kl = (kl_token * kl_mask).sum() / kl_mask.sum().clamp(min=1)
            self._metrics["train"]["kl"].append(float(kl.detach()))
            if rehearsal is not None and bool(rehearsal.any()):
                # Diagnostic: how much of the liked answers (the parent's own) `leading` holds, over the phase so far;
                # less than all where this forward's argmax is not the token the answer has (a near tie).
                liked = mask & rehearsal.bool().unsqueeze(1)
                self._liked_tokens += int(liked.sum())
                leading = kl_mask if self.kl_tokens == "leading" else kl_token_mask("leading", parent, target, mask)
                self._liked_leading += int((liked & leading).sum())
            if self._liked_tokens:
                self._metrics["train"]["liked_leading"].append(self._liked_leading / self._liked_tokens)
            self._metrics["train"]["nll"].append(float(nll.detach()))
            return self.sft_weight * nll + self.kl_weight * kl

    return WeightedSFTTrainer


def kl_token_mask(kl_tokens: str, parent: Any, target: Any, mask: Any, rehearsal: Any = None) -> Any:
    """Which completion tokens the SFT phase's KL term applies to (`AlignSettings.kl_tokens`).

    `parent`: the parent's next-token log-probs (batch, positions, vocab); `target`: the row's next tokens (batch,
    positions); `mask`: the completion tokens (the NLL's); `rehearsal`: per row, whether it is a liked answer."""
    agreed = parent.argmax(-1) == target
    if kl_tokens == "agreed":
        return mask & agreed
    if kl_tokens in ("leading", "leading+rehearsal"):
        # Agreed up to the row's first completion token that departs (prompt and padding count as agreeing).
        leading = mask & (agreed | ~mask).long().cumprod(dim=1).bool()
        if kl_tokens == "leading" or rehearsal is None:
            return leading
        # A liked answer is the parent's own answer throughout, even past a near tie where this forward's argmax
        # is not the token the server wrote (another engine, another batch, a re-tokenized text): all of it held.
        return leading | (mask & rehearsal.bool().unsqueeze(1))
    if kl_tokens == "rehearsal" and rehearsal is not None:
        return mask & rehearsal.bool().unsqueeze(1)
    return mask


class _RehearsalCollator:
    """TRL's collator, plus the batch's `rehearsal` flags as a bool tensor (TRL's collator keeps only the ids)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        flags = torch.tensor([bool(e.get("rehearsal", False)) for e in examples])
        batch = dict(self.inner([{k: v for k, v in e.items() if k != "rehearsal"} for e in examples]))
        batch["rehearsal"] = flags
        return batch


def _train_kto(
    settings: AlignSettings,
    model: Any,
    tokenizer: Any,
    dataset: Any,
    work_dir: Path,
    metrics: dict[str, float],
    console: Console,
) -> Any:
    from trl import KTOConfig, KTOTrainer

    desirable = sum(bool(x) for x in dataset["label"])
    undesirable = len(dataset) - desirable
    # Balance the classes, as the KTO paper recommends (TRL warns outside [1, 4/3] of the ratio).
    d_weight = undesirable / desirable if desirable and undesirable > desirable else 1.0
    u_weight = desirable / undesirable if undesirable and desirable > undesirable else 1.0
    console.print(f"[bold]KTO[/] on {len(dataset)} rows ({desirable} desirable, {undesirable} undesirable)")
    args = KTOConfig(
        **_common_args(settings, work_dir, settings.kto_epochs, settings.kto_learning_rate or settings.learning_rate),
        beta=settings.beta,
        desirable_weight=d_weight,
        undesirable_weight=u_weight,
    )
    trainer = KTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return _run_phase("kto", trainer, metrics, console)


def _run_phase(name: str, trainer: Any, metrics: dict[str, float], console: Console, *, label: str = "") -> Any:
    """Train one phase; record its metrics under `name`; return the model without the trainer's reference copy.
    `label` is what the progress bar calls it (default: the name in capitals)."""
    from transformers import PrinterCallback, ProgressCallback

    from align.progress import LossProgress

    # transformers adds one of these (PrinterCallback under disable_tqdm): both print every log dict.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgress(label or name.upper(), console))
    t0 = time.monotonic()
    output = trainer.train()
    metrics.update(_phase_metrics(name, trainer, output, time.monotonic() - t0))
    model = trainer.accelerator.unwrap_model(trainer.model)
    _drop_ref_adapter(model)
    return model


def train_adapter(
    settings: AlignSettings,
    data: AlignData,
    work_dir: Path,
    *,
    parent_adapter: Path | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Train on `data` and save the adapter to `work_dir/adapter`. Raises TrainError when there is nothing to train."""
    console = console or Console(stderr=True)
    with _no_tqdm_bars():
        return _train_adapter(settings, data, work_dir, parent_adapter=parent_adapter, console=console)


def _train_adapter(
    settings: AlignSettings, data: AlignData, work_dir: Path, *, parent_adapter: Path | None, console: Console
) -> TrainResult:
    import torch
    from datasets import Dataset
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    sft = uses_sft_trainer(settings)
    if sft:
        dpo_losses(settings)  # refuses a phase without any loss term before anything loads
    dpo_rows, kto_rows = sft_phase_rows(settings, data) if sft else phase_rows(settings, data)
    dpo = Dataset.from_list(dpo_rows) if dpo_rows else None
    kto = Dataset.from_list(kto_rows) if kto_rows else None
    if kto is not None and len(kto) < settings.batch_size:
        # KTO estimates its KL term from the other rows of a batch; a lone row would compare with itself.
        console.print(f"[yellow]KTO skipped: {len(kto)} row(s) < batch_size {settings.batch_size}")
        kto = None
    if dpo is None and kto is None:
        raise TrainError(f"nothing to train: {len(data.dpo_rows)} DPO pairs, {len(data.kto_rows)} KTO rows")

    torch.set_num_threads(settings.threads)
    set_seed(settings.seed)
    started = time.monotonic()
    model_path = settings.model_path
    with console.status(f"loading {model_path}"):
        tokenizer = load_tokenizer(model_path)
        base = load_base(model_path)
    if parent_adapter is not None:
        console.print(f"continuing from the parent adapter {parent_adapter}")
        model = PeftModel.from_pretrained(base, str(parent_adapter), is_trainable=True)
    else:
        model = get_peft_model(base, lora_config(settings))
    rank = int(getattr(model.peft_config["default"], "r", settings.lora_rank))

    metrics: dict[str, float] = {}
    phases: list[str] = []
    # KTO first, DPO last: the corrections are the most specific signal, so they shape the final adapter, and
    # DPO's SFT term repairs whatever the coarser thumbs signal disturbed in the corrected answers.
    if kto is not None:
        model = _train_kto(settings, model, tokenizer, kto, work_dir / "kto", metrics, console)
        phases.append("kto")
    if dpo is not None:
        train_phase = _train_sft if sft else _train_dpo
        model = train_phase(settings, model, tokenizer, dpo, work_dir / "dpo", metrics, console)
        phases.append("dpo")

    adapter_dir = work_dir / "adapter"
    model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    metrics["train_seconds"] = round(time.monotonic() - started, 3)
    metrics["dpo_rows"] = float(len(dpo) if dpo is not None else 0)
    metrics["kto_rows"] = float(len(kto) if kto is not None else 0)
    # Liked answers trained in the DPO phase (liked_as_sft): the phase's rows that are not the pairs' chosen answers.
    metrics["sft_rows"] = float(len(data.kto_rows) - len(kto_rows))
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        console.print(f"[red]non-finite training metrics: {bad}")
    return TrainResult(adapter_dir=adapter_dir, metrics=metrics, phases=phases, lora_rank=rank)
