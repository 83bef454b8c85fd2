"""A training phase shows one progress bar (or one line) with the loss, never transformers' per-step log dicts."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from align.datasets import AlignData
from align.progress import LossProgress
from align.settings import AlignSettings
from align.train import train_adapter


def drive(progress: LossProgress, steps: int) -> None:
    state = SimpleNamespace(max_steps=steps, global_step=0)
    progress.on_train_begin(None, state, None)
    for step in range(1, steps + 1):
        state.global_step = step
        progress.on_step_end(None, state, None)
        progress.on_log(None, state, None, logs={"loss": 1.0 / step, "rewards/margins": 0.1, "epoch": step})
    progress.on_train_end(None, state, None)


def test_without_a_terminal_a_phase_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    out = StringIO()
    drive(LossProgress("DPO", Console(file=out, width=200)), 4)
    assert out.getvalue().splitlines() == [out.getvalue().strip()]
    assert out.getvalue().startswith("DPO: 4 steps, loss 0.2500, ")
    assert capsys.readouterr() == ("", "")


def test_on_a_terminal_it_draws_a_bar_with_the_loss(capsys: pytest.CaptureFixture[str]) -> None:
    out = StringIO()
    drive(LossProgress("KTO", Console(file=out, width=200, force_terminal=True, force_interactive=True)), 3)
    text = out.getvalue()
    assert "KTO" in text and "3/3" in text and "loss 0.3333" in text
    assert "{" not in text and "rewards" not in text
    assert capsys.readouterr() == ("", "")


def test_real_training_prints_no_log_dicts(
    train_settings: AlignSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = AlignData()
    for i in range(2):
        data.dpo_rows.append(
            {
                "prompt": [{"role": "user", "content": f"Question {i}?"}],
                "chosen": [{"role": "assistant", "content": "The sky is blue."}],
                "rejected": [{"role": "assistant", "content": "Green."}],
            }
        )
    out = StringIO()
    settings = train_settings.model_copy(update={"max_steps": 2})
    result = train_adapter(settings, data, tmp_path, console=Console(file=out, width=200))
    assert result.metrics["dpo_steps"] == 2
    assert result.metrics["dpo_sft_trainer"] == 1.0  # dpo_weight 0 (the default): SFTTrainer runs the phase
    captured = capsys.readouterr()
    for text in (out.getvalue(), captured.out, captured.err):
        assert "{'loss'" not in text and "'epoch'" not in text, text  # transformers' dict printing
        assert "it/s]" not in text and "%|" not in text, text  # tqdm bars
    assert [line for line in out.getvalue().splitlines() if line.startswith("SFT: ")] == [
        next(line for line in out.getvalue().splitlines() if line.startswith("SFT: 2 steps, loss "))
    ]
