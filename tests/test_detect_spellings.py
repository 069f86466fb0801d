"""Spellings that detection must read exactly: claimed ones equal eager in float64 (outputs and
the gradients of inputs and parameters), declined ones are not rewritten.

Each case is a regression: factored decay masks (``g**i[:, :, None] * g**-j[:, None, :]``), a
per-(head, row) factor, torchscale/syncdoth row normalisation with a sum-of-|A| normaliser, a
clamp with a positional maximum, a rounding division, ``baddbmm(beta=0)`` scores, scores written
``(K Q^T)^T``, a recurrent step with a Python-number decay (and ``add(.., alpha=)``), and the
heads shown for a 0-dim state decay.
"""

from __future__ import annotations

import pytest
import torch
from test_detect import regions
from torch import nn

from rtpcompile.rewrite import rtp_retention

B, H, T, K, V = 2, 3, 9, 5, 7
GAMMA = (0.75, 0.875, 0.9375)


def _qkv(t=T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, H, t, K), (B, H, t, K), (B, H, t, V)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]


def _token(seed=0):
    """One decode step: q, k [B, H, 1, K], v [B, H, 1, V] and a state [B, H, K, V]."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, H, 1, K), (B, H, 1, K), (B, H, 1, V), (B, H, K, V)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]


def _forward_backward(fn, model, inputs):
    """Outputs and the gradients of a fixed random projection of them (inputs, parameters)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, leaves + params)
    return [o.detach() for o in outputs], list(grads)


def _ops(seen) -> int:
    return sum(n.target is rtp_retention for gm in seen for n in gm.graph.nodes)


