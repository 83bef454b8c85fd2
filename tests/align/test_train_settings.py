"""The DPO phase's loss terms as align/settings.py describes them (no training here: that is test_job's)."""

from __future__ import annotations

import pytest

from align.datasets import AlignData
from align.settings import AlignSettings
from align.train import TrainError, dpo_losses, dpo_steps


def settings(**kw: object) -> AlignSettings:
    return AlignSettings(model="unused", **kw)  # type: ignore[arg-type]


def test_defaults_train_the_corrections_without_the_preference_term() -> None:
    assert dpo_losses(settings()) == (["sft"], [1.0])
    assert dpo_losses(settings(dpo_weight=1.0)) == (["sigmoid", "sft"], [1.0, 1.0])


def test_weights_and_loss_type_are_passed_on() -> None:
    assert dpo_losses(settings(dpo_weight=0.1, dpo_loss="sigmoid_norm", sft_weight=2.0)) == (
        ["sigmoid_norm", "sft"],
        [0.1, 2.0],
    )


def test_a_zero_weight_drops_its_term() -> None:
    assert dpo_losses(settings(dpo_weight=0.0)) == (["sft"], [1.0])
    assert dpo_losses(settings(dpo_weight=1.0, sft_weight=0.0)) == (["sigmoid"], [1.0])


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


def test_lora_targets_default_to_every_linear_layer_and_can_be_narrowed() -> None:
    from align.train import LORA_TARGETS, lora_config

    assert set(lora_config(settings()).target_modules) == set(LORA_TARGETS)
    narrowed = lora_config(settings(lora_targets=["q_proj", "v_proj"]))
    assert set(narrowed.target_modules) == {"q_proj", "v_proj"}


def test_no_lora_targets_is_refused() -> None:
    with pytest.raises(ValueError, match="lora_targets"):
        settings(lora_targets=[])


def _data() -> AlignData:

    prompt = [{"role": "user", "content": "q"}]
    data = AlignData()
    data.dpo_rows.append(
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "a."}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }
    )
    for text, label in (("good.", True), ("bad", False), ("fine.", True)):
        data.kto_rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": text}], "label": label})
    return data


def test_liked_answers_train_in_the_kto_phase_when_asked() -> None:
    from align.train import phase_rows

    data = _data()
    dpo, kto = phase_rows(settings(liked_as_sft=False), data)
    assert dpo == data.dpo_rows and kto == data.kto_rows


def test_liked_as_sft_moves_liked_answers_into_the_dpo_phase_as_identical_pairs() -> None:
    from align.train import phase_rows

    data = _data()
    dpo, kto = phase_rows(settings(), data)  # the default
    assert dpo[0] == data.dpo_rows[0]
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in dpo[1:]] == [
        ("good.", "good."),
        ("fine.", "fine."),
    ]
    # The thumbs-down without a correction still trains in the KTO phase; the gate's rows are untouched.
    assert [r["completion"][0]["content"] for r in kto] == ["bad"]
    assert len(data.kto_rows) == 3 and len(data.dpo_rows) == 1


def test_liked_as_sft_without_an_sft_term_is_refused() -> None:
    from align.train import phase_rows

    with pytest.raises(TrainError, match="sft_weight"):
        phase_rows(settings(liked_as_sft=True, sft_weight=0.0), _data())


def test_the_sft_trainer_runs_the_dpo_phase_exactly_when_the_preference_term_is_off() -> None:
    from align.train import uses_sft_trainer

    assert uses_sft_trainer(settings())  # the default: dpo_weight 0
    assert not uses_sft_trainer(settings(dpo_weight=0.1))


