"""Tiny randomly initialised Hugging Face models built from a config (no download), shared by tests."""

import torch
from torch import nn


def tiny_llama(tie: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """2-layer Llama (hidden 64, 4 heads / 2 KV heads, MLP 128, vocab 128), in ``dtype``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()
