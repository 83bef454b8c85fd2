"""What a training phase shows while it runs: one rich progress bar with the current loss, or one line.

`LossProgress` is a transformers `TrainerCallback` that align/train.py adds to each TRL trainer in place of
transformers' own printing callbacks (`ProgressCallback`'s tqdm bar and `PrinterCallback`, both of which print
every step's log dict). On an interactive console (stderr is a terminal, and not `align run --json`) it draws a
live bar — phase, steps done of total, the last logged loss, elapsed time; otherwise it prints one line when the
phase ends, so logs collected from a job stay one line per phase.

Its own module so that importing align.train (and align.job) does not import transformers (seconds).
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from transformers import TrainerCallback


class LossProgress(TrainerCallback):  # type: ignore[misc]  # transformers is untyped for mypy here
    """A training phase on `console`: a live bar (steps, current loss, time) when it is interactive, else one line
    when the phase ends. It never prints transformers' log dicts."""

    def __init__(self, phase: str, console: Console) -> None:
        self.phase = phase
        self.console = console
        self.loss: float | None = None
        self.started = time.monotonic()
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def _loss_text(self) -> str:
        return "–" if self.loss is None else f"{self.loss:.4f}"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()
        if self.console.is_interactive:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.phase, total=state.max_steps or None, loss=self._loss_text())

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        loss = (logs or {}).get("loss")
        if isinstance(loss, int | float) and not isinstance(loss, bool):
            self.loss = float(loss)
            if self.progress is not None and self.task is not None:
                self.progress.update(self.task, loss=self._loss_text())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            return
        self.console.print(
            f"{self.phase}: {state.global_step} steps, loss {self._loss_text()}, {time.monotonic() - self.started:.1f}s"
        )
