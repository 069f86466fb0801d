"""Tiny models shared by the retrofit and detection tests (nothing is downloaded).

``tiny_hf(family)`` builds a random 2-4 layer Hugging Face causal LM with hidden size 64 from a
config (``transformers`` must be importable; callers ``pytest.importorskip`` it first);
``MHAModel`` is a plain ``nn.MultiheadAttention`` stack with a causal mask.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 97
HF_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
# Llama-like families share one config shape: 4 heads over 2 K/V heads (GQA), head_dim 16.
_LLAMA_LIKE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
# The shared config fields of those tiny models (any Llama-like family's config takes them)
TINY_GQA = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_hf(family: str, layers: int = 4, positions: int = 128, seed: int | None = 0):
    """A random tiny ``family`` causal LM in eval mode (seeded unless ``seed`` is None)."""
    import transformers

    if seed is not None:
        torch.manual_seed(seed)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=positions
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    config_name, model_name = _LLAMA_LIKE[family]
    cfg = getattr(transformers, config_name)(
        **TINY_GQA, num_hidden_layers=layers, max_position_embeddings=positions
    )
    return getattr(transformers, model_name)(cfg).eval()


def token_ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


class MHABlock(nn.Module):
    def __init__(self, dim=32, heads=4, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x):
        T = x.shape[1] if self.attn.batch_first else x.shape[0]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(x)


class MHAModel(nn.Module):
    def __init__(self, layers=4, batch_first=True):
        super().__init__()
        self.blocks = nn.Sequential(*(MHABlock(batch_first=batch_first) for _ in range(layers)))

    def forward(self, x):
        return self.blocks(x)
