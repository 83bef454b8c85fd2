"""The installed environment works: the trap BRIEF.md warns about (PyPI torchvision beside torch +cpu)."""

from __future__ import annotations

import importlib.util


def test_transformers_model_class_imports() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1, vocab_size=32)
    )
    assert sum(p.numel() for p in model.parameters()) > 0


def test_no_mismatched_torchvision() -> None:
    # Either absent (what scripts/install.sh leaves) or importable beside this torch.
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision  # noqa: F401


def test_engine_and_training_stacks_import() -> None:
    import peft
    import trl
    import vllm

    assert vllm.__version__ and trl.__version__ and peft.__version__
