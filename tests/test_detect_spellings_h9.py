"""Spellings detection missed before: scores an einsum lays out with the query and key axes not
last (``einsum('bqhd,bkhd->bqhk') * mask.permute(1, 0, 2)`` read back by
``einsum('bqhk,bkhv->bqhv')``), and a one-token recurrent step written in einsum keeping the
token axis (``einsum('bhtk,bhtv->bhkv', k, v)`` with t of size 1).

Claimed spellings equal eager in float64 (outputs, input and parameter gradients) at T = 1, 7, 33
with K != V, static and dynamic=True; look-alikes that differ (the query axis contracted, the
mask on the wrong axes, several tokens summed) stay unclaimed and equal eager too.
"""

from __future__ import annotations

import pytest
import torch
from test_detect import regions
from test_detect_spellings import assert_matches_eager
from torch import nn

B, H, K, V = 2, 3, 5, 7
LOG_GAMMA = (-0.7, -0.1, -0.01)


def _bthd(t, seed=0):
    """q, k [B, T, H, K] and v [B, T, H, V] (float64)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, t, H, K), (B, t, H, K), (B, t, H, V)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]


class PermutedScores(nn.Module):
    """Scores kept in the [B, T, H, D] layout by the einsums; the mask [H, T, T] (a learnable
    log-decay) permuted to match. ``spelling``:

    - "bqhk": scores [B, Tq, H, Tk], mask.permute(1, 0, 2);
    - "bqhk_kq": the same with the score einsum's operands in the order k, q;
    - "bhkq": scores [B, H, Tk, Tq] (the transpose), mask.mT;
    - "keys_contracted" (decoy): scores [B, Tq, H, Tk] but the value einsum contracts the query
      axis, A^T V (anti-causal);
    - "mask_axes_swapped" (decoy): mask.permute(2, 0, 1), the transposed mask on [B, Tq, H, Tk];
    - "mask_built_permuted": the right mask built as [T, H, T] directly (not a permute): its
      dims are not in the scores' order, so it is declined;
    - "normalised": "bqhk" divided by its detached row sum of |A| (over the keys, dim -1);
    - "column_normalised" (decoy): "bhkq" divided by its sum over dim -1, the queries.
    """

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.log_gamma = nn.Parameter(torch.tensor(LOG_GAMMA, dtype=torch.float64))

    def mask(self, t: int) -> torch.Tensor:
        i = torch.arange(t, dtype=torch.float64)
        d = i[:, None] - i[None, :]
        return torch.exp(self.log_gamma[:, None, None] * d.clamp(min=0)) * (d >= 0)

    def forward(self, q, k, v):
        t, kind = q.shape[1], self.spelling
        if kind in ("bhkq", "column_normalised"):
            a = torch.einsum("bqhd,bkhd->bhkq", q, k) * self.mask(t).mT
            a = _normalised(a) if kind == "column_normalised" else a
            return torch.einsum("bhkq,bkhv->bqhv", a, v)
        if kind == "bqhk_kq":
            a = torch.einsum("bkhd,bqhd->bqhk", k, q) * self.mask(t).permute(1, 0, 2)
            return torch.einsum("bqhk,bkhv->bqhv", a, v)
        if kind == "mask_built_permuted":
            i = torch.arange(t, dtype=torch.float64)
            d = (i[:, None, None] - i[None, None, :]).expand(t, H, t)
            mask = torch.exp(self.log_gamma[None, :, None] * d.clamp(min=0)) * (d >= 0)
            return torch.einsum("bqhk,bkhv->bqhv", torch.einsum("bqhd,bkhd->bqhk", q, k) * mask, v)
        perm = (2, 0, 1) if kind == "mask_axes_swapped" else (1, 0, 2)
        a = torch.einsum("bqhd,bkhd->bqhk", q, k) * self.mask(t).permute(*perm)
        if kind == "keys_contracted":
            return torch.einsum("bqhk,bqhv->bkhv", a, v)
        a = _normalised(a) if kind == "normalised" else a
        return torch.einsum("bqhk,bkhv->bqhv", a, v)


def _normalised(a: torch.Tensor) -> torch.Tensor:
    return a / a.detach().abs().sum(-1, keepdim=True).clamp(min=1)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize(
    "spelling, claimed",
    [
        ("bqhk", True),
        ("bqhk_kq", True),
        ("bhkq", True),
        ("keys_contracted", False),
        ("mask_axes_swapped", False),
        ("mask_built_permuted", False),
        ("normalised", True),
        ("column_normalised", False),
    ],
)
def test_scores_laid_out_by_the_einsum(inductor_graphs, spelling, claimed, dynamic):
    model = PermutedScores(spelling)
    lengths = [_bthd(1, seed=1), _bthd(7, seed=2)]
    assert_matches_eager(
        inductor_graphs, model, _bthd(33), claimed, dynamic=dynamic, lengths=lengths
    )


def test_permuted_scores_region():
    """The region reads gamma from the unpermuted mask; a declined decoy names its reason."""
    (region,) = regions(PermutedScores("bqhk"), *_bthd(7), dynamic=True)
    assert region.claimed and region.heads == H and (region.k_dim, region.v_dim) == (K, V)
    assert region.decay == pytest.approx([torch.tensor(g).exp().item() for g in LOG_GAMMA])
    (region,) = regions(PermutedScores("mask_built_permuted"), *_bthd(7), dynamic=True)
    assert not region.claimed and "order of the scores" in region.reason
    (region,) = regions(PermutedScores("column_normalised"), *_bthd(7), dynamic=True)
    assert not region.claimed and "key axis not last" in region.reason
    found = regions(PermutedScores("mask_axes_swapped"), *_bthd(7), dynamic=True)
    assert found and not any(r.claimed for r in found)


# ---- the one-token recurrent step in einsum, the token axis kept ----------------------------


def _token(t=1, seed=0, vk=False):
    """q, k [B, H, t, K], v [B, H, t, V] and a state [B, H, K, V] ([B, H, V, K] with ``vk``)."""
    gen = torch.Generator().manual_seed(seed)
    state = (B, H, V, K) if vk else (B, H, K, V)
    shapes = [(B, H, t, K), (B, H, t, K), (B, H, t, V), state]
    return [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]


class EinsumStep(nn.Module):
    """``S' = g S + einsum('bhtk,bhtv->bhkv', k, v)``; the read-out ``spelling``:

    - "einsum": einsum('bhtk,bhkv->bhtv', q, S');
    - "matmul": q @ S';
    - "permuted_out": einsum('bhtk,bhkv->bthv', q, S') (the output [B, 1, H, V]);
    - "vk": the state laid out (V, K): einsum('bhtv,bhtk->bhvk', v, k), einsum('bhtk,bhvk->bhtv').
    """

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("gamma", torch.tensor(LOG_GAMMA, dtype=torch.float64).exp())

    def forward(self, q, k, v, s):
        g = self.gamma[:, None, None]
        if self.spelling == "vk":
            s = g * s + torch.einsum("bhtv,bhtk->bhvk", v, k)
            return torch.einsum("bhtk,bhvk->bhtv", q, s), s
        s = g * s + torch.einsum("bhtk,bhtv->bhkv", k, v)
        if self.spelling == "matmul":
            return q @ s, s
        out = "bthv" if self.spelling == "permuted_out" else "bhtv"
        return torch.einsum(f"bhtk,bhkv->{out}", q, s), s


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("spelling", ["einsum", "matmul", "permuted_out", "vk"])
def test_einsum_step_keeping_the_token_axis(inductor_graphs, spelling, dynamic):
    model = EinsumStep(spelling)
    vk = spelling == "vk"
    lengths = [_token(seed=1, vk=vk)]
    assert_matches_eager(
        inductor_graphs, model, _token(vk=vk), True, dynamic=dynamic, lengths=lengths
    )


@pytest.mark.parametrize("spelling", ["einsum", "matmul"])
def test_einsum_step_called_with_several_tokens_is_not_claimed(inductor_graphs, spelling):
    """With t = 3 the update sums three outer products: no one-token recurrence."""
    model = EinsumStep(spelling)
    assert_matches_eager(inductor_graphs, model, _token(t=3), False, dynamic=False)
    assert not any(r.claimed for r in regions(model, *_token(t=3), dynamic=False))
