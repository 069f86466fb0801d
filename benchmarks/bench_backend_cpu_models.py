"""Models for bench_backend_cpu.py: a retention-only stack in two hand-written forms, and the
demo hybrid model.

``RetentionStack(form="parallel")`` is written the way the RetNet paper writes it (decay mask
rebuilt in the graph, ``(Q K^T * D) V``): the input the ``rtp`` backend is meant to speed up.
``form="chunkwise"`` computes the same function with a hand-written chunkwise form in plain
PyTorch, vectorised over chunks (one batched intra-chunk product, a short loop over chunks for
the [K, V] states only, one batched cross-chunk product): the level a kernel engineer reaches
by hand without writing a kernel. Same seed -> same weights in both forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def retnet_log_decay(num_heads: int) -> Tensor:
    return torch.log(1.0 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float32)))


def parallel_retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor) -> Tensor:
    """The paper's parallel form, layout [B, H, T, D]."""
    T, scale = q.shape[2], q.shape[-1] ** -0.5
    idx = torch.arange(T, device=q.device)
    diff = idx[:, None] - idx[None, :]
    mask = torch.where(diff >= 0, torch.exp(log_gamma[:, None, None] * diff.clamp(min=0)), 0.0)
    return (q @ k.transpose(-1, -2) * scale * mask) @ v


def chunkwise_retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, chunk: int) -> Tensor:
    """The same function in chunkwise form: O(T C D + T D^2) time, O(T C) extra memory."""
    B, H, T, K = q.shape
    V, scale = v.shape[-1], K**-0.5
    C = min(chunk, T)
    pad = (-T) % C
    if pad:  # NOTE: zero keys/values at the end contribute nothing to earlier positions
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    N = (T + pad) // C
    qc, kc, vc = (x.reshape(B, H, N, C, -1) for x in (q, k, v))
    lg = log_gamma[:, None, None, None]  # [H, 1, 1, 1] against [H, N, C, *]
    idx = torch.arange(C, device=q.device)
    diff = (idx[:, None] - idx[None, :]).to(q.dtype)
    inner = torch.exp(lg * diff.clamp(min=0)) * (diff >= 0)  # [H, 1, C, C]
    q_decay = torch.exp(lg * (idx + 1).to(q.dtype)[:, None])  # [H, 1, C, 1]
    k_decay = torch.exp(lg * (C - 1 - idx).to(q.dtype)[:, None])  # [H, 1, C, 1]
    chunk_decay = torch.exp(log_gamma * C)[:, None, None]  # [H, 1, 1]
    out = (qc @ kc.transpose(-1, -2) * inner) @ vc  # [B, H, N, C, V]
    kv = (kc * k_decay).transpose(-1, -2) @ vc  # [B, H, N, K, V]: each chunk's contribution
    states, s = [], q.new_zeros(B, H, K, V)
    for n in range(N):
        states.append(s)
        s = chunk_decay * s + kv[:, :, n]
    out = out + (qc * q_decay) @ torch.stack(states, dim=2)
    return (out * scale).reshape(B, H, N * C, V)[:, :, :T]


class RetentionLayer(nn.Module):
    """Pre-norm multi-scale retention with a residual: x + W_O retention(W_QKV norm(x))."""

    def __init__(self, dim: int, heads: int, form: str, chunk: int):
        super().__init__()
        self.heads, self.form, self.chunk = heads, form, chunk
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.register_buffer("log_gamma", retnet_log_decay(heads))

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.form == "parallel":
            o = parallel_retention(q, k, v, self.log_gamma)
        else:
            o = chunkwise_retention(q, k, v, self.log_gamma, self.chunk)
        return x + self.out(o.transpose(1, 2).reshape(B, T, D))


class RetentionStack(nn.Module):
    """``layers`` retention layers on [B, T, dim] features (no embedding, no attention)."""

    def __init__(self, layers=4, dim=128, heads=2, form="parallel", chunk=128, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(RetentionLayer(dim, heads, form, chunk) for _ in range(layers))
        self.dim = dim

    def make_input(self, T: int, batch: int = 1) -> Tensor:
        return torch.randn(batch, T, self.dim, generator=torch.Generator().manual_seed(1))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class DemoModel(nn.Module):
    """rtpcompile.nn.default_model() (hybrid LM on bytes); token ids in, logits out.

    ``form="chunkwise"`` swaps each MultiScaleRetention's parallel method for the hand-written
    chunkwise form above (same weights).
    """

    def __init__(self, form: str = "parallel", chunk: int = 128, seed: int = 0):
        super().__init__()
        from rtpcompile.nn import default_model

        torch.manual_seed(seed)
        self.model = default_model()
        if form == "chunkwise":
            for mod in self.model.modules():
                if hasattr(mod, "parallel") and hasattr(mod, "log_decay"):
                    mod.parallel = _chunkwise_method(mod, chunk)

    def make_input(self, T: int, batch: int = 1) -> Tensor:
        return torch.randint(0, 256, (batch, T), generator=torch.Generator().manual_seed(1))

    def forward(self, ids: Tensor) -> Tensor:
        out = self.model(ids)
        return out[0] if isinstance(out, tuple) else getattr(out, "logits", out)


def _chunkwise_method(msr: nn.Module, chunk: int):
    def parallel(q, k, v):
        o = chunkwise_retention(q, k, v, msr.log_decay().to(q.dtype), chunk)
        # NOTE: MultiScaleRetention.parallel scales by msr.scale; chunkwise uses K**-0.5
        return o * (msr.scale / q.shape[-1] ** -0.5)

    return parallel


def build(model: str, form: str, layers: int, chunk: int) -> nn.Module:
    if model == "stack":
        return RetentionStack(layers=layers, form=form, chunk=chunk)
    if model == "demo":
        return DemoModel(form=form, chunk=chunk)
    raise ValueError(f"unknown model {model!r}; expected 'stack' or 'demo'")
