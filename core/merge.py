"""Merged weights: a LoRA version folded into full weights, and the delta adapter between two versions.

serve's merged-weights mode (SECONDSTAGE_MERGED_WEIGHTS) serves the incumbent as plain weights, as fast as
the base model, instead of as a LoRA adapter on every request. Two artefacts make that possible, both
derived from a version's immutable adapter and written next to it, once, by whoever needs them first
(a replica, or `secondstage versions merge V` ahead of time):

- `<versions>/<v>/merged/` — the base model with v's adapter merged in (peft `merge_and_unload`, computed
  in float32 and saved in the base's dtype as safetensors, with the base's config and tokenizer files), what
  vLLM's `reload_weights` reads. `secondstage_merged.json` there names the base model and the adapter's
  digest it was made from; a directory made from another base or adapter is refused, never used.
- `<versions>/<c>/delta-from-<i>/` — a LoRA adapter whose update is c's minus i's, for a canary c served
  beside an incumbent i that is merged into the weights. align's adapters are full deltas from the BASE
  weights (a version continues from its parent's adapter), so c's own adapter on top of i's merged weights
  would count i's update twice. With per-module scalings s = alpha / r (alpha / sqrt(r) for rsLoRA),
  s_c·B_c·A_c − s_i·B_i·A_i = [s_c·B_c, −s_i·B_i]·[A_c; A_i], a LoRA of rank r_c + r_i and scaling 1, exact
  up to float rounding. A module only one side adapts gets zero blocks for the other. `<versions>/<i>/
  delta-to-base/` is −i's update (a canary of `base` beside a merged i).

Everything is written to a temporary directory and renamed into place, so a reader never sees half of it
and two replicas merging at once both end with the same complete directory (the loser's copy is dropped).
Run as `python -m core.merge BASE ADAPTER OUT` it merges once: serve runs it as a subprocess so its event
loop never stalls and a full model copy's memory goes back to the system when the merge is done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.versions import BASE, VersionError, VersionStore

__all__ = [
    "MERGED_DIR",
    "MERGED_INFO",
    "Delta",
    "MergeError",
    "adapter_digest",
    "delta_adapter",
    "delta_path",
    "merge_adapter",
    "merged_path",
    "merged_ready",
]

MERGED_DIR = "merged"
MERGED_INFO = "secondstage_merged.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Files of the base model's directory copied beside the merged weights, so the directory is a complete model
# (an operator can point `vllm serve` or `secondstage serve --model` at it).
_COPIED = ("tokenizer*", "special_tokens_map.json", "chat_template*", "vocab*", "merges.txt", "secondstage_demo.json")


class MergeError(VersionError):
    """A version that cannot be merged or differenced (an adapter kind this cannot fold exactly, a stale merge)."""


# -- where ------------------------------------------------------------------------------------------------


def merged_path(store: VersionStore, version: str) -> Path:
    """Where `version`'s merged weights live (whether or not they exist yet)."""
    return store.path(version) / MERGED_DIR


def delta_path(store: VersionStore, target: str, incumbent: str) -> Path:
    """Where the adapter taking `incumbent`'s merged weights to `target`'s lives (`incumbent` is not `base`)."""
    if target == BASE:
        return store.path(incumbent) / "delta-to-base"
    return store.path(target) / f"delta-from-{incumbent}"


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 over the adapter's config and weights: what a merged directory was made from."""
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        path = Path(adapter_dir) / name
        if not path.is_file():
            raise MergeError(f"adapter {adapter_dir} has no {name}; a version's adapter is a PEFT LoRA directory")
        h.update(name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _base_id(base_model: str | Path) -> str:
    path = Path(base_model)
    return str(path.resolve()) if path.exists() else str(base_model)


def merged_ready(out_dir: Path, base_model: str | Path, adapter_dir: Path) -> bool:
    """True when `out_dir` holds a merge of this adapter on this base; MergeError when it holds another one."""
    info_path = Path(out_dir) / MERGED_INFO
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text())
    want = {"base_model": _base_id(base_model), "adapter_sha256": adapter_digest(adapter_dir)}
    stale = {k: info.get(k) for k, v in want.items() if info.get(k) != v}
    if stale:
        raise MergeError(
            f"{out_dir} was merged from another {' and '.join(stale)} ({stale}, want {want}); "
            f"delete {out_dir} and merge again (`secondstage versions merge`)"
        )
    return True


# -- merge ------------------------------------------------------------------------------------------------


