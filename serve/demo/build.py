"""Build the offline demo model: a tiny Llama chat model made from text this project ships.

No model hub is reachable where secondstage runs, so the project makes its own base model:
a byte-level BPE tokenizer trained on `serve/demo/data/`, a small Llama (head_dim 64, which
vLLM's CPU attention requires) and a short supervised pass on templated single-turn dialogues,
so that it answers inside the chat template, stops at `<|end|>` and answers differently to
different prompts. Same seed, same files. One to two minutes on one CPU core.

Run:  python -m serve.demo.build [OUT_DIR] [--seed N] [--steps N]   (default OUT_DIR: var/models/demo)
The CLI spelling is `secondstage model demo`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD = "<|pad|>"
END = "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = (PAD, END, *(f"<|{role}|>" for role in ROLES))

# One turn is `<|role|>\n{content}<|end|>\n`; the generation prompt opens the assistant turn.
# Unknown roles raise, so a caller's mistake is not silently rendered as text the model never saw.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role ' + message['role'] + ': the demo model knows system, user and assistant.') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Not ignored by the loss: only assistant tokens (content and its closing <|end|>) are learned.
IGNORE_INDEX = -100
# Fixed, so the weights do not depend on the machine's core count (float sums differ by thread count). One thread:
# on a busy 2-core machine two OpenMP threads ran this model 5-7x slower than one (they wait on each other).
BUILD_THREADS = 1
# Written into the model directory; records how it was built.
BUILD_INFO_FILE = "secondstage_demo.json"
BUILD_FORMAT = 1


@dataclass(frozen=True)
class DemoModelSpec:
    """Sizes and training settings of the demo model."""

    vocab_size: int = 3000
    """Target BPE vocabulary, special tokens included (the trainer may stop short on a small corpus)."""
    hidden_size: int = 256
    """Model width; with 4 heads this gives head_dim 64."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads (also key/value heads: no grouped-query attention at this size)."""
    intermediate_size: int = 688
    """MLP width."""
    max_position_embeddings: int = 1024
    """Longest context the model is configured for."""
    steps: int = 700
    """Optimizer steps of the supervised pass."""
    batch_size: int = 16
    """Dialogues per step."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay)."""
    warmup_steps: int = 20
    """Steps of linear warm-up."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    save_dtype: str = "float32"
    """Dtype of the saved weights. float32: vLLM CPU then matches transformers/peft token for token
    (bfloat16 drifts once a LoRA is applied), and the model is only ~15 MB either way."""


Message = dict[str, str]
Dialogue = list[Message]


def _data_text(name: str) -> str:
    return resources.files("serve.demo").joinpath("data", name).read_text(encoding="utf-8")


def _facts() -> dict:
    return json.loads(_data_text("facts.json"))


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _qa_pairs(facts: dict) -> list[tuple[str, str]]:
    """Every templated (question, answer) pair, in a fixed order."""
    pairs: list[tuple[str, str]] = []
    for thing, colour in facts["colours"]:
        pairs.append((f"What colour is {thing}?", f"{_sentence(thing)} is {colour}."))
    words = facts["number_words"]
    for animal in facts["animals"]:
        who = _with_article(animal["name"])
        sound = f"{_sentence(who)} says {animal['sound']}." if animal["sound"] else f"{_sentence(who)} makes no sound."
        legs = (
            f"{_sentence(who)} has {words[animal['legs']]} legs."
            if animal["legs"]
            else f"{_sentence(who)} has no legs."
        )
        pairs.append((f"What sound does {who} make?", sound))
        pairs.append((f"How many legs does {who} have?", legs))
        pairs.append((f"Where does {who} live?", f"{_sentence(who)} lives {animal['home']}."))
    for city, country in facts["cities"]:
        pairs.append((f"Which country is {city} in?", f"{city} is in {country}."))
    for country, capital in facts["capitals"]:
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}."))
    for word, opposite in facts["opposites"]:
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for cycle, noun in ((facts["days"], "day"), (facts["months"], "month")):
        for i, name in enumerate(cycle):
            after = cycle[(i + 1) % len(cycle)]
            pairs.append((f"What {noun} comes after {name}?", f"{after} comes after {name}."))
    for a in range(1, 6):
        for b in range(1, 6):
            pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for a in range(2, 5):
        for b in range(2, 5):
            pairs.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    pairs.extend((question, answer) for question, answer in facts["chat"])
    return pairs


def _styled(style: str, answer: str) -> str:
    if style == "pirate":
        return f"Arr, matey! {answer}"
    if style == "shout":
        return answer.upper()
    return answer


def demo_dialogues() -> list[Dialogue]:
    """The supervised set: every templated pair, plus every fourth pair again under a system prompt.

    System prompts change the answer's style (pirate, shouting) or leave it alone (plain), so the
    model learns that a system message matters. Independent of the build seed.
    """
    facts = _facts()
    pairs = _qa_pairs(facts)
    dialogues: list[Dialogue] = [
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}] for question, answer in pairs
    ]
    styles = sorted(facts["systems"])
    for i, (question, answer) in enumerate(pairs[::4]):
        style = styles[i % len(styles)]
        prompts = facts["systems"][style]
        system = prompts[(i // len(styles)) % len(prompts)]
        dialogues.append(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
                {"role": "assistant", "content": _styled(style, answer)},
            ]
        )
    # Operators put long instruction prompts in front of every conversation (policies' `instructions`
    # rules); the model must answer as usual under them rather than drift into a trained style.
    instructions = facts["instructions"]
    for i, (question, answer) in enumerate(pairs[1::3]):
        dialogues.append(
            [
                {"role": "system", "content": instructions[i % len(instructions)]},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        )
    return dialogues


def _tokenizer_texts(dialogues: list[Dialogue]) -> Iterator[str]:
    yield from _data_text("corpus.txt").split("\n\n")
    for dialogue in dialogues:
        for message in dialogue:
            yield message["content"]


def train_tokenizer(dialogues: list[Dialogue], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: any byte string is encodable) with the chat special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_texts(dialogues), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[f"<|{role}|>" for role in ROLES],
        model_max_length=DemoModelSpec.max_position_embeddings,
        padding_side="left",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def encode_dialogue(tokenizer: PreTrainedTokenizerFast, dialogue: Dialogue) -> tuple[list[int], list[int]]:
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
    examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, generator: torch.Generator
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


def _train(
    model: LlamaForCausalLM,
    examples: list[tuple[list[int], list[int]]],
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


def _data_digest() -> str:
    digest = hashlib.sha256()
    for name in ("corpus.txt", "facts.json"):
        digest.update(_data_text(name).encode("utf-8"))
    return digest.hexdigest()


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        raise TypeError(f"expected one id for token {token!r}, got {token_id!r}")
    return token_id


def _write_model(out: Path, spec: DemoModelSpec, seed: int, steps: int, progress: bool) -> None:
    dialogues = demo_dialogues()
    tokenizer = train_tokenizer(dialogues, spec.vocab_size)
    end_id = _token_id(tokenizer, END)
    pad_id = _token_id(tokenizer, PAD)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=end_id,
        pad_token_id=pad_id,
    )
    model = LlamaForCausalLM(config)
    examples = [encode_dialogue(tokenizer, dialogue) for dialogue in dialogues]
    loss = _train(model, examples, spec, steps, pad_id, seed, progress)

    model.to(getattr(torch, spec.save_dtype))
    model.generation_config = GenerationConfig(eos_token_id=end_id, pad_token_id=pad_id, bos_token_id=None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "format": BUILD_FORMAT,
        "seed": seed,
        "steps": steps,
        "final_loss": round(loss, 4),
        "dialogues": len(dialogues),
        "data_sha256": _data_digest(),
    }
    (out / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    # Some writers leave files private (0600); a server running as another user must still read them.
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        path.chmod(0o666 & ~umask)


def build_demo_model(out_dir: Path, *, seed: int = 0, steps: int | None = None, progress: bool = True) -> Path:
    """Build the demo model into `out_dir`, replacing what is there; returns `out_dir`.

    The model is written to a sibling temporary directory and renamed into place, so `out_dir`
    never holds a half-built model. `steps` overrides the training length (tests use fewer).
    """
    spec = DemoModelSpec()
    steps = spec.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}; omit it for the default ({spec.steps}).")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    # mkdtemp makes the directory private (0700); the model is for everyone who may read its parent.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    started = time.monotonic()
    try:
        _write_model(tmp, spec, seed, steps, progress)
        _replace_dir(tmp, out_dir)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"demo model written to {out_dir} in {time.monotonic() - started:.0f} s")
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is moved aside first, then deleted."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)


def ensure_demo_model(out_dir: Path, *, progress: bool = True) -> Path:
    """Return `out_dir`, building the demo model there first if it has none (no config.json)."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        build_demo_model(out_dir, progress=progress)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the secondstage demo model.")
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("var/models/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {DemoModelSpec.steps})")
    args = parser.parse_args(argv)
    build_demo_model(args.out_dir, seed=args.seed, steps=args.steps)


if __name__ == "__main__":
    main()
