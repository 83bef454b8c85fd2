"""The SFT phase's KL term compares with the reference `kl_reference` names (align/settings.py).

No training: the trainer's loss (`_loss_with_kl`) on one batch of a tiny random Llama with a LoRA adapter whose B
matrices are non-zero (a trained adapter, as in round 2 on), checked against the KL computed here by hand from the
model's logits with the adapter disabled (the base model) and with it on.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest

from align.settings import AlignSettings

COMPLETION_FROM = 3  # positions 0-2 are the prompt (labels -100), 3-7 the completion


def test_an_unknown_kl_reference_is_refused() -> None:
    assert AlignSettings(model="unused").kl_reference == "base"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kl_reference"):
        AlignSettings(model="unused", kl_reference="grandparent")  # type: ignore[arg-type]


def tiny_adapted_model() -> Any:
    """A random 1-layer Llama under a LoRA adapter with non-zero B (so the adapter moves the logits)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        initializer_range=0.5,  # logits far from uniform, so the adapter's move shows in the KL
    )
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=2.0)
    return model


def loss_with_kl(model: Any, inputs: dict[str, Any], kl_tokens: str, kl_reference: str) -> tuple[float, float]:
    """The trainer's loss with only the KL term on (sft_weight 0, kl_weight 1), and the KL it logs."""
    from align.train import _sft_trainer_class

    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        sft_weight=0.0,
        kl_weight=1.0,
        kl_tokens=kl_tokens,
        kl_reference=kl_reference,
        _metrics={"train": defaultdict(list)},
        _liked_tokens=0,
        _liked_leading=0,
    )
    loss = _sft_trainer_class()._loss_with_kl(trainer, model, dict(inputs), None)
    return float(loss), trainer._metrics["train"]["kl"][-1]


def by_hand(model: Any, inputs: dict[str, Any], reference_logits: Any, held: Any) -> float:
    """Mean over the held completion tokens of KL(reference ‖ adapter) of the next-token distributions."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=inputs["input_ids"]).logits[:, :-1].float(), dim=-1)
    ref = torch.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    per_token = (ref.exp() * (ref - logp)).sum(-1)
    return float((per_token * held).sum() / held.sum())


def test_the_base_reference_is_the_model_without_its_adapter() -> None:
    import torch

    model = tiny_adapted_model()
    model.train()
    input_ids = torch.tensor([[1, 5, 7, 2, 9, 4, 11, 3], [1, 6, 8, 2, 3, 12, 10, 14]])
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=input_ids).logits
    with torch.no_grad():
        adapted_logits = model(input_ids=input_ids).logits
    assert (base_logits - adapted_logits).abs().max() > 0.1  # the adapter does move the logits

    # Row 0's completion is the base model's own greedy answer (the base ranks each next token first); row 1's is
    # not. With the base as reference, `leading` holds all of row 0.
    with torch.no_grad(), model.disable_adapter():
        for i in range(COMPLETION_FROM, input_ids.shape[1]):  # greedy, one token at a time
            input_ids[0, i] = model(input_ids=input_ids[:1, :i]).logits[0, -1].argmax()
        base_logits = model(input_ids=input_ids).logits
    labels = input_ids.clone()
    labels[:, :COMPLETION_FROM] = -100
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    completion = labels[:, 1:] != -100
    assert bool((base_logits[0, COMPLETION_FROM - 1 : -1].argmax(-1) == input_ids[0, COMPLETION_FROM:]).all())

    # 'all': the KL on every completion token, against the adapter-disabled logits.
    expected = by_hand(model, inputs, base_logits, completion)
    loss, logged = loss_with_kl(model, inputs, "all", "base")
    assert expected > 0.01
    assert loss == pytest.approx(expected, rel=1e-4) and logged == pytest.approx(expected, rel=1e-4)

    # 'leading': the mask follows the base's first choices too — all of row 0 (the base's own answer).
    from align.train import kl_token_mask

    base_logp = torch.log_softmax(base_logits[:, :-1].float(), dim=-1)
    leading = kl_token_mask("leading", base_logp, labels[:, 1:], completion)
    assert leading[0].sum() == completion[0].sum()
    loss, _ = loss_with_kl(model, inputs, "leading", "base")
    assert loss == pytest.approx(by_hand(model, inputs, base_logits, leading), rel=1e-4)

    # The adapter is on again after the reference forward, and still trainable.
    with torch.no_grad():
        assert (model(input_ids=input_ids).logits - base_logits).abs().max() > 0.1
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_the_parent_reference_is_the_frozen_copy_not_the_base() -> None:
    import torch

    from align.train import _add_parent_adapter

    # The parent copy equals the adapter as the phase starts: the KL to it is zero before any step, while the KL
    # to the base is not — the two references differ on a trained adapter.
    model = tiny_adapted_model()
    _add_parent_adapter(model)
    input_ids = torch.tensor([[1, 5, 7, 2, 9, 4, 11, 3]])
    labels = input_ids.clone()
    labels[:, :COMPLETION_FROM] = -100
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    assert loss_with_kl(model, inputs, "all", "parent")[0] == pytest.approx(0.0, abs=1e-6)
    assert loss_with_kl(model, inputs, "all", "base")[0] > 0.01


def test_on_a_fresh_adapter_both_references_are_the_base_model() -> None:
    import torch
    from trl.trainer.utils import use_adapter

    from align.train import PARENT_ADAPTER, _add_parent_adapter

    # Round 1 (no parent version, no KTO phase): the adapter starts with zero B matrices, so its parent copy gives
    # the base model's logits bit for bit, and kl_reference 'parent' and 'base' train the same adapter.
    model = tiny_adapted_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    _add_parent_adapter(model)
    input_ids = torch.tensor([[1, 5, 7, 2, 9, 4, 11, 3]])
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=input_ids).logits
    with torch.no_grad(), use_adapter(model, PARENT_ADAPTER):
        parent = model(input_ids=input_ids).logits
    assert torch.equal(base, parent)