def merge_adapter(base_model: str | Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write the base model with `adapter_dir` merged in to `out_dir` (atomically); a no-op when it is there.

    The merge is computed in float32 (LoRA updates are small: adding them in bfloat16 would round many away)
    and saved in the base's own dtype, so the merged model costs what the base costs.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    if merged_ready(out_dir, base_model, adapter_dir):
        return out_dir
    _check_adapter(_adapter_config(adapter_dir), adapter_dir)
    config = AutoConfig.from_pretrained(str(base_model))
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(saved_dtype)
    digest = adapter_digest(adapter_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        base_dir = Path(base_model)
        if base_dir.is_dir():
            for pattern in _COPIED:
                for src in base_dir.glob(pattern):
                    if src.is_file() and not (tmp / src.name).exists():
                        shutil.copy2(src, tmp / src.name)
        info = {"base_model": _base_id(base_model), "adapter": str(adapter_dir), "adapter_sha256": digest}
        (tmp / MERGED_INFO).write_text(json.dumps(info, indent=2))
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    merged_ready(out_dir, base_model, adapter_dir)  # the winner of a race may have used another adapter
    return out_dir


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` into place; when another process got there first, keep its copy."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / MERGED_INFO).is_file() and not (final / ADAPTER_CONFIG).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# -- delta adapter ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    """An adapter to load: its directory and its rank (vLLM's `max_lora_rank` must hold it)."""

    path: Path
    rank: int


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise MergeError(f"adapter {adapter_dir} has no {ADAPTER_CONFIG}")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def _check_adapter(config: dict[str, Any], adapter_dir: Path) -> None:
    """Refuse what a plain merge or a stacked delta cannot reproduce exactly (naming the field)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"adapter {adapter_dir}: peft_type {config.get('peft_type')!r} is not LORA")
    for name, bad in (
        ("use_dora", bool(config.get("use_dora"))),
        ("modules_to_save", bool(config.get("modules_to_save"))),
        ("bias", config.get("bias", "none") != "none"),
        ("rank_pattern", bool(config.get("rank_pattern"))),
        ("alpha_pattern", bool(config.get("alpha_pattern"))),
    ):
        if bad:
            raise MergeError(
                f"adapter {adapter_dir}: {name}={config.get(name)!r} is not supported by merged-weights serving "
                "(only plain LoRA on linear layers); serve it in LoRA mode (SECONDSTAGE_MERGED_WEIGHTS=false)"
            )


def _lora_factors(adapter_dir: Path) -> tuple[dict[str, tuple[Any, Any]], int]:
    """{module prefix: (A, s·B)} in float32, and the rank, of a LoRA adapter directory."""
    import torch
    from safetensors.torch import load_file

    config = _adapter_config(adapter_dir)
    _check_adapter(config, adapter_dir)
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    factors: dict[str, tuple[Any, Any]] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise MergeError(f"adapter {adapter_dir}: tensor {key} is not a LoRA A or B matrix; not supported")
            continue
        prefix, _, suffix = key.partition(".lora_A.")
        b = tensors.get(f"{prefix}.lora_B.{suffix}")
        if b is None:
            raise MergeError(f"adapter {adapter_dir}: {key} has no matching lora_B")
        factors[prefix] = (a.to(torch.float32), b.to(torch.float32) * scale)
    return factors, r


def delta_adapter(target: Path | None, incumbent: Path | None, out_dir: Path) -> Delta:
    """An adapter whose update is `target`'s minus `incumbent`'s (None: the base, no update), written to `out_dir`.

    Served on the incumbent's merged weights, it gives the target's weights. With no incumbent update the
    target's own adapter is the answer (nothing is written); otherwise `out_dir` is written atomically (or
    reused when there).
    """
    import torch
    from safetensors.torch import save_file

    if incumbent is None:
        if target is None:
            raise MergeError("delta_adapter: the target and the incumbent are both the base model; no adapter needed")
        return Delta(Path(target), int(_adapter_config(target)["r"]))
    out_dir = Path(out_dir)
    if (out_dir / ADAPTER_CONFIG).is_file():
        return Delta(out_dir, int(_adapter_config(out_dir)["r"]))
    inc, r_i = _lora_factors(incumbent)
    tgt, r_c = _lora_factors(target) if target is not None else ({}, 0)
    rank = r_c + r_i
    tensors: dict[str, Any] = {}
    for prefix in sorted(set(inc) | set(tgt)):
        a_ref, b_ref = tgt.get(prefix) or inc[prefix]
        d_in, d_out = a_ref.shape[1], b_ref.shape[0]
        a_c, b_c = tgt.get(prefix, (torch.zeros(r_c, d_in), torch.zeros(d_out, r_c)))
        a_i, b_i = inc.get(prefix, (torch.zeros(r_i, d_in), torch.zeros(d_out, r_i)))
        tensors[f"{prefix}.lora_A.weight"] = torch.cat([a_c, a_i], dim=0).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = torch.cat([b_c, -b_i], dim=1).contiguous()
    config = dict(_adapter_config(target if target is not None else incumbent))
    modules = {prefix.rsplit(".", 1)[-1] for prefix in set(inc) | set(tgt)}
    config.update(
        r=rank,
        lora_alpha=rank,  # scaling alpha / r = 1: the scalings are folded into B above
        use_rslora=False,
        target_modules=sorted(modules),
        lora_dropout=0.0,
        rank_pattern={},
        alpha_pattern={},
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Delta(out_dir, rank)


def main(argv: list[str]) -> int:
    """`python -m core.merge BASE ADAPTER OUT`: merge once (serve's subprocess)."""
    if len(argv) != 3:
        print("usage: python -m core.merge BASE_MODEL ADAPTER_DIR OUT_DIR", file=sys.stderr)
        return 2
    try:
        merge_adapter(argv[0], Path(argv[1]), Path(argv[2]))
    except MergeError as exc:
        print(f"merge refused: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
