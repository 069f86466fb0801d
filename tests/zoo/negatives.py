"""Look-alikes that are NOT retention: the backend must never claim them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ZooModule, negative, randn


def _diff(T: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(T, device=device)
    return idx[:, None] - idx[None, :]


def _causal_decay(gamma: torch.Tensor, T: int) -> torch.Tensor:
    diff = _diff(T, gamma.device)
    return torch.where(diff >= 0, gamma[:, None, None] ** diff.clamp(min=0), 0.0)


@negative
class SoftmaxAttention(ZooModule):
    """Causal softmax attention (masked_fill -inf, softmax over keys)."""

    has_candidate = False

    def forward(self, q, k, v):
        T = q.shape[2]
        scores = q @ k.transpose(-1, -2) * self.scale
        upper = torch.triu(torch.ones(T, T, dtype=torch.bool, device=q.device), diagonal=1)
        return scores.masked_fill(upper, float("-inf")).softmax(dim=-1) @ v


@negative
class BidirectionalDecay(ZooModule):
    """Bidirectional decay gamma ** |i - j| (looks at the future)."""

    def forward(self, q, k, v):
        mask = self.gamma[:, None, None] ** _diff(q.shape[2], q.device).abs()
        return (q @ k.transpose(-1, -2) * self.scale * mask) @ v


@negative
class DataDependentGate(ZooModule):
    """Per-token decay computed from the input (cumulative log-sigmoid gate, GLA-like)."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(self.K, 1)

    def forward(self, q, k, v):
        log_a = F.logsigmoid(self.gate(q)).squeeze(-1)  # [B, H, T]
        cum = log_a.cumsum(-1)
        causal = torch.tril(torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device))
        mask = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -1e9))
        return (q @ k.transpose(-1, -2) * self.scale * mask) @ v


@negative
class RandomMaskBuffer(ZooModule):
    """A random lower-triangular constant buffer used as the mask."""

    max_len = 64

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1234)
        rnd = torch.rand(self.H, self.max_len, self.max_len, generator=gen).tril()
        self.register_buffer("mask", rnd, persistent=False)

    def forward(self, q, k, v):
        T = q.shape[2]
        return (q @ k.transpose(-1, -2) * self.scale * self.mask[:, :T, :T]) @ v


@negative
class PaddingMaskInput(ZooModule):
    """A decay mask multiplied by a key-padding mask that comes in as an input."""

    def make_inputs(self, seed, T=None):
        q, k, v = super().make_inputs(seed, T)
        pad = torch.ones(q.shape[0], q.shape[2])
        pad[0, -3:] = 0.0
        return q, k, v, pad

    def forward(self, q, k, v, pad):
        mask = _causal_decay(self.gamma, q.shape[2]) * pad[:, None, None, :]
        return (q @ k.transpose(-1, -2) * self.scale * mask) @ v


@negative
class ReturnedWeights(ZooModule):
    """Retention that also returns its masked score matrix (attention weights used elsewhere)."""

    def forward(self, q, k, v):
        weights = q @ k.transpose(-1, -2) * self.scale * _causal_decay(self.gamma, q.shape[2])
        return weights @ v, weights


@negative
class DropoutOnScores(ZooModule):
    """Dropout on the masked scores (a negative in training mode; identity in eval)."""

    negative_modes = ("train",)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * self.scale * _causal_decay(self.gamma, q.shape[2])
        return F.dropout(scores, p=0.25, training=self.training) @ v


@negative
class NonCausalUpper(ZooModule):
    """Upper-triangular decay gamma ** (j - i) for j >= i (anti-causal)."""

    def forward(self, q, k, v):
        mask = _causal_decay(self.gamma, q.shape[2]).transpose(-1, -2)
        return (q @ k.transpose(-1, -2) * self.scale * mask) @ v


@negative
class ComplexDtype(ZooModule):
    """Complex64 q, k, v with a real causal decay mask."""

    has_candidate = False

    def make_inputs(self, seed, T=None):
        gen = torch.Generator().manual_seed(seed)
        T = self.default_T if T is None else T
        shapes = [(self.B, self.H, T, d) for d in (self.K, self.K, self.V)]
        return tuple(torch.complex(randn(gen, *s), randn(gen, *s)) for s in shapes)

    def forward(self, q, k, v):
        mask = _causal_decay(self.gamma, q.shape[2]).to(q.dtype)
        return (q @ k.transpose(-1, -2) * self.scale * mask) @ v


@negative
class ExpRowSumNormaliser(ZooModule):
    """Masked scores divided by a softmax-like row sum of exp(scores)."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * self.scale
        masked = scores * _causal_decay(self.gamma, q.shape[2])
        return masked / torch.exp(scores).sum(-1, keepdim=True) @ v


@negative
class AdditiveLogDecay(ZooModule):
    """The log-decay ADDED to the scores (ALiBi-like, no softmax) instead of multiplied."""

    has_candidate = False

    def forward(self, q, k, v):
        diff = _diff(q.shape[2], q.device).clamp(min=0)
        bias = torch.log(self.gamma)[:, None, None] * diff
        return (q @ k.transpose(-1, -2) * self.scale + bias) @ v


@negative
class SquaredScores(ZooModule):
    """A nonlinearity on the masked scores: ((Q K^T) * D) ** 2 @ V."""

    has_candidate = False

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * self.scale * _causal_decay(self.gamma, q.shape[2])
        return scores.square() @ v


@negative
class NormaliserBeforeEinsumMask(ZooModule):
    """torchscale's row normaliser on the RAW scores, the decay applied afterwards as the value
    einsum's third operand (the op would normalise the masked scores; claimed until 2026-11-25)."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * self.scale
        normalised = scores / scores.detach().sum(-1, keepdim=True).abs().clamp(min=1)
        mask = _causal_decay(self.gamma, q.shape[2])
        return torch.einsum("bhqk,bhkv,hqk->bhqv", normalised, v, mask)
