"""Build the offline demo model: a tiny Llama chat model made from text this project ships.

No model hub is reachable where secondstage runs, so the project makes its own base model:
a byte-level BPE tokenizer trained on `serve/demo/data/`, a small Llama (head_dim 64, which
vLLM's CPU attention requires) and a short supervised pass on templated single-turn dialogues,
so that it answers inside the chat template, stops at `<|end|>` and answers differently to
different prompts. Same seed, same files. One to two minutes on one CPU core.

The pieces, one module each: `spec` (sizes and training settings), `dialogues` (the data), `tokenizer`
(BPE and chat template), `model` (the Llama), `training` (the supervised pass). This module puts them
together and writes the directory.

Run:  python -m serve.demo.build [OUT_DIR] [--seed N] [--steps N]   (default OUT_DIR: var/models/demo)
The CLI spelling is `secondstage model demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from serve.demo.dialogues import data_digest, demo_dialogues
from serve.demo.model import new_model
from serve.demo.spec import DemoModelSpec
from serve.demo.tokenizer import PAD, token_id, train_tokenizer
from serve.demo.training import encode_dialogue, train

# Fixed, so the weights do not depend on the machine's core count (float sums differ by thread count). One thread:
# on a busy 2-core machine two OpenMP threads ran this model 5-7x slower than one (they wait on each other).
BUILD_THREADS = 1
# Written into the model directory; records how it was built.
BUILD_INFO_FILE = "secondstage_demo.json"
BUILD_FORMAT = 1


def _write_model(out: Path, spec: DemoModelSpec, seed: int, steps: int, progress: bool) -> None:
    dialogues = demo_dialogues()
    tokenizer = train_tokenizer(dialogues, spec.vocab_size, max_length=spec.max_position_embeddings)
    model = new_model(spec, tokenizer, seed)
    examples = [encode_dialogue(tokenizer, dialogue) for dialogue in dialogues]
    loss = train(model, examples, spec, steps, token_id(tokenizer, PAD), seed, progress)

    model.to(getattr(torch, spec.save_dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "format": BUILD_FORMAT,
        "seed": seed,
        "steps": steps,
        "final_loss": round(loss, 4),
        "dialogues": len(dialogues),
        "data_sha256": data_digest(),
    }
    (out / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    # Some writers leave files private (0600); a server running as another user must still read them.
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        path.chmod(0o666 & ~umask)


def build_demo_model(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
    spec: DemoModelSpec | None = None,
) -> Path:
    """Build the demo model into `out_dir`, replacing what is there; returns `out_dir`.

    The model is written to a sibling temporary directory and renamed into place, so `out_dir`
    never holds a half-built model. `steps` overrides the training length (tests use fewer);
    `spec` other sizes (tests build smaller models from the same pieces).
    """
    spec = spec or DemoModelSpec()
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