def assert_matches_eager(inductor_graphs, model, inputs, claimed, dynamic=False, lengths=()):
    """Compiled (rtp, Inductor stubbed) equals eager at each input set; ``claimed``: whether the
    graph holds an rtp op (the region was claimed) or none (declined)."""
    compiled = torch.compile(model, backend="rtp", dynamic=dynamic, fullgraph=True)
    for x in [inputs, *lengths]:
        got, got_grads = _forward_backward(compiled, model, x)
        want, want_grads = _forward_backward(model, model, x)
        for g, w in zip(got + got_grads, want + want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    assert (_ops(inductor_graphs) > 0) == claimed, (
        f"claimed={claimed} expected, ops={_ops(inductor_graphs)}"
    )


def _decay_mask(gamma: torch.Tensor, t: int) -> torch.Tensor:
    i = torch.arange(t)
    d = i[:, None] - i[None, :]
    return torch.where(d >= 0, gamma[:, None, None] ** d.clamp(min=0), 0.0)


# ---- wrong results before: mask factors that broadcast along a row or a column --------------


class FactoredMask(nn.Module):
    """gamma^i [H, T, 1] * gamma^-j [H, 1, T] * tril(ones), inline or multiplied first; the
    log-decay is a parameter."""

    def __init__(self, combined: bool):
        super().__init__()
        self.combined = combined
        self.log_gamma = nn.Parameter(torch.tensor(GAMMA, dtype=torch.float64).log())

    def forward(self, q, k, v):
        t = torch.arange(q.shape[2], dtype=q.dtype)
        lg = self.log_gamma[:, None]
        rows, cols = torch.exp(lg * t)[:, :, None], torch.exp(-lg * t)[:, None, :]
        causal = torch.ones(q.shape[2], q.shape[2], dtype=q.dtype).tril()
        if self.combined:
            return (q @ k.mT * (rows * cols * causal)) @ v
        return (q @ k.mT * rows * cols * causal) @ v


@pytest.mark.parametrize("combined", [False, True])
def test_factored_decay_mask(inductor_graphs, combined):
    """Static T: claimed, the factors inline or multiplied first."""
    assert_matches_eager(inductor_graphs, FactoredMask(combined), _qkv(), True)


def test_factored_decay_mask_at_dynamic_t_is_declined(inductor_graphs):
    """gamma^-j [H, 1, T] overflows at T ~ 2468 (float64, gamma = 0.75): eager's mask is then
    inf * 0 = NaN, so no proof holds for every T (mask_proof: a value growing with T that
    overflows); declined, and the results equal eager at each length."""
    lengths = [_qkv(5, seed=1), _qkv(12, seed=2)]
    model = FactoredMask(True)
    assert_matches_eager(inductor_graphs, model, _qkv(), False, dynamic=True, lengths=lengths)


class RowFactor(nn.Module):
    """The decay times a per-(head, query-row) factor p [H, T, 1] (a row scale)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        gen = torch.Generator().manual_seed(3)
        p = torch.rand(H, T, 1, generator=gen, dtype=torch.float64) + 0.5
        self.register_buffer("gamma", torch.tensor(GAMMA, dtype=torch.float64))
        if kind == "buffer":
            self.register_buffer("p", p)
        else:
            self.p = nn.Parameter(p)

    def forward(self, q, k, v):
        mask = _decay_mask(self.gamma, q.shape[2])
        if self.kind == "premultiplied":
            return (q @ k.mT * (mask * self.p)) @ v
        return (q @ k.mT * mask * self.p) @ v


@pytest.mark.parametrize("kind", ["buffer", "parameter", "premultiplied"])
def test_per_head_row_factor(inductor_graphs, kind):
    assert_matches_eager(inductor_graphs, RowFactor(kind), _qkv(), True)


class RowNormalised(nn.Module):
    """syncdoth/RetNet style: decay rows divided by sqrt(row sum), scores by a detached
    normaliser (sum of |A| or |sum A|, clamped at 1); the decay logit is a parameter."""

    def __init__(self, normaliser: str):
        super().__init__()
        self.normaliser = normaliser
        self.logit = nn.Parameter(torch.logit(torch.tensor(GAMMA, dtype=torch.float64)))

    def forward(self, q, k, v):
        i = torch.arange(q.shape[2]).to(q)
        e = i[:, None] - i[None, :]
        log_gamma = nn.functional.logsigmoid(self.logit)[:, None, None]
        m = torch.exp(e.clamp(min=0) * log_gamma) * (e >= 0)
        m = m / m.sum(-1, keepdim=True).sqrt()
        a = q @ k.transpose(-1, -2) * m
        if self.normaliser == "sum_abs":
            a = a / a.detach().abs().sum(-1, keepdim=True).clamp(min=1)
        else:
            a = a / a.detach().sum(-1, keepdim=True).abs().clamp(min=1)
        return a @ v


@pytest.mark.parametrize("normaliser", ["sum_abs", "abs_sum"])
def test_row_normalised_decay_with_normaliser(inductor_graphs, normaliser):
    assert_matches_eager(inductor_graphs, RowNormalised(normaliser), _qkv(), True)


# ---- wrong results before: steps that are not what they look like ---------------------------


class Clamped(nn.Module):
    """A torchscale normaliser whose clamp is written several ways."""

    def __init__(self, clamp):
        super().__init__()
        self.clamp = clamp
        self.register_buffer("gamma", torch.tensor(GAMMA, dtype=torch.float64))

    def forward(self, q, k, v):
        a = q @ k.mT * _decay_mask(self.gamma, q.shape[2])
        return (a / self.clamp(a.detach().sum(-1, keepdim=True).abs())) @ v


@pytest.mark.parametrize(
    "name, clamp, claimed",
    [
        ("positional max", lambda s: s.clamp(1, 3), False),
        ("keyword max", lambda s: torch.clamp(s, min=1, max=3), False),
        ("positional min", lambda s: s.clamp(1), True),
        ("clamp_min", lambda s: s.clamp_min(2), True),
    ],
)
def test_normaliser_clamp_with_a_maximum_is_declined(inductor_graphs, name, clamp, claimed):
    assert_matches_eager(inductor_graphs, Clamped(clamp), _qkv(), claimed)


class Divided(nn.Module):
    """Scores divided by 2 with a rounding mode (not a scale) or without (a scale)."""

    def __init__(self, rounding_mode):
        super().__init__()
        self.rounding_mode = rounding_mode
        self.register_buffer("gamma", torch.tensor(GAMMA, dtype=torch.float64))

    def forward(self, q, k, v):
        s = torch.div(q @ k.mT, 2, rounding_mode=self.rounding_mode)
        return (s * _decay_mask(self.gamma, q.shape[2])) @ v


@pytest.mark.parametrize("mode, claimed", [("floor", False), ("trunc", False), (None, True)])
def test_rounding_division_is_not_a_scale(inductor_graphs, mode, claimed):
    assert_matches_eager(inductor_graphs, Divided(mode), _qkv(), claimed)


# ---- false declines before: score products written other ways -------------------------------


class Baddbmm(nn.Module):
    """HF-style ``baddbmm(empty, q, k^T, beta=0, alpha=scale)`` on [B*H, T, D] (beta=1 with a
    non-zero input is an additive bias: not retention)."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta
        self.register_buffer("gamma", torch.tensor(GAMMA, dtype=torch.float64))

    def forward(self, q, k, v):
        b, h, t, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, t, -1) for x in (q, k, v))
        mask = _decay_mask(self.gamma, t).repeat(b, 1, 1)
        base = torch.full((b * h, t, t), 0.5, dtype=q.dtype)
        scores = torch.baddbmm(base, q3, k3.transpose(1, 2), beta=self.beta, alpha=d**-0.5)
        return torch.bmm(scores * mask, v3).view(b, h, t, -1)


