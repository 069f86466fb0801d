"""Model-level measurements shared by ``rtpcompile demo`` and ``rtpcompile bench``.

Backends: "eager" (the model as written), "inductor" and "rtp" (``torch.compile`` with
``dynamic=True``, so one compilation serves every length). By default each block is compiled on
its own ("regional compilation", as PyTorch recommends for stacks of repeated blocks): identical
blocks share one compiled graph, which cuts the cold-start compile time several-fold, and the
backend sees exactly the same retention regions. ``whole=True`` compiles the model as one graph.

Workloads: prefill (a forward over T tokens without grad), a training step (forward, next-token
cross-entropy, backward; no optimizer update, which is the same eager code for every backend),
and decoding (one token at a time with the cache).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..nn import RTPConfig, RTPHybridLM, default_config
from ..nn.cache import HybridCache
from . import optional

BACKENDS = ("eager", "inductor", "rtp")


def tiny_config(**overrides) -> RTPConfig:
    """A 3-layer type-B model small enough for tests (2 retention layers, 1 attention)."""
    fields = dict(vocab_size=64, dim=32, num_layers=3, num_heads=2, layout="B", ratio=2 / 3)
    return RTPConfig(**{**fields, **overrides})


def build_model(config: RTPConfig | None = None, device: str = "cpu", seed: int = 0):
    """An RTPHybridLM (default: the demo's default type-B model) with seeded weights."""
    torch.manual_seed(seed)
    return RTPHybridLM.from_config(config or default_config()).to(device)


# NOTE: the "RetNet-shaped model": 12 layers of d = 1024, every layer retention, 8 heads
# (K = 128, V = 2d/heads = 256 as in RetNet), a 32k vocabulary
MODELS = ("default", "retnet")


def model_preset(name: str) -> RTPConfig | None:
    """The RTPConfig of a named benchmark model (None: the demo's default model)."""
    if name == "default":
        return None
    if name == "retnet":
        return RTPConfig(vocab_size=32768, dim=1024, num_layers=12, num_heads=8, ratio=1.0)
    raise ValueError(f"benchmark model must be one of {list(MODELS)}, got {name!r}")


def full_attention_twin(config: RTPConfig) -> RTPConfig:
    """The same width, depth and heads with every layer softmax attention (a Transformer)."""
    return dataclasses.replace(config, ratio=0.0)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compile_for(
    model: torch.nn.Module, backend: str, whole: bool = False
) -> tuple[Callable | None, str]:
    """(callable, "") for "eager"/"inductor"/"rtp", or (None, why it is unavailable).

    The model itself is left untouched (eager stays eager): the regional variant is a shallow
    copy sharing every parameter, whose blocks are ``torch.compile`` wrappers.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "eager":
        return model, ""
    if backend == "rtp":
        note = optional.rtp_backend_note()
        if note:
            return None, note
    raise_recompile_limit()
    if whole or not hasattr(model, "blocks"):
        return torch.compile(model, backend=backend, dynamic=True), ""
    twin = copy.copy(model)
    twin._modules = dict(model._modules)
    twin.blocks = torch.nn.ModuleList(
        torch.compile(b, backend=backend, dynamic=True) for b in model.blocks
    )
    return twin, ""


def raise_recompile_limit(limit: int = 64) -> None:
    # NOTE: every block instance, grad mode and dynamic-shape specialisation is a cache entry of
    # the same code object (RTPBlock.forward); past Dynamo's default limit of 8 the remaining
    # calls silently run eager, which would make compiled timings meaningless.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


def random_ids(vocab: int, T: int, device: str = "cpu", batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed + T)
    return torch.randint(0, vocab, (batch, T), generator=g).to(device)


def prefill_fn(fn: Callable, ids: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn(ids)

    return run


def train_step_fn(fn: Callable, model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    """Forward, next-token cross-entropy, backward (gradients are dropped afterwards)."""

    def run():
        logits = fn(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss.detach()

    return run


def synthetic_cache(model: RTPHybridLM, context: int, batch: int = 1) -> HybridCache:
    """A cache as if ``context`` tokens had been consumed: random K/V of that length for
    attention heads, a random state for retention heads. Decoding speed and cache size depend
    only on these shapes, so long contexts need no (quadratic-cost) prefill first."""
    cache = model.new_cache(batch)
    weight = model.embed.weight
    g = torch.Generator().manual_seed(context)
    for block, layer in zip(model.blocks, cache.layers, strict=True):
        if layer.state is not None:
            layer.state = torch.randn(layer.state.shape, generator=g).to(layer.state) * 0.1
        attn = _attention_of(block)
        if attn is not None and context > 0:
            shape = (batch, attn.num_heads, context, attn.head_dim)
            layer.keys = torch.randn(shape, generator=g).to(weight)
            layer.values = torch.randn(shape, generator=g).to(weight)
    cache.seq_len = context
    return cache


def _attention_of(block):
    if block.kind == "attention":
        return block.mixer
    return block.mixer.attention if block.kind == "hybrid" else None


@dataclasses.dataclass
class DecodeResult:
    tokens: int
    seconds: float
    cache: dict[str, object]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def decode(model: RTPHybridLM, cache: HybridCache, first: torch.Tensor, tokens: int, sync=None):
    """Greedy-decode ``tokens`` tokens one at a time from ``cache``; time and final cache size."""
    step = first
    sync = sync or (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(tokens):
        logits = model(step, cache=cache)
        step = logits[:, -1:].argmax(dim=-1)
    sync()
    return DecodeResult(tokens, time.perf_counter() - start, cache.nbytes())


def kv_bytes_at(cache_bytes: dict[str, object], seq_len: int, context: int) -> int:
    """Cache bytes projected to ``context`` tokens: the state is fixed, K/V grow linearly."""
    kv = int(cache_bytes["kv"])
    return int(cache_bytes["state"]) + (kv * context // seq_len if seq_len else 0)