def test_sft_rows_are_each_chosen_and_liked_answer_once() -> None:
    from align.train import sft_phase_rows

    data = _data()
    prompt = data.dpo_rows[0]["prompt"]
    # A second pair with the same chosen answer (a preferred choice against two others), and a liked answer that
    # repeats a correction's chosen one: each trains once.
    data.dpo_rows.append({**data.dpo_rows[0], "rejected": [{"role": "assistant", "content": "c"}]})
    data.kto_rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": "a."}], "label": True})
    rows, kto = sft_phase_rows(settings(), data)
    # `rehearsal` marks the liked answers (where kl_tokens="rehearsal" applies the KL term).
    assert rows == [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": text}], "rehearsal": liked}
        for text, liked in (("a.", False), ("good.", True), ("fine.", True))
    ]
    assert [r["completion"][0]["content"] for r in kto] == ["bad"]
    # Without liked_as_sft the phase has the chosen answers alone, and the KTO phase every thumb.
    rows, kto = sft_phase_rows(settings(liked_as_sft=False), data)
    assert [r["completion"][0]["content"] for r in rows] == ["a."] and kto == data.kto_rows


def test_an_unknown_kl_token_set_is_refused() -> None:
    with pytest.raises(ValueError, match="kl_tokens"):
        settings(kl_tokens="some")


def test_kl_token_sets_on_a_prefix_and_a_suffix_correction() -> None:
    import torch

    from align.train import kl_token_mask

    # Two rows, two prompt positions then four completion positions; the parent ranks token 0 first everywhere.
    # Row 0 keeps the parent's answer and departs at
    # the end (a suffix style); row 1 departs at its first completion token (a prefix style) and agrees after it.
    parent = torch.tensor([0.4, 0.3, 0.3]).log().expand(2, 6, 3)
    mask = torch.tensor([[False, False, True, True, True, True]] * 2)
    target = torch.tensor([[-100, -100, 0, 0, 0, 2], [-100, -100, 1, 0, 0, 0]])
    rehearsal = torch.tensor([False, True])

    def rows(kl_tokens: str) -> list[list[int]]:
        return kl_token_mask(kl_tokens, parent, target, mask, rehearsal)[:, 2:].int().tolist()

    assert rows("agreed") == [[1, 1, 1, 0], [0, 1, 1, 1]]
    # Only before the first departure: nothing of the prefix-style row, the kept answer of the suffix-style one.
    assert rows("leading") == [[1, 1, 1, 0], [0, 0, 0, 0]]
    assert rows("rehearsal") == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert rows("all") == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_leading_plus_rehearsal_holds_a_liked_answer_past_a_near_tie() -> None:
    import torch

    from align.train import kl_token_mask

    # Two rows with the same tokens, which depart from the parent's first choice (token 0) at their second completion
    # token: row 0 is a correction (held up to the departure, then free), row 1 a liked answer — the parent's own,
    # where the departure is a near tie the server broke the other way — held entirely.
    parent = torch.tensor([0.4, 0.35, 0.25]).log().expand(2, 6, 3)
    mask = torch.tensor([[False, False, True, True, True, True]] * 2)
    target = torch.tensor([[-100, -100, 0, 1, 0, 0]] * 2)
    rehearsal = torch.tensor([False, True])

    def rows(kl_tokens: str, flags: torch.Tensor | None = rehearsal) -> list[list[int]]:
        return kl_token_mask(kl_tokens, parent, target, mask, flags)[:, 2:].int().tolist()

    assert rows("leading") == [[1, 0, 0, 0], [1, 0, 0, 0]]
    assert rows("leading+rehearsal") == [[1, 0, 0, 0], [1, 1, 1, 1]]
    # Padding and prompt positions are never held, liked row or not.
    assert kl_token_mask("leading+rehearsal", parent, target, mask, rehearsal)[:, :2].sum() == 0
    # Without the flags (a collator that does not pass them) it is `leading`.
    assert rows("leading+rehearsal", None) == rows("leading")
    # A correction-only batch (round 1: no liked answers) is held exactly as with `leading`.
    assert rows("leading+rehearsal", torch.tensor([False, False])) == rows("leading")
