"""The op-level contenders: every retention form, the automatic choice, the naive parallel form
(eager, Inductor, and through the rtp backend), causal SDPA, and flash-linear-attention.

Each variant maps an :class:`OpInputs` to ``(output, leaves)``; the runner differentiates the
output with respect to ``leaves`` for the forward+backward measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import ops
from . import models, optional

Tensor = torch.Tensor


@dataclasses.dataclass
class OpInputs:
    """q, k, v [B, H, T, D] (and their [B, T, H, D] copies for FLA), decays, output grads."""

    q: Tensor
    k: Tensor
    v: Tensor
    gamma: Tensor
    log_gamma: Tensor
    scale: float
    do: Tensor
    bthd: tuple[Tensor, Tensor, Tensor] | None = None

    def grad_for(self, o: Tensor) -> Tensor:
        """The output gradient in the layout of ``o`` ([B, H, T, V] or FLA's [B, T, H, V])."""
        return self.do if o.shape == self.do.shape else self.do.transpose(1, 2).contiguous()

    @classmethod
    def make(cls, B, H, T, K, V, dtype, device, grad: bool, bthd: bool = False) -> OpInputs:
        g = torch.Generator(device="cpu").manual_seed(T)
        shapes = ((B, H, T, K), (B, H, T, K), (B, H, T, V))
        q, k, v = (
            (torch.randn(s, generator=g) * 0.5).to(device=device, dtype=dtype) for s in shapes
        )
        gamma = ops.retention_init_decay(H, device=device)
        do = torch.randn(B, H, T, V, generator=g).to(device=device, dtype=dtype)
        other = None
        if bthd:
            other = tuple(x.transpose(1, 2).contiguous().requires_grad_(grad) for x in (q, k, v))
        q, k, v = (x.requires_grad_(grad) for x in (q, k, v))
        return cls(q, k, v, gamma, torch.log(gamma), K**-0.5, do, other)


@dataclasses.dataclass(frozen=True)
class OpVariant:
    """A contender. ``growth``: time exponent in T (for skipping); ``tt_buffers``: how many
    [B, H, T, T] float32 temporaries it holds (0: memory linear in T)."""

    name: str
    fn: Callable[[OpInputs], tuple[Tensor, list[Tensor]]]
    growth: float = 1.0
    tt_buffers: float = 0.0
    description: str = ""

    def run(self, x: OpInputs, mode: str) -> object:
        """One call: "fwd" under no_grad, or "fwdbwd" (forward, then gradients of the leaves)."""
        if mode == "fwd":
            with torch.no_grad():
                return self.fn(x)[0]
        o, leaves = self.fn(x)
        return torch.autograd.grad(o, leaves, x.grad_for(o))


def naive_retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, scale: float) -> Tensor:
    """The RetNet paper's parallel form, written the way papers and model code write it."""
    T = q.shape[2]
    idx = torch.arange(T, device=q.device)
    diff = idx[:, None] - idx[None, :]
    decay = torch.exp(log_gamma[:, None, None] * diff.clamp(min=0))
    mask = torch.where(diff >= 0, decay, torch.zeros_like(decay)).to(q.dtype)
    return ((q @ k.transpose(-1, -2)) * scale * mask) @ v


class NaiveRetention(torch.nn.Module):
    """naive_retention with the decays in a buffer, as in model code.

    NOTE: the rtp backend claims a decay mask built from a module's buffer or parameter; a
    mask computed from a plain function argument could be any activation, so it declines it.
    """

    def __init__(self, log_gamma: Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("log_gamma", log_gamma.detach().clone())
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return naive_retention(q, k, v, self.log_gamma, self.scale)


def _qkv(x: OpInputs) -> list[Tensor]:
    return [x.q, x.k, x.v]


def _naive(backend: str | None = None):
    """The naive form as a module: eager, or ``torch.compile``d with ``backend`` (lazily, once
    per head count / device / scale; dynamic shapes, so one compilation serves every T)."""

    @functools.cache
    def module(heads: int, device: torch.device, scale: float):
        log_gamma = torch.log(ops.retention_init_decay(heads, device=device))
        m = NaiveRetention(log_gamma, scale)
        if backend is None:
            return m
        models.raise_recompile_limit()
        return torch.compile(m, backend=backend, dynamic=True)

    def run(x: OpInputs):
        m = module(x.q.shape[1], x.q.device, x.scale)
        return m(x.q, x.k, x.v), _qkv(x)

    return run


def _form(form: str):
    return lambda x: (ops.retention(x.q, x.k, x.v, x.gamma, form=form, scale=x.scale), _qkv(x))


def _recurrent(x: OpInputs):
    o, _ = ops.retention_recurrent(x.q, x.k, x.v, x.gamma, None, scale=x.scale)
    return o, _qkv(x)


def _sdpa(x: OpInputs):
    return F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True), _qkv(x)


def _fla(fn: Callable):
    params = inspect.signature(fn).parameters
    kwargs = {"head_first": False} if "head_first" in params else {}

    def run(x: OpInputs):
        q, k, v = x.bthd
        out = fn(q, k, v, scale=x.scale, **kwargs)
        return (out[0] if isinstance(out, tuple) else out), [q, k, v]

    return run


def build(device: str, names: list[str] | None = None) -> tuple[list[OpVariant], list[str]]:
    """The variants available here (optionally only ``names``) and one-line notes on the others."""
    is_cuda = torch.device(device).type == "cuda"
    sdpa_desc = "FlashAttention (SDPA, causal)" if is_cuda else "causal SDPA"
    variants = [
        OpVariant("naive-eager", _naive(), 2.0, 5.0, "paper's (QK^T * D)V, eager"),
        OpVariant("naive-inductor", _naive("inductor"), 2.0, 2.0, "same, backend inductor"),
        OpVariant("parallel", _form("parallel"), 2.0, 3.0, "rtp parallel form"),
        OpVariant("chunkwise", _form("chunkwise"), 1.0, 0.0, "rtp chunkwise form"),
        OpVariant("recurrent", _recurrent, 1.0, 0.0, "rtp recurrent form"),
        OpVariant("auto", _form("auto"), 1.0, 0.0, "rtp automatic choice (op)"),
        OpVariant("sdpa", _sdpa, 2.0, 0.0 if is_cuda else 0.5, sdpa_desc),
    ]
    notes = []
    backend_note = optional.rtp_backend_note()
    if backend_note is None:
        variants.insert(2, OpVariant("naive-rtp", _naive("rtp"), 1.0, 0.0, "same, backend rtp"))
    else:
        notes.append(f"naive-rtp: {backend_note}")
    fla, fla_note = optional.fla_retention() if is_cuda else ({}, "fla: GPU only")
    for form, fn in fla.items():
        variants.append(OpVariant(f"fla-{form}", _fla(fn), 2.0 if form == "parallel" else 1.0))
    if fla_note:
        notes.append(fla_note)
    if names:
        unknown = sorted(set(names) - {v.name for v in variants})
        if unknown:
            valid = [v.name for v in variants]
            raise ValueError(f"unknown or unavailable op variant(s) {unknown}; available: {valid}")
        variants = [v for v in variants if v.name in names]
    return variants, notes
