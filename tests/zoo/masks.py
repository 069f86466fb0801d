"""Positives that vary the decay mask: buffers, learnable decays, gamma = 1, per-head loops,
and the torchscale-style normalisations."""

from __future__ import annotations

import torch

from . import ZooModule, positive


def _causal_pow(gamma: torch.Tensor, T: int) -> torch.Tensor:
    idx = torch.arange(T, device=gamma.device)
    diff = idx[:, None] - idx[None, :]
    return torch.where(diff >= 0, gamma[:, None, None] ** diff.clamp(min=0), 0.0)


@positive
class MaskBuffer(ZooModule):
    """Decay mask precomputed once as a registered buffer [H, Tmax, Tmax] and sliced per call."""

    max_len = 64

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", _causal_pow(self.gamma, self.max_len), persistent=False)

    def forward(self, q, k, v):
        T = q.shape[2]
        return (self.mask[:, :T, :T] * (q @ k.transpose(-1, -2) * self.scale)) @ v


@positive
class LearnableLogDecay(ZooModule):
    """Learnable log-decay parameter; mask exp(log_gamma * diff) masked_fill(j > i, 0)."""

    decay_param = "log_gamma"

    def __init__(self):
        super().__init__()
        self.log_gamma = torch.nn.Parameter(torch.log(self.gamma.clone()))

    def forward(self, q, k, v):
        T = q.shape[2]
        idx = torch.arange(T, device=q.device)
        diff = (idx[:, None] - idx[None, :]).float()
        mask = torch.exp(self.log_gamma[:, None, None] * diff)
        mask = mask.masked_fill(idx[None, :] > idx[:, None], 0.0)
        return torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * mask, v) * self.scale


@positive
class PerHeadStack(ZooModule):
    """A Python loop over heads on 3-D [B, T, D] tensors, joined by torch.stack(dim=1)."""

    expected_claims = ZooModule.H

    def forward(self, q, k, v):
        T = q.shape[2]
        idx = torch.arange(T, device=q.device)
        diff = idx[:, None] - idx[None, :]
        outs = []
        for h in range(self.H):
            mask = torch.tril(self.gamma[h] ** diff)
            scores = q[:, h] @ k[:, h].transpose(-1, -2) * self.scale
            outs.append((scores * mask) @ v[:, h])
        return torch.stack(outs, dim=1)


@positive
class PerHeadCatBmm(ZooModule):
    """Per-head bmm on [B, T, D] slices of a [B, T, H*D] layout, joined by torch.cat(dim=-1)."""

    expected_claims = ZooModule.H

    def make_inputs(self, seed, T=None):
        q, k, v = super().make_inputs(seed, T)
        return tuple(x.transpose(1, 2).flatten(2) for x in (q, k, v))

    def oracle(self, ref, q, k, v):
        B, T, _ = q.shape
        q, k, v = (x.view(B, T, self.H, -1).transpose(1, 2) for x in (q, k, v))
        return super().oracle(ref, q, k, v).transpose(1, 2).flatten(2)

    def forward(self, q, k, v):
        mask = _causal_pow(self.gamma, q.shape[1])
        outs = []
        for h in range(self.H):
            qh = q[..., h * self.K : (h + 1) * self.K]
            kh = k[..., h * self.K : (h + 1) * self.K]
            vh = v[..., h * self.V : (h + 1) * self.V]
            scores = torch.bmm(qh * self.scale, kh.transpose(1, 2))
            outs.append(torch.bmm(mask[h] * scores, vh))
        return torch.cat(outs, dim=-1)


@positive
class CausalLinearOnesTril(ZooModule):
    """Plain causal linear attention (gamma = 1): scores * tril(ones(T, T)), no scale."""

    def oracle(self, ref, q, k, v):
        return ref.reference_parallel(q, k, v, torch.ones(self.H), 1.0)[0]

    def forward(self, q, k, v):
        T = q.shape[2]
        mask = torch.tril(torch.ones(T, T, device=q.device, dtype=q.dtype))
        return ((q @ k.transpose(-1, -2)) * mask) @ v


@positive
class CausalLinearScoresTril(ZooModule):
    """Plain causal linear attention (gamma = 1) written as (Q K^T).tril() @ V, scaled after."""

    def oracle(self, ref, q, k, v):
        return ref.reference_parallel(q, k, v, torch.ones(self.H), self.scale)[0]

    def forward(self, q, k, v):
        return (q @ k.mT).tril() @ v * self.scale


@positive
class TorchscaleNormalised(ZooModule):
    """torchscale-style: mask rows / sqrt(row sum); scores / clamp(|sum_j A|, min=1).detach()."""

    def oracle(self, ref, *inputs):
        return None

    def forward(self, q, k, v):
        T = q.shape[2]
        idx = torch.arange(T, device=q.device).to(self.gamma)
        causal = torch.tril(torch.ones(T, T, device=q.device))
        diff = torch.masked_fill(idx[:, None] - idx[None, :], ~causal.bool(), float("inf"))
        mask = torch.nan_to_num(torch.exp(diff * torch.log(self.gamma)[:, None, None]))
        mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()
        scores = q @ (k * self.scale).transpose(-1, -2) * mask
        scores = scores / scores.detach().sum(dim=-1, keepdim=True).abs().clamp(min=1)
        return torch.matmul(scores, v)
