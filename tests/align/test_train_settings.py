"""The DPO phase's loss terms as align/settings.py describes them (no training here: that is test_job's)."""

from __future__ import annotations

import pytest

from align.settings import AlignSettings
from align.train import TrainError, dpo_losses, dpo_steps


def settings(**kw: object) -> AlignSettings:
    return AlignSettings(model="unused", **kw)  # type: ignore[arg-type]


def test_defaults_train_the_preference_term_and_the_corrections() -> None:
    assert dpo_losses(settings()) == (["sigmoid", "sft"], [1.0, 1.0])


def test_weights_and_loss_type_are_passed_on() -> None:
    assert dpo_losses(settings(dpo_weight=0.1, dpo_loss="sigmoid_norm", sft_weight=2.0)) == (
        ["sigmoid_norm", "sft"],
        [0.1, 2.0],
    )


def test_a_zero_weight_drops_its_term() -> None:
    assert dpo_losses(settings(dpo_weight=0.0)) == (["sft"], [1.0])
    assert dpo_losses(settings(sft_weight=0.0)) == (["sigmoid"], [1.0])


def test_no_loss_at_all_is_refused() -> None:
    with pytest.raises(TrainError, match="both 0"):
        dpo_losses(settings(dpo_weight=0.0, sft_weight=0.0))


def test_an_unknown_loss_type_is_refused() -> None:
    with pytest.raises(ValueError, match="dpo_loss"):
        settings(dpo_loss="sft")
    with pytest.raises(ValueError, match="dpo_loss"):
        settings(dpo_loss="nonsense")


def test_few_pairs_train_at_least_min_dpo_steps() -> None:
    assert dpo_steps(settings(), 8) == 64  # 4 batches × 3 epochs = 12 < 64
    assert dpo_steps(settings(), 48) == -1  # 24 × 3 = 72 ≥ 64: the epochs decide
    assert dpo_steps(settings(min_dpo_steps=0), 8) == -1
    assert dpo_steps(settings(max_steps=5), 8) == 5  # an explicit step count wins
