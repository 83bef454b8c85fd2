"""The DPO phase without its preference term trains with TRL's SFTTrainer, and it teaches the chosen answers.

Real TRL on the tiny demo model (tests/align/conftest.py): with `dpo_weight` 0 (the default) the phase runs
SFTTrainer on the corrections' chosen answers and the liked answers, and the adapter it saves gives those answers
a higher log-prob than the base model does — measured by the gate's own scorer, which renders rows through the
chat template as serve does. With `dpo_weight` > 0 the phase is DPOTrainer's, as before.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from align.datasets import AlignData
from align.gate import _Models
from align.settings import AlignSettings
from align.train import train_adapter

PROMPTS = {
    "What colour is the sky?": ("Green.", "The sky is blue."),
    "What is the capital of France?": ("Cats.", "The capital of France is Paris."),
    "How hot is boiling water?": ("Blue.", "Water boils at one hundred degrees."),
}
LIKED = {"Do cats sleep?": "Cats sleep most of the day.", "Say hello.": "Hello there."}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def feedback() -> AlignData:
    """Corrections (DPO pairs) and liked answers (KTO-desirable rows), as align.datasets builds them."""
    data = AlignData()
    for prompt, (answer, correction) in PROMPTS.items():
        data.dpo_rows.append({"prompt": user(prompt), "chosen": assistant(correction), "rejected": assistant(answer)})
    for prompt, answer in LIKED.items():
        data.kto_rows.append({"prompt": user(prompt), "completion": assistant(answer), "label": True})
    return data


def per_token_logp(models: _Models, which: str, rows: list[tuple[str, str]]) -> float:
    """Mean log-prob per token of the answers under "new" or "parent" (the base model here)."""
    with models.use(which)():
        scored = models.scorer.score([(user(p), assistant(a)) for p, a in rows])
    return sum(s for s, _ in scored) / sum(n for _, n in scored)


@pytest.mark.slow
def test_without_the_preference_term_sft_trainer_raises_the_chosen_answers(
    train_settings: AlignSettings, tmp_path: Path
) -> None:
    settings = train_settings.model_copy(update={"max_steps": 12, "kl_weight": 5.0})
    assert settings.dpo_weight == 0 and settings.liked_as_sft  # the defaults
    out = StringIO()
    result = train_adapter(settings, feedback(), tmp_path, console=Console(file=out, width=200))

    # SFTTrainer ran the phase, on each chosen and liked answer once; the phase keeps its dpo_ metrics.
    assert result.metrics["dpo_sft_trainer"] == 1.0
    assert result.phases == ["dpo"]
    assert result.metrics["dpo_steps"] == 12 and result.metrics["dpo_rows"] == len(PROMPTS) + len(LIKED)
    assert result.metrics["sft_rows"] == len(LIKED) and result.metrics["kto_rows"] == 0
    assert "dpo_logp_rejected" not in result.metrics  # nothing ran on the rejected answers
    assert result.metrics["dpo_kl"] >= 0  # the KL term toward the base (the default kl_reference; kl_tokens "leading")
    lines = out.getvalue().splitlines()
    assert any(line.startswith("SFT: 12 steps, loss ") for line in lines), lines
    assert not any(line.startswith("DPO: ") for line in lines), lines

    # The saved adapter moves the chosen and the liked answers up, as the gate (and serve) tokenize them.
    models = _Models(settings, result.adapter_dir, None)
    taught = [(p, c) for p, (_, c) in PROMPTS.items()] + list(LIKED.items())
    before, after = per_token_logp(models, "parent", taught), per_token_logp(models, "new", taught)
    print(f"\nchosen + liked answers, log-prob per token: base {before:.3f} → SFT adapter {after:.3f}")
    assert after > before + 0.1


@pytest.mark.slow
def test_with_the_preference_term_the_phase_is_dpo_trainers(train_settings: AlignSettings, tmp_path: Path) -> None:
    settings = train_settings.model_copy(update={"max_steps": 2, "dpo_weight": 1.0})
    out = StringIO()
    result = train_adapter(settings, feedback(), tmp_path, console=Console(file=out, width=200))
    assert "dpo_sft_trainer" not in result.metrics
    assert "dpo_kl" not in result.metrics  # the KL term (on by default) belongs to the SFT phase
    assert result.metrics["dpo_steps"] == 2 and "dpo_logp_rejected" in result.metrics
    assert result.metrics["dpo_rows"] == len(PROMPTS) + len(LIKED)  # liked answers as chosen == rejected pairs
    assert any(line.startswith("DPO: 2 steps, loss ") for line in out.getvalue().splitlines())
    assert not (result.adapter_dir / "ref").exists()


def completion_kl(models: _Models, rows: list[tuple[str, str]]) -> float:
    """Mean KL(base ‖ adapter) of the next-token distribution over the answers' tokens (end of turn included)."""
    import torch

    total, tokens = 0.0, 0
    for prompt, answer in rows:
        ids, start = models.scorer._row(user(prompt), assistant(answer))
        x = torch.tensor([ids])
        with torch.no_grad():
            with models.use("parent")():
                base = torch.log_softmax(models.model(input_ids=x).logits[0, start - 1 : len(ids) - 1], dim=-1)
            with models.use("new")():
                new = torch.log_softmax(models.model(input_ids=x).logits[0, start - 1 : len(ids) - 1], dim=-1)
        total += float((base.exp() * (base - new)).sum())
        tokens += len(ids) - start
    return total / tokens


@pytest.mark.slow
def test_the_kl_term_holds_the_rehearsed_answers_to_the_parent(train_settings: AlignSettings, tmp_path: Path) -> None:
    liked = list(LIKED.items())
    drift = {}
    for kl_weight in (0.0, 5.0):
        settings = train_settings.model_copy(update={"max_steps": 12, "kl_weight": kl_weight, "kl_tokens": "rehearsal"})
        result = train_adapter(settings, feedback(), tmp_path / f"kl{kl_weight}", console=Console(quiet=True))
        # The frozen parent copy the term compares with is not shipped with the adapter.
        assert sorted(p.name for p in result.adapter_dir.glob("*.safetensors")) == ["adapter_model.safetensors"]
        assert not any((result.adapter_dir / name).exists() for name in ("parent", "ref"))
        assert ("dpo_kl" in result.metrics) == (kl_weight > 0)
        models = _Models(settings, result.adapter_dir, None)
        drift[kl_weight] = completion_kl(models, liked)
        # The corrections still train: their chosen answers go up with the term on too.
        taught = [(p, c) for p, (_, c) in PROMPTS.items()]
        assert per_token_logp(models, "new", taught) > per_token_logp(models, "parent", taught) + 0.1
    print(
        f"\nKL(base ‖ adapter) per token on the rehearsed answers: kl_weight 0 → {drift[0.0]:.4f}, 5 → {drift[5.0]:.4f}"
    )
    assert drift[5.0] < 0.5 * drift[0.0]
