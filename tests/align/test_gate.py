"""The publish gate on the tiny model: an adapter that did not move, or moved the wrong way, is refused."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from align.datasets import AlignData
from align.gate import describe_failure, evaluate_gate, weight_checks
from align.settings import AlignSettings
from align.train import load_base, lora_config

U = [{"role": "user", "content": "What colour is the sky?"}]


def data() -> AlignData:
    d = AlignData()
    d.dpo_rows.append(
        {
            "prompt": U,
            "chosen": [{"role": "assistant", "content": "The sky is blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        }
    )
    d.kto_rows.append({"prompt": U, "completion": [{"role": "assistant", "content": "Green."}], "label": False})
    return d


def fresh_adapter(settings: AlignSettings, path: Path) -> Path:
    torch.manual_seed(0)
    model = get_peft_model(load_base(settings.model_path), lora_config(settings))
    model.save_pretrained(str(path))
    return path


def nudge(adapter: Path, out: Path, scale: float) -> Path:
    """A copy of `adapter` whose B matrices are set to `scale` × A-shaped noise (a stand-in for training)."""
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    gen = torch.Generator().manual_seed(1)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    moved = {k: (scale * torch.randn(t.shape, generator=gen) if "lora_B" in k else t) for k, t in tensors.items()}
    save_file(moved, str(out / "adapter_model.safetensors"))
    return out


def test_untrained_adapter_fails_weights_changed(train_settings: AlignSettings, tmp_path: Path) -> None:
    adapter = fresh_adapter(train_settings, tmp_path / "fresh")
    checks = weight_checks(adapter, None)
    assert checks["weights_finite"]["passed"]
    assert not checks["weights_changed"]["passed"] and checks["weights_changed"]["value"] == 0.0
    gate = evaluate_gate(train_settings, data(), adapter, {"dpo_final_loss": 0.5})
    assert not gate["passed"]
    # Zero delta means identical log-probs: the margin did not improve either.
    assert gate["failed"] == ["weights_changed", "margin_gain", "improved_fraction"]
    assert "weights_changed: 0.0" in describe_failure(gate)


def test_non_finite_metrics_and_weights_fail(train_settings: AlignSettings, tmp_path: Path) -> None:
    adapter = fresh_adapter(train_settings, tmp_path / "fresh")
    broken = nudge(adapter, tmp_path / "nan", float("nan"))
    gate = evaluate_gate(train_settings, data(), broken, {"dpo_final_loss": float("nan")})
    assert not gate["passed"]
    assert {"metrics_finite", "weights_finite"} <= set(gate["failed"])
    assert gate["checks"]["metrics_finite"]["value"] == ["dpo_final_loss"]


def test_changed_adapter_is_measured_against_its_parent(train_settings: AlignSettings, tmp_path: Path) -> None:
    parent = nudge(fresh_adapter(train_settings, tmp_path / "fresh"), tmp_path / "parent", 0.05)
    assert weight_checks(parent, parent)["weights_changed"]["passed"] is False
    gate = evaluate_gate(train_settings, data(), parent, {}, parent_adapter=parent)
    # Same weights as the parent: no margin gain, so no publish, whatever the absolute margin is.
    assert gate["checks"]["margin_gain"]["value"] == 0.0
    assert not gate["passed"]


def test_kto_rows_stand_in_without_dpo_pairs(train_settings: AlignSettings, tmp_path: Path) -> None:
    only_kto = data()
    only_kto.dpo_rows.clear()
    adapter = nudge(fresh_adapter(train_settings, tmp_path / "fresh"), tmp_path / "moved", 0.05)
    gate = evaluate_gate(train_settings, only_kto, adapter, {})
    assert "kto_signed_logp" in gate["checks"]["margin_gain"]["note"]
    # A random nudge moves the log-prob one way or the other; the gate reports which, with the numbers.
    before, after = gate["checks"]["margin_gain"]["before"], gate["checks"]["margin_gain"]["after"]
    assert gate["checks"]["margin_gain"]["passed"] == (after - before > 0)
