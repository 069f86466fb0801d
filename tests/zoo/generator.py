"""A retention module built from independent spelling choices, for property tests.

A :class:`Recipe` picks the product spelling, the key-transpose spelling, where the scale goes,
how the mask is built, the input layout, a dtype wrapper and the operand order of the mask
product; ``negative`` (when set) breaks the module in one way that must never be claimed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import randn, zoo_gamma

PRODUCTS = ("at", "torch_matmul", "tensor_matmul", "einsum", "bmm")
TRANSPOSES = ("t_last2", "t_23", "mT", "permute")
SCALES = ("q", "k", "scores", "out")
MASKS = ("pow_where", "pow_tril", "exp_fill_inf", "masked_fill", "buffer", "ones_tril")
LAYOUTS = ("bhtd", "bthd")
WRAPPERS = ("none", "float", "to", "type_as")
BREAKS = ("bidirectional", "noncausal", "softmax", "random_buffer", "additive", "square")

MAX_LEN = 48


@dataclass(frozen=True)
class Recipe:
    product: str = "at"
    transpose: str = "t_last2"
    scale: str = "scores"
    mask: str = "pow_where"
    layout: str = "bhtd"
    wrapper: str = "none"
    commuted: bool = False
    negative: str | None = None


def _decay_mask(kind: str, gamma: torch.Tensor, T: int, device) -> torch.Tensor:
    """[H, T, T] causal decay gamma**(i-j) (ones for ``ones_tril``), built the ``kind`` way."""
    idx = torch.arange(T, device=device)
    diff = idx[:, None] - idx[None, :]
    g = gamma[:, None, None]
    if kind == "pow_where":
        return torch.where(diff >= 0, g ** diff.clamp(min=0), 0.0)
    if kind == "pow_tril":
        return torch.tril(g**diff)
    if kind == "exp_fill_inf":
        d = diff.float().masked_fill(diff < 0, float("inf"))
        return torch.nan_to_num(torch.exp(torch.log(g) * d))
    if kind == "masked_fill":
        return (g**diff).masked_fill(idx[None, :] > idx[:, None], 0.0)
    if kind == "ones_tril":
        return torch.tril(torch.ones(T, T, device=device))
    raise ValueError(f"unknown in-graph mask kind {kind!r}")


class GeneratedRetention(torch.nn.Module):
    """Retention (or a broken look-alike) spelled according to a Recipe."""

    def __init__(self, recipe: Recipe, B: int, H: int, K: int, V: int):
        super().__init__()
        self.recipe, self.B, self.H, self.K, self.V = recipe, B, H, K, V
        self.register_buffer("gamma", zoo_gamma(H))
        self.scale = K**-0.5
        if recipe.negative == "random_buffer":
            gen = torch.Generator().manual_seed(7)
            self.register_buffer("mask", torch.rand(H, MAX_LEN, MAX_LEN, generator=gen).tril())
        elif recipe.mask == "buffer":
            self.register_buffer("mask", _decay_mask("pow_where", self.gamma, MAX_LEN, None))

    def make_inputs(self, seed: int, T: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        dims = (self.K, self.K, self.V)
        if self.recipe.layout == "bthd":
            return tuple(randn(gen, self.B, T, self.H, d) for d in dims)
        return tuple(randn(gen, self.B, self.H, T, d) for d in dims)

    def oracle(self, ref, q, k, v) -> torch.Tensor:
        """Expected output (positives only) from the float64 reference module ``ref``."""
        bthd = self.recipe.layout == "bthd"
        if bthd:
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        gamma = torch.ones(self.H) if self.recipe.mask == "ones_tril" else self.gamma
        o = ref.reference_parallel(q, k, v, gamma, self.scale)[0]
        return o.transpose(1, 2) if bthd else o

    # ---------------------------------------------------------------- pieces of forward

    def _wrap(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        w = self.recipe.wrapper
        if w == "float":
            return x.float()
        if w == "to":
            return x.to(torch.float32)
        return x.type_as(like) if w == "type_as" else x

    def _key_t(self, k: torch.Tensor) -> torch.Tensor:
        t = self.recipe.transpose
        if t == "t_last2":
            return k.transpose(-1, -2)
        if t == "t_23":
            return k.transpose(k.dim() - 2, k.dim() - 1)
        if t == "mT":
            return k.mT
        dims = list(range(k.dim()))
        return k.permute(*dims[:-2], dims[-1], dims[-2])

    def _mask(self, T: int, device) -> torch.Tensor:
        r = self.recipe
        if r.negative == "random_buffer" or r.mask == "buffer":
            mask = self.mask[:, :T, :T]
        else:
            mask = _decay_mask(r.mask, self.gamma, T, device)
        if r.negative == "bidirectional":
            mask = mask + mask.transpose(-1, -2) - torch.eye(T, device=device)
        elif r.negative == "noncausal":
            mask = mask.transpose(-1, -2)
        return mask

    def _combine(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        r = self.recipe
        if r.negative == "softmax":
            return scores.masked_fill(mask == 0, float("-inf")).softmax(dim=-1)
        if r.negative == "additive":
            return scores + mask
        out = mask * scores if r.commuted else scores * mask
        return out.square() if r.negative == "square" else out

    def _matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        p = self.recipe.product
        if p == "torch_matmul":
            return torch.matmul(a, b)
        if p == "tensor_matmul":
            return a.matmul(b)
        return a @ b

    def forward(self, q, k, v):
        r = self.recipe
        q, k, v = self._wrap(q, v), self._wrap(k, v), self._wrap(v, q)
        if r.scale == "q":
            q = q * self.scale
        elif r.scale == "k":
            k = k * self.scale
        if r.product == "einsum" and r.layout == "bthd":
            mask = self._mask(q.shape[1], q.device).to(q.dtype)
            scores = torch.einsum("bthd,bshd->bhts", q, k)
            scores = scores * self.scale if r.scale == "scores" else scores
            out = torch.einsum("bhts,bshd->bthd", self._combine(scores, mask), v)
            return out * self.scale if r.scale == "out" else out
        if r.layout == "bthd":
            q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
        B, H, T, _ = q.shape
        mask = self._mask(T, q.device).to(q.dtype)
        if r.product == "bmm":
            q, k, v = (x.reshape(B * H, T, -1) for x in (q, k, v))
            mask = mask.expand(B, H, T, T).reshape(B * H, T, T)
            scores = torch.bmm(q, self._key_t(k))
        elif r.product == "einsum":
            scores = torch.einsum("bhtd,bhsd->bhts", q, k)
        else:
            scores = self._matmul(q, self._key_t(k))
        scores = scores * self.scale if r.scale == "scores" else scores
        combined = self._combine(scores, mask)
        if r.product == "bmm":
            out = torch.bmm(combined, v).view(B, H, T, -1)
        elif r.product == "einsum":
            out = torch.einsum("bhts,bhsd->bhtd", combined, v)
        else:
            out = self._matmul(combined, v)
        out = out * self.scale if r.scale == "out" else out
        return out.transpose(1, 2) if r.layout == "bthd" else out