@pytest.mark.parametrize("beta, claimed", [(0.0, True), (1.0, False)])
def test_baddbmm_scores(inductor_graphs, beta, claimed):
    assert_matches_eager(inductor_graphs, Baddbmm(beta), _qkv(), claimed)


class Transposed(nn.Module):
    """Scores written ``(k @ q^T)^T``; ``weights`` also returns the K Q^T product."""

    def __init__(self, weights: bool = False):
        super().__init__()
        self.weights = weights
        self.register_buffer("gamma", torch.tensor(GAMMA, dtype=torch.float64))

    def forward(self, q, k, v):
        kq = k @ q.transpose(-1, -2)
        o = (kq.mT * _decay_mask(self.gamma, q.shape[2])) @ v * K**-0.5
        return (o, kq) if self.weights else o


@pytest.mark.parametrize("weights, claimed", [(False, True), (True, False)])
def test_transposed_score_product(inductor_graphs, weights, claimed):
    assert_matches_eager(inductor_graphs, Transposed(weights), _qkv(), claimed)


# ---- the recurrent step ---------------------------------------------------------------------


class Step(nn.Module):
    """``S' = a * S + k^T v ; o = q S'`` with ``a`` a Python number or a 0-dim buffer."""

    def __init__(self, decay, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha
        if isinstance(decay, (int, float)):
            self.decay = decay
        else:
            self.register_buffer("decay", decay)

    def forward(self, q, k, v, s):
        s = torch.add(self.decay * s, k.mT @ v, alpha=self.alpha)
        return q @ s, s


@pytest.mark.parametrize(
    "decay, alpha, claimed",
    [(0.9, 1.0, True), (1, 1.0, True), (1.5, 1.0, False), (0.9, 2.0, False), ("0-dim", 2.0, False)],
)
def test_recurrent_step_with_a_python_number_decay(inductor_graphs, decay, alpha, claimed):
    if decay == "0-dim":  # NOTE: claimed with alpha=1 (below): add(.., alpha=2) is not the update
        decay = torch.tensor(0.9, dtype=torch.float64)
    assert_matches_eager(inductor_graphs, Step(decay, alpha), _token(), claimed)


def test_recurrent_zero_dim_decay_shows_every_head(inductor_graphs):
    model = Step(torch.tensor(0.8, dtype=torch.float64))
    (region,) = regions(model, *_token(), dynamic=False)
    assert region.claimed and region.heads == H and region.decay == (pytest.approx(0.8),)
    assert_matches_eager(inductor_graphs, model, _token(1), True)


# ---- claims missed before: einsum with an ellipsis ------------------------------------------


class EllipsisEinsum(nn.Module):
    """Scores and values as ``einsum('...qd,...kd->...qk')`` (or with the ellipsis inside,
    ``b...qd``); ``broadcast`` gives k a batch of 1, which the ellipsis broadcasts."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("gamma", torch.tensor(GAMMA, dtype=torch.float64))

    def forward(self, q, k, v):
        mask = _decay_mask(self.gamma, q.shape[2])
        if self.spelling == "inside":
            scores = torch.einsum("b...qd,b...kd->b...qk", q, k) * mask
            return torch.einsum("b...qk,b...kd->b...qd", scores, v)
        k = k[:1] if self.spelling == "broadcast" else k
        q = q[0, 0] if self.spelling == "ranks" else q  # NOTE: an empty ellipsis beside B, H
        scores = torch.einsum("...qd,...kd->...qk", q, k) * mask
        return torch.einsum("...qk,...kd->...qd", scores, v)


@pytest.mark.parametrize(
    "spelling, claimed",
    [("leading", True), ("inside", True), ("broadcast", False), ("ranks", False)],
)
def test_einsum_with_an_ellipsis(inductor_graphs, spelling, claimed):
    """The ellipsis is spelt out in letters of its own when every operand's ellipsis has the
    same sizes (claimed, exact); a broadcast one (k's batch of 1, a 2-D q's empty ellipsis
    beside k's [B, H]) is left to Inductor."""
    model = EllipsisEinsum(spelling)
    lengths = [_qkv(6, seed=3)] if claimed else []
    dynamic = spelling == "leading"
    assert_matches_eager(inductor_graphs, model, _qkv(), claimed, dynamic=dynamic, lengths=lengths)
