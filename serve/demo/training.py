"""The demo model's supervised pass: dialogues → (ids, labels) → shuffled padded batches → AdamW steps.

Only assistant tokens (content and its closing `<|end|>`) are learned. Every random draw comes from one
seeded generator, so the same seed gives the same weights (with the thread count fixed by the builder).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from serve.demo.dialogues import Dialogue
from serve.demo.spec import DemoModelSpec
from serve.demo.tokenizer import END

# Not ignored by the loss: only assistant tokens (content and its closing <|end|>) are learned.
IGNORE_INDEX = -100

Example = tuple[list[int], list[int]]
"""Token ids of one dialogue and its labels (IGNORE_INDEX where nothing is learned)."""


def encode_dialogue(tokenizer: PreTrainedTokenizerFast, dialogue: Dialogue) -> Example:
    """Token ids of the rendered dialogue and labels that keep only the assistant's tokens.

    Pieces are encoded one by one; every piece starts at a special token or after a newline, where
    the byte-level pre-tokenizer splits anyway, so the ids equal those of the whole rendered text.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for message in dialogue:
        head = tokenizer.encode(f"<|{message['role']}|>\n", add_special_tokens=False)
        body = tokenizer.encode(f"{message['content']}{END}", add_special_tokens=False)
        tail = tokenizer.encode("\n", add_special_tokens=False)
        learned = message["role"] == "assistant"
        input_ids += head + body + tail
        labels += [IGNORE_INDEX] * len(head) + (body if learned else [IGNORE_INDEX] * len(body))
        labels += [IGNORE_INDEX] * len(tail)
    return input_ids, labels


def _batches(
    examples: list[Example], batch_size: int, pad_id: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless shuffled epochs of right-padded batches (input_ids, attention_mask, labels)."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        # Batches of similar lengths waste less compute on padding; their order is shuffled again.
        windows = [order[i : i + batch_size * 8] for i in range(0, len(order), batch_size * 8)]
        ordered = [i for window in windows for i in sorted(window, key=lambda i: len(examples[i][0]))]
        starts = list(range(0, len(ordered) - batch_size + 1, batch_size))
        for pick in torch.randperm(len(starts), generator=generator).tolist():
            chunk = [examples[i] for i in ordered[starts[pick] : starts[pick] + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for row, (example_ids, example_labels) in enumerate(chunk):
                ids[row, : len(example_ids)] = torch.tensor(example_ids)
                mask[row, : len(example_ids)] = 1
                labels[row, : len(example_labels)] = torch.tensor(example_labels)
            yield ids, mask, labels


def _learning_rate(step: int, spec: DemoModelSpec, total: int) -> float:
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: LlamaForCausalLM,
    examples: list[Example],
    spec: DemoModelSpec,
    steps: int,
    pad_id: int,
    seed: int,
    progress: bool,
) -> float:
    """The supervised pass; returns the mean loss of the last tenth of the steps."""
    generator = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.learning_rate,
        betas=(0.9, 0.98),
    )
    batches = _batches(examples, spec.batch_size, pad_id, generator)
    tail: list[float] = []
    model.train()
    columns = (
        TextColumn("[bold]demo model[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, spec, steps)
            ids, mask, labels = next(batches)
            # Logits only where a label is learned: the vocabulary projection is a quarter of the compute.
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            targets = labels[:, 1:]
            learned = targets != IGNORE_INDEX
            loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[learned]), targets[learned])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            value = loss.item()
            if step >= steps - max(1, steps // 10):
                tail.append(value)
            bar.update(task, advance=1, loss=value)
    model.eval()
    return sum(tail) / len(tail)
