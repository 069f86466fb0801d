"""Positives that vary how the two products, the key transpose and the scale are written."""

from __future__ import annotations

import torch

from . import ZooModule, positive, randn


def _diff(T: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(T, device=device)
    return idx[:, None] - idx[None, :]


class _TokensFirst(ZooModule):
    """Base (not a zoo entry) of the [B, T, H, D] layouts: heads-first inputs, transposed."""

    def make_inputs(self, seed, T=None):
        return tuple(x.transpose(1, 2).contiguous() for x in super().make_inputs(seed, T))

    def oracle(self, ref, q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return super().oracle(ref, q, k, v).transpose(1, 2)


class _Embedded(ZooModule):
    """Base (not a zoo entry) of modules fed [B, T, C] activations; no float64 oracle."""

    C = 16

    def make_inputs(self, seed, T=None):
        gen = torch.Generator().manual_seed(seed)
        return (randn(gen, self.B, self.default_T if T is None else T, self.C),)

    def oracle(self, ref, *inputs):
        return None


@positive
class MatmulOperator(ZooModule):
    """`@` with transpose(-1, -2); scale after the score product; where(diff >= 0, gamma**diff)."""

    def forward(self, q, k, v):
        diff = _diff(q.shape[2], q.device)
        mask = torch.where(diff >= 0, self.gamma[:, None, None] ** diff.clamp(min=0), 0.0)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        return (scores * mask) @ v


@positive
class TorchMatmulTranspose23(ZooModule):
    """torch.matmul with transpose(2, 3); scale on q before the product; mask exp(log g * diff)."""

    def forward(self, q, k, v):
        T = q.shape[2]
        idx = torch.arange(T, device=q.device, dtype=torch.float32)
        diff = idx[:, None] - idx[None, :]
        diff = diff.masked_fill(diff < 0, float("inf"))
        mask = torch.nan_to_num(torch.exp(torch.log(self.gamma)[:, None, None] * diff))
        scores = torch.matmul(q * self.scale, k.transpose(2, 3))
        return torch.matmul(scores * mask, v)


@positive
class TensorMatmulMT(ZooModule):
    """Tensor.matmul with .mT; scale folded into k; mask tril(gamma ** diff)."""

    def forward(self, q, k, v):
        diff = _diff(q.shape[2], q.device)
        mask = torch.tril(self.gamma.view(-1, 1, 1) ** diff)
        k = k * self.scale
        return q.matmul(k.mT).mul(mask).matmul(v)


@positive
class Bmm3D(ZooModule):
    """torch.bmm on [B*H, T, D]; commuted mask * scores; scale applied to the output."""

    def forward(self, q, k, v):
        B, H, T, K = q.shape
        diff = _diff(T, q.device)
        mask = (self.gamma[:, None, None] ** diff.clamp(min=0)) * (diff >= 0)
        mask = mask.unsqueeze(0).expand(B, H, T, T).reshape(B * H, T, T)
        q3, k3, v3 = (x.reshape(B * H, T, -1) for x in (q, k, v))
        scores = torch.bmm(q3, k3.transpose(1, 2))
        out = torch.bmm(mask * scores, v3) * self.scale
        return out.view(B, H, T, -1)


@positive
class Einsum2(ZooModule):
    """Two 2-operand einsums; mask gamma**diff then masked_fill(~tril, 0)."""

    def forward(self, q, k, v):
        T = q.shape[2]
        diff = _diff(T, q.device)
        causal = torch.tril(torch.ones(T, T, device=q.device)).bool()
        mask = (self.gamma[:, None, None] ** diff).masked_fill(~causal, 0.0)
        scores = torch.einsum("bhtd,bhsd->bhts", q, k) * self.scale
        return torch.einsum("bhts,bhsd->bhtd", scores * mask, v)


@positive
class Einsum3(ZooModule):
    """A 3-operand einsum applies the mask and the value product at once."""

    def forward(self, q, k, v):
        diff = _diff(q.shape[2], q.device)
        mask = torch.where(diff >= 0, torch.exp(torch.log(self.gamma)[:, None, None] * diff), 0)
        scores = torch.einsum("bhtk,bhsk->bhts", q, k)
        return torch.einsum("bhts,hts,bhsv->bhtv", scores, mask, v) * self.scale


@positive
class Einsum4(ZooModule):
    """One 4-operand einsum computes scores, mask and values at once (Mamba2 ssd_minimal)."""

    def forward(self, q, k, v):
        mask = torch.tril(self.gamma[:, None, None] ** _diff(q.shape[2], q.device).clamp(min=0))
        return torch.einsum("bhtk,bhsk,hts,bhsv->bhtv", q * self.scale, k, mask, v)


@positive
class PermuteBTHD(_TokensFirst):
    """Layout [B, T, H, D]: permute to heads-first, key permuted straight to [B, H, D, T]."""

    def forward(self, q, k, v):
        diff = _diff(q.shape[1], q.device)
        mask = torch.tril(self.gamma[:, None, None] ** diff.clamp(min=0))
        qh = q.permute(0, 2, 1, 3)
        kt = k.permute(0, 2, 3, 1)
        vh = v.permute(0, 2, 1, 3)
        out = (qh @ kt * self.scale * mask) @ vh
        return out.permute(0, 2, 1, 3)


@positive
class EinsumBTHD(_TokensFirst):
    """Layout [B, T, H, D] kept throughout: einsum 'bthd,bshd->bhts' and back to 'bthd'."""

    def forward(self, q, k, v):
        diff = _diff(q.shape[1], q.device)
        mask = (self.gamma.view(-1, 1, 1) ** diff).tril()
        scores = torch.einsum("bthd,bshd->bhts", q * self.scale, k)
        return torch.einsum("bhts,bshd->bthd", mask * scores, v)


@positive
class DtypeWrappers(ZooModule):
    """.float() / .to(dtype) / type_as wrappers around every operand (no-ops in float32)."""

    def forward(self, q, k, v):
        diff = _diff(q.shape[2], q.device)
        mask = torch.where(diff >= 0, self.gamma[:, None, None] ** diff.clamp(min=0), 0.0)
        scores = q.float() @ k.to(torch.float32).transpose(-1, -2)
        scores = scores * mask.type_as(scores) * self.scale
        return (scores @ v.float()).to(v.dtype)


@positive
class FusedQKVChunk(_Embedded):
    """q, k, v chunked from one fused Linear(C, 3*H*D) on [B, T, C]; output projection."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(self.C, 3 * self.H * self.K, bias=False)
        self.out = torch.nn.Linear(self.H * self.K, self.C, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, self.H, self.K).transpose(1, 2) for t in (q, k, v))
        diff = _diff(T, x.device)
        mask = torch.tril(self.gamma[:, None, None] ** diff)
        o = (q @ k.transpose(-1, -2) * self.scale * mask) @ v
        return self.out(o.transpose(1, 2).reshape(B, T, self.H * self.K))


@positive
class FusedQKVSliceLearnable(_Embedded):
    """q, k, v sliced from a fused projection (K != V); learnable decay sigmoid(logit)."""

    decay_param = "decay_logit"

    def __init__(self):
        super().__init__()
        hk, hv = self.H * self.K, self.H * self.V
        self.qkv = torch.nn.Linear(self.C, 2 * hk + hv)
        self.decay_logit = torch.nn.Parameter(torch.logit(self.gamma.clone()))

    def forward(self, x):
        B, T, _ = x.shape
        hk = self.H * self.K
        y = self.qkv(x)
        q, k, v = y[..., :hk], y[..., hk : 2 * hk], y[..., 2 * hk :]
        q = q.reshape(B, T, self.H, self.K).transpose(1, 2)
        k = k.reshape(B, T, self.H, self.K).transpose(1, 2)
        v = v.reshape(B, T, self.H, self.V).transpose(1, 2)
        log_gamma = torch.nn.functional.logsigmoid(self.decay_logit)
        diff = _diff(T, x.device)
        mask = torch.exp(log_gamma[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        return (q @ (k * self.scale).transpose(-1, -2) * mask) @ v
