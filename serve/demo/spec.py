"""Sizes and training settings of the demo model, in one frozen dataclass.

The defaults are the demo model `secondstage model demo` builds; tests build smaller ones from the same
pieces by passing another `DemoModelSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass


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
