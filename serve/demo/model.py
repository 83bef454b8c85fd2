"""The demo model's architecture: a small Llama sized by `DemoModelSpec`, initialised from a seed.

head_dim is hidden_size / num_heads; the default spec gives 64, the smallest vLLM's CPU attention supports.
Input and output embeddings are tied, and `<|end|>` is the end-of-sequence token for generation too.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from serve.demo.spec import DemoModelSpec
from serve.demo.tokenizer import END, PAD, token_id


def new_model(spec: DemoModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama for `tokenizer`'s vocabulary; the same seed gives the same weights."""
    end_id = token_id(tokenizer, END)
    pad_id = token_id(tokenizer, PAD)
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
    model.generation_config = GenerationConfig(eos_token_id=end_id, pad_token_id=pad_id, bos_token_id=None)
    return model
