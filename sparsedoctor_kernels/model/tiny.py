"""A small random Qwen3 (`--model tiny`): the real architecture at toy sizes, for tests and the CPU demo."""

from __future__ import annotations

import torch


def tiny_qwen3(vocab_size: int = 512, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 16,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=1024, tie_word_embeddings=True, attn_implementation="eager",
        # Variance-preserving weights (1/sqrt(hidden)) rather than Qwen's 0.02: with a frozen, tied embedding,
        # 0.02 would cap the logits near +-1 and no adapter could ever fit the data.
        initializer_range=hidden_size**-0.5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)
