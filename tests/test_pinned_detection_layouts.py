"""Detection and rewrite behaviours a second mutation pass found unpinned: an einsum output laid
out by a 3-cycle permutation, a recurrent state laid out [.., V, K] and read by a broadcast
product or an einsum, a chunk step whose literal score and cross scales differ, and an op call
that asks for no final state; each checked against an exact verdict or a float64 eager run."""

from __future__ import annotations

import pytest
import torch
from test_pinned_detection import _rewritten, _toeplitz
from torch import nn

import rtpcompile

B, H, T, K, V = 2, 2, 5, 4, 3


def _decay(gamma, t: int = T) -> torch.Tensor:
    """[len(gamma), t, t] float64 causal decay gamma ** (i - j) [i >= j]."""
    return _toeplitz(gamma, t)


def _qkv(b: int = B, h: int = H, t: int = T, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, K, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, torch.randn(b, h, t, V, generator=gen, dtype=torch.float64)


def _close(got, want):
    got, want = (x if isinstance(x, tuple) else (x,) for x in (got, want))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


class _Fn(nn.Module):
    def __init__(self, fn, mask: torch.Tensor | None = None):
        super().__init__()
        self.fn = fn
        if mask is not None:
            self.register_buffer("mask", mask)

    def forward(self, *args):
        return self.fn(self, *args)


# --- einsum layouts ------------------------------------------------------------------------------


def test_a_value_einsum_writing_a_rotated_layout_equals_eager():
    """An output ``tbhv`` (a 3-cycle of the canonical [B, H, T, V], not its own inverse) is
    claimed and permuted the right way round."""
    mask = _decay([0.9, 0.6])

    def fn(s, q, k, v):
        scores = torch.einsum("bhtd,bhsd->bhts", q, k) * s.mask
        return torch.einsum("bhts,bhsv->tbhv", scores, v)

    model, inputs = _Fn(fn, mask), _qkv(b=3, h=H, t=T)
    out, (region,) = _rewritten(model, *inputs)
    assert region.claimed and region.out_perm == (2, 0, 1, 3)
    _close(out, model(*inputs))


# --- recurrent steps ----------------------------------------------------------------------------


def _step_inputs():
    """One squeezed token per head ([1, H, D]) and a [1, H, V, K] state, float64."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, H, V, generator=gen, dtype=torch.float64)
    return q, k, v, torch.randn(1, H, V, K, generator=gen, dtype=torch.float64)


class _SqueezedVKStep(nn.Module):
    """One token, squeezed ([B, H, D]), with the state laid out [B, H, V, K]."""

    def __init__(self, einsum: bool):
        super().__init__()
        self.register_buffer("decay", torch.tensor([0.9, 0.5], dtype=torch.float64)[:, None, None])
        self.einsum = einsum

    def forward(self, q, k, v, state):
        if self.einsum:
            new = self.decay * state + torch.einsum("bhv,bhk->bhvk", v, k)
            return torch.einsum("bhk,bhvk->bhv", q, new), new
        new = self.decay * state + v.unsqueeze(-1) * k.unsqueeze(-2)
        return (q.unsqueeze(-2) * new).sum(-1), new


@pytest.mark.parametrize("einsum", [False, True], ids=["broadcast", "einsum"])
def test_a_step_reading_a_value_by_key_state_equals_eager(einsum):
    """A [.., V, K] state read out over its last dim is claimed as such (K != V here)."""
    inputs = _step_inputs()
    model = _SqueezedVKStep(einsum)
    out, (region,) = _rewritten(model, *inputs)
    assert region.claimed and region.state_vk and (region.k_dim, region.v_dim) == (K, V)
    _close(out, model(*inputs))


class _LiteralScaledChunk(nn.Module):
    """One chunk (parallel term + cross term + state update) with the scores scaled by the
    literal 0.25 and the cross term by the literal 0.25, or 0.5 when ``halved``."""

    def __init__(self, halved: bool):
        super().__init__()
        self.register_buffer("gamma", torch.tensor([0.9, 0.6], dtype=torch.float64))
        self.halved = halved

    def forward(self, q, k, v, state):
        C = q.shape[2]
        log_g = torch.log(self.gamma)[:, None]
        idx = torch.arange(C)
        diff = idx[:, None] - idx[None, :]
        inner = torch.exp(log_g[..., None] * diff.clamp(min=0)) * (diff >= 0)
        cross = (q * torch.exp(log_g * (idx + 1))[..., None]) @ state
        cross = cross * 0.5 if self.halved else cross * 0.25
        o = ((q @ k.transpose(-1, -2)) * 0.25 * inner) @ v + cross
        k_decay = torch.exp(log_g * (C - 1 - idx))[..., None]
        new_state = torch.exp(log_g * C)[..., None] * state + (k * k_decay).transpose(-1, -2) @ v
        return o, new_state


def test_a_chunk_step_merges_only_when_its_literal_scales_agree():
    """Scores times 0.25 and a cross term times 0.5 (literals) stay a parallel region."""
    q, k, v = _qkv()
    state = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(1)).double()
    for halved, written in ((False, "chunk step"), (True, "parallel")):
        model = _LiteralScaledChunk(halved)
        out, regions = _rewritten(model, q, k, v, state)
        assert [r.written for r in regions if r.claimed] == [written]
        _close(out, model(q, k, v, state))


# --- rtp op calls already in the graph ----------------------------------------------------------


class _OpCallNoFinalState(nn.Module):
    """A direct op call that asks for no final state but still returns both results."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", torch.tensor([0.9, 0.75]))

    def forward(self, q, k, v, s):
        o, final = torch.ops.rtp.retention_fwd(
            q, k, v, self.gamma, 1.0, s, "chunkwise", 0, output_final_state=False
        )
        return o, final


def test_an_op_call_asking_for_no_final_state_has_no_state_output():
    """``output_final_state=False``: the call's second result (empty) is no state output."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, H, T, K, generator=gen) for _ in range(2))
    v, s = torch.randn(1, H, T, V, generator=gen), torch.randn(1, H, K, V, generator=gen)
    report = rtpcompile.explain(_OpCallNoFinalState(), q, k, v, s)
    (region,) = report.claimed
    assert region.native and region.state is not None and region.state_output is None
