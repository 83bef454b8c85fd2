"""core/merge.py on tiny tensors: the delta adapter's algebra, the merge itself, and what either refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.merge import (
    MERGED_INFO,
    MergeError,
    adapter_digest,
    delta_adapter,
    delta_path,
    merge_adapter,
    merged_path,
    merged_ready,
)
from core.versions import BASE, VersionStore

PREFIX = "base_model.model.model.layers.0.self_attn"


def _adapter(
    path: Path,
    modules: dict[str, tuple[int, int]],
    *,
    r: int,
    alpha: float,
    seed: int,
    rslora: bool = False,
    **extra: object,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT-layout LoRA adapter on `modules` ({name: (d_in, d_out)}); returns {prefix: (A, B)}."""
    gen = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for name, (d_in, d_out) in modules.items():
        a, b = torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)
        tensors[f"{PREFIX}.{name}.lora_A.weight"], tensors[f"{PREFIX}.{name}.lora_B.weight"] = a, b
        factors[f"{PREFIX}.{name}"] = (a, b)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": list(modules)}
    (path / "adapter_config.json").write_text(json.dumps({**config, **extra}))
    return factors


def _update(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    return {k: scale * (b @ a) for k, (a, b) in factors.items()}


def _delta_update(path: Path) -> dict[str, torch.Tensor]:
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            prefix = key.split(".lora_A.")[0]
            out[prefix] = scale * (tensors[f"{prefix}.lora_B.weight"] @ a)
    return out


def test_delta_is_target_minus_incumbent(tmp_path: Path) -> None:
    mods = {"q_proj": (6, 6), "v_proj": (6, 4)}
    target = _update(_adapter(tmp_path / "c", mods, r=2, alpha=4, seed=1), 4 / 2)
    inc = _update(_adapter(tmp_path / "i", mods, r=3, alpha=8, seed=2, rslora=True), 8 / 3**0.5)
    delta = delta_adapter(tmp_path / "c", tmp_path / "i", tmp_path / "d")
    assert delta.rank == 5 and delta.path == tmp_path / "d"
    got = _delta_update(delta.path)
    assert set(got) == set(target)
    for key in target:
        torch.testing.assert_close(got[key], target[key] - inc[key])
        # What the engine computes: the incumbent's merged weights plus the delta are the target's weights.
        w = torch.randn_like(target[key])
        torch.testing.assert_close((w + inc[key]) + got[key], w + target[key], rtol=1e-5, atol=1e-5)
    assert json.loads((delta.path / "adapter_config.json").read_text())["use_rslora"] is False
    assert not list(tmp_path.glob(".d-*")), "the temporary directory was left behind"


def test_a_module_only_one_side_adapts_gets_zero_blocks(tmp_path: Path) -> None:
    target = _update(_adapter(tmp_path / "c", {"q_proj": (4, 4)}, r=2, alpha=2, seed=1), 1.0)
    inc = _update(_adapter(tmp_path / "i", {"k_proj": (4, 4)}, r=2, alpha=2, seed=2), 1.0)
    got = _delta_update(delta_adapter(tmp_path / "c", tmp_path / "i", tmp_path / "d").path)
    torch.testing.assert_close(got[f"{PREFIX}.q_proj"], target[f"{PREFIX}.q_proj"])
    torch.testing.assert_close(got[f"{PREFIX}.k_proj"], -inc[f"{PREFIX}.k_proj"])
    config = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "q_proj"]


def test_delta_to_base_undoes_the_incumbent_and_on_base_is_the_target_itself(tmp_path: Path) -> None:
    inc = _update(_adapter(tmp_path / "i", {"q_proj": (4, 4)}, r=2, alpha=4, seed=2), 2.0)
    got = _delta_update(delta_adapter(None, tmp_path / "i", tmp_path / "d").path)
    torch.testing.assert_close(got[f"{PREFIX}.q_proj"], -inc[f"{PREFIX}.q_proj"])
    _adapter(tmp_path / "c", {"q_proj": (4, 4)}, r=4, alpha=4, seed=1)
    on_base = delta_adapter(tmp_path / "c", None, tmp_path / "unused")
    assert (on_base.path, on_base.rank) == (tmp_path / "c", 4) and not (tmp_path / "unused").exists()
    with pytest.raises(MergeError, match="both the base"):
        delta_adapter(None, None, tmp_path / "x")


@pytest.mark.parametrize(
    ("field", "value"),
    [("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all"), ("rank_pattern", {"q": 4})],
)
def test_delta_refuses_what_it_cannot_reproduce(tmp_path: Path, field: str, value: object) -> None:
    _adapter(tmp_path / "c", {"q_proj": (4, 4)}, r=2, alpha=2, seed=1, **{field: value})
    _adapter(tmp_path / "i", {"q_proj": (4, 4)}, r=2, alpha=2, seed=2)
    with pytest.raises(MergeError, match=field):
        delta_adapter(tmp_path / "c", tmp_path / "i", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_paths_stay_in_the_version_directories(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "versions")
    assert merged_path(store, "v3") == (tmp_path / "versions" / "v3" / "merged").resolve()
    assert delta_path(store, "v3", "v2").name == "delta-from-v2" and delta_path(store, "v3", "v2").parent.name == "v3"
    assert delta_path(store, BASE, "v2") == (tmp_path / "versions" / "v2" / "delta-to-base").resolve()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(path))
    (path / "tokenizer_config.json").write_text("{}")
    return path


def _peft_adapter(model_dir: Path, out: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(model_dir)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(str(out))


def test_merge_writes_base_plus_update_and_refuses_a_stale_one(tiny_model: Path, tmp_path: Path) -> None:
    _peft_adapter(tiny_model, tmp_path / "a1", seed=1)
    _peft_adapter(tiny_model, tmp_path / "a2", seed=2)
    out = tmp_path / "v1" / "merged"
    assert merge_adapter(tiny_model, tmp_path / "a1", out) == out
    base = load_file(str(tiny_model / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    factors = load_file(str(tmp_path / "a1" / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    a = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(merged[key], base[key] + (8 / 4) * (b @ a))
    untouched = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(merged[untouched], base[untouched])
    assert not any(".lora_" in k for k in merged)
    info = json.loads((out / MERGED_INFO).read_text())
    assert info["adapter_sha256"] == adapter_digest(tmp_path / "a1")
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert merged_ready(out, tiny_model, tmp_path / "a1")
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    merge_adapter(tiny_model, tmp_path / "a1", out)  # there already: nothing is rewritten
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(MergeError, match="merged from another adapter_sha256"):
        merge_adapter(tiny_model, tmp_path / "a2", out)
    assert not list(out.parent.glob(".merged-*")), "a temporary directory was left behind"


def test_merge_refuses_a_directory_that_is_no_adapter(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match=r"has no adapter_config\.json"):
        merge_adapter(tiny_model, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_versions_merge_command(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from core.cli import app
    from core.versions import Manifest

    monkeypatch.setenv("SECONDSTAGE_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SECONDSTAGE_MODEL", str(tiny_model))
    store = VersionStore(tmp_path / "var" / "models" / "versions")
    _peft_adapter(tiny_model, tmp_path / "a1", seed=1)
    store.write(Manifest(version="v1", base_model=str(tiny_model)), tmp_path / "a1")
    done = CliRunner().invoke(app, ["versions", "merge", "v1"])
    assert done.exit_code == 0, done.output
    assert merged_ready(merged_path(store, "v1"), tiny_model, store.adapter_path("v1"))
    missing = CliRunner().invoke(app, ["versions", "merge", "v9"])
    assert missing.exit_code == 1 and "no manifest" in missing.output
