"""Detection unit tests: canonical spellings, the decay-mask proof, normalisers, declines.

These run Dynamo with a collecting backend only (nothing is compiled), so they are fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rtpcompile.detect import counters, find_regions
from rtpcompile.detect.mask_proof import fit_decay

B, H, T, K, V = 2, 3, 11, 8, 12


def gamma_of(h: int = H) -> torch.Tensor:
    return 1.0 - 2.0 ** (-2.0 - torch.arange(h, dtype=torch.float32))


def causal(gamma: torch.Tensor, t: int) -> torch.Tensor:
    idx = torch.arange(t)
    diff = idx[:, None] - idx[None, :]
    return torch.where(diff >= 0, gamma[:, None, None] ** diff.clamp(min=0), 0.0)


class Fn(nn.Module):
    """A module whose forward is the given function of (self, *inputs)."""

    def __init__(self, fn, heads: int = H):
        super().__init__()
        self.fn = fn
        self.register_buffer("gamma", gamma_of(heads))
        self.scale = K**-0.5

    def forward(self, *inputs):
        return self.fn(self, *inputs)


def qkv(t: int = T, layout: str = "bhtd"):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, t, K, generator=gen) for _ in range(2))
    v = torch.randn(B, H, t, V, generator=gen)
    if layout == "bthd":
        return tuple(x.transpose(1, 2).contiguous() for x in (q, k, v))
    return q, k, v


def regions(model, *inputs, dynamic=True, fullgraph=True):
    """Every region ``find_regions`` reports for the graphs of ``model(*inputs)``."""
    found = []

    def collect(gm, example_inputs, **_):
        found.extend(find_regions(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=collect, dynamic=dynamic, fullgraph=fullgraph)(*inputs)
    return found


def _decay(s, t):
    return causal(s.gamma, t)


SPELLINGS = {
    "matmul_scale_after": lambda s, q, k, v: (q @ k.transpose(-1, -2) * s.scale * _decay(s, T)) @ v,
    "scale_on_q_torch_matmul": lambda s, q, k, v: torch.matmul(
        torch.matmul(q * s.scale, k.transpose(2, 3)) * _decay(s, T), v
    ),
    "mT_commuted_mask": lambda s, q, k, v: (_decay(s, T) * q.matmul(k.mT)).matmul(v),
    "einsum2": lambda s, q, k, v: torch.einsum(
        "bhts,bhsd->bhtd", torch.einsum("bhtd,bhsd->bhts", q, k) * _decay(s, T), v
    ),
    "einsum3": lambda s, q, k, v: torch.einsum(
        "bhts,hts,bhsv->bhtv", torch.einsum("bhtk,bhsk->bhts", q, k), _decay(s, T), v
    ),
    "casts": lambda s, q, k, v: (
        (q.float() @ k.to(torch.float32).transpose(-1, -2)) * _decay(s, T).type_as(q) @ v.float()
    ).to(v.dtype),
    "bmm_per_head_3d": lambda s, q, k, v: torch.bmm(
        torch.tril(s.gamma[0] ** (torch.arange(T)[:, None] - torch.arange(T)[None, :]))
        * torch.bmm(q[:, 0], k[:, 0].transpose(1, 2)),
        v[:, 0],
    ),
    "scores_tril": lambda s, q, k, v: (q @ k.mT).tril() @ v,
    "masked_fill_bool": lambda s, q, k, v: (
        (q @ k.mT).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), 0.0) @ v
    ),
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_parallel_spellings_are_claimed(name):
    found = regions(Fn(SPELLINGS[name]), *qkv())
    assert [r.reason for r in found] == [None], found
    assert found[0].written == "parallel"
    assert found[0].k_dim == K and found[0].v_dim == V


def test_bthd_layout_with_permute_is_claimed():
    def fn(s, q, k, v):
        out = (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) * _decay(s, T)) @ v.transpose(1, 2)
        return out.transpose(1, 2)

    (region,) = regions(Fn(fn), *qkv(layout="bthd"))
    assert region.claimed
    assert region.q.perm == (0, 2, 1, 3) and region.k.perm == (0, 2, 1, 3)


def test_fused_projection_slices_are_claimed():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 2 * H * K + H * V)
            self.register_buffer("gamma", gamma_of())

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).split([H * K, H * K, H * V], dim=-1)
            q, k = (y.view(b, t, H, K).transpose(1, 2) for y in (q, k))
            v = v.view(b, t, H, V).transpose(1, 2)
            return ((q @ k.mT) * causal(self.gamma, t)) @ v

    (region,) = regions(Fused(), torch.randn(B, T, 16))
    assert region.claimed and region.heads == H
    assert region.decay == pytest.approx(gamma_of().tolist(), rel=1e-5)


def test_static_shapes_are_claimed():
    (region,) = regions(Fn(SPELLINGS["matmul_scale_after"]), *qkv(), dynamic=False)
    assert region.claimed and region.seq_len == T


def test_torchscale_normaliser_and_row_scale():
    def fn(s, q, k, v):
        mask = _decay(s, T)
        mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()
        a = q @ k.transpose(-1, -2) * mask
        a = a / a.detach().sum(dim=-1, keepdim=True).abs().clamp(min=1)
        return torch.matmul(a, v)

    (region,) = regions(Fn(fn), *qkv())
    assert region.claimed and region.normaliser == "abs_sum" and region.row_scale


def test_sum_of_abs_normaliser_is_claimed_as_such():
    def fn(s, q, k, v):
        a = q @ k.transpose(-1, -2) * _decay(s, T)
        return a / a.detach().abs().sum(dim=-1, keepdim=True).clamp(min=1) @ v

    (region,) = regions(Fn(fn), *qkv())
    assert region.claimed and region.normaliser == "sum_abs"


DECLINES = {
    "activation mask": (
        lambda s, q, k, v, pad: (q @ k.mT * _decay(s, T) * pad[:, None, None, :]) @ v,
        "depends on activations",
    ),
    "undetached normaliser": (
        lambda s, q, k, v, pad: (lambda a: a / a.sum(-1, keepdim=True).abs().clamp(min=1) @ v)(
            q @ k.mT * _decay(s, T)
        ),
        "not detached",
    ),
    "softplus on scores": (
        lambda s, q, k, v, pad: F.softplus(q @ k.mT * _decay(s, T)) @ v,
        "softplus",
    ),
    "returned weights": (
        lambda s, q, k, v, pad: (lambda a: (a @ v, a))(q @ k.mT * _decay(s, T)),
        "used elsewhere",
    ),
    "bidirectional": (
        lambda s, q, k, v, pad: (q @ k.mT * (s.gamma[:, None, None] ** _absdiff())) @ v,
        "not causal",
    ),
    "random mask": (
        lambda s, q, k, v, pad: (q @ k.mT * torch.rand(T, T).tril()) @ v,
        "random",
    ),
    "growing decay": (
        lambda s, q, k, v, pad: (q @ k.mT * causal(1.0 / s.gamma, T)) @ v,
        "outside [0, 1]",
    ),
    "diagonal offset": (
        lambda s, q, k, v, pad: (q @ k.mT).tril(-1) @ v,
        "diagonal=-1",
    ),
    "integer scores": (  # NOTE: a cast to integers truncates: not one the patterns look through
        lambda s, q, k, v, pad: ((q @ k.mT * 3).to(torch.int64) * _decay(s, T)) @ v,
        "no single score product",
    ),
}


def _absdiff():
    idx = torch.arange(T)
    return (idx[:, None] - idx[None, :]).abs()


@pytest.mark.parametrize("name", sorted(DECLINES))
def test_look_alikes_are_declined_with_a_reason(name):
    fn, reason = DECLINES[name]
    pad = torch.ones(B, T)
    found = regions(Fn(fn), *qkv(), pad)
    assert found and not any(r.claimed for r in found), found
    assert reason in found[0].reason


def _write_q_after_scores(s, q, k, v):
    q = q * 1.0
    scores = q.transpose(-1, -2).transpose(-1, -2) @ k.mT  # read through a view of q
    q.mul_(2.0)
    return (scores * _decay(s, T)) @ v


def _write_q_after_output(s, q, k, v):
    q = q * 1.0
    out = (q @ k.mT * _decay(s, T)) @ v
    q.mul_(2.0)
    return out + q.sum()


def test_an_operand_written_in_place_inside_the_region_is_declined():
    """The op runs where the region's output was: a write to q between the first read and the
    output would change what it reads; a write after the output does not."""
    (region,) = regions(Fn(_write_q_after_scores), *qkv())
    assert not region.claimed and "q is written in place (mul_)" in region.reason
    (region,) = regions(Fn(_write_q_after_output), *qkv())
    assert region.claimed
    for fn in (_write_q_after_scores, _write_q_after_output):
        model, x = Fn(fn), qkv()
        torch._dynamo.reset()
        got = torch.compile(model, backend="rtp")(*(t.clone() for t in x))
        torch.testing.assert_close(got, model(*(t.clone() for t in x)))


class Temperature(nn.Module):
    """A learnable per-head temperature inside the mask: 1 at compile time, then trained."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", gamma_of())
        self.temp = nn.Parameter(torch.ones(H, 1, 1))

    def forward(self, q, k, v):
        return (q @ k.mT * (self.temp * causal(self.gamma, q.shape[-2]))) @ v


class DistanceTable(nn.Module):
    """A learnable per-distance table gathered into the mask, initialised to gamma**n: a decay
    only while its entries keep that structure."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(gamma_of()[:, None] ** torch.arange(16.0))

    def forward(self, q, k, v):
        idx = torch.arange(q.shape[-2])
        diff = idx[:, None] - idx[None, :]
        mask = self.table[:, diff.clamp(min=0)] * (diff >= 0)
        return (q @ k.mT * mask) @ v


def test_a_trainable_parameter_in_the_mask_must_keep_the_structure():
    (region,) = regions(DistanceTable(), *qkv())
    assert not region.claimed and "once the trainable" in region.reason
    (region,) = regions(Temperature(), *qkv())
    assert region.claimed and region.row_scale  # the temperature is the mask's diagonal


def test_a_trained_temperature_stays_equal_to_eager():
    model = Temperature().double()
    x = [t.double().requires_grad_() for t in qkv()]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="rtp")
    for temp in ([1.0, 1.0, 1.0], [0.5, 2.0, 3.0]):
        with torch.no_grad():
            model.temp.copy_(torch.tensor(temp, dtype=torch.float64)[:, None, None])
        got, want = compiled(*x), model(*x)
        torch.testing.assert_close(got, want)
        leaves = (*x, model.temp)
        for a, b in zip(
            torch.autograd.grad(got.sum(), leaves),
            torch.autograd.grad(want.sum(), leaves),
            strict=True,
        ):
            torch.testing.assert_close(a, b)


def test_a_mask_held_by_a_call_argument_is_an_activation():
    class Batch:
        def __init__(self, mask):
            self.mask = mask

    def fn(s, q, k, v, batch):
        return (q @ k.mT * batch.mask) @ v

    (region,) = regions(Fn(fn), *qkv(), Batch(causal(gamma_of(), T)))
    assert not region.claimed and "depends on activations" in region.reason


def test_a_decay_just_above_one_is_declined():
    def fn(s, q, k, v):
        return (q @ k.mT * causal(torch.tensor([0.9, 1.000005, 0.99]), T)) @ v

    (region,) = regions(Fn(fn), *qkv())
    assert not region.claimed and "outside [0, 1]" in region.reason


def _window(s, q, k, v):
    """The decay cut off past distance 12: retention at T <= 12, not beyond."""
    t = q.shape[-2]
    idx = torch.arange(t)
    diff = idx[:, None] - idx[None, :]
    keep = (diff >= 0) & (diff < 12)
    return (q @ k.mT * torch.where(keep, s.gamma[:, None, None] ** diff.clamp(min=0), 0.0)) @ v


def _triu_complement(s, q, k, v):
    t = q.shape[-2]
    above = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    return (q @ k.mT).masked_fill(above, 0.0) @ v


def test_a_window_is_declined_for_a_dynamic_length_and_proven_for_a_static_one():
    """The proof evaluates a few lengths: with a symbolic T a cut-off past them would escape, so a
    mask comparing positions with a constant is declined; at a static T it is proven there."""
    (region,) = regions(Fn(_window), *qkv(t=10))
    assert not region.claimed and "compares positions with 12" in region.reason
    (region,) = regions(Fn(_window), *qkv(t=10), dynamic=False)
    assert region.claimed
    (region,) = regions(Fn(_window), *qkv(t=20), dynamic=False)
    assert not region.claimed
    (region,) = regions(Fn(_triu_complement), *qkv(t=10))  # triu(diagonal=1) is causal
    assert region.claimed


class WindowBuffer(nn.Module):
    """A decay cut off at distance 12, precomputed for 24 positions and sliced to T."""

    def __init__(self):
        super().__init__()
        idx = torch.arange(24)
        diff = idx[:, None] - idx[None, :]
        window = (diff >= 0) & (diff < 12)
        self.register_buffer("mask", gamma_of()[:, None, None] ** diff.clamp(min=0) * window)

    def forward(self, q, k, v):
        t = q.shape[-2]
        return (q @ k.mT * self.mask[:, :t, :t]) @ v


def _periodic(s, q, k, v):
    pos = torch.arange(q.shape[-2]) % 9  # the decay restarts every 9 positions
    diff = pos[:, None] - pos[None, :]
    return (q @ k.mT * torch.where(diff >= 0, s.gamma[:, None, None] ** diff.clamp(min=0), 0.0)) @ v


def _written_mask(s, q, k, v):
    mask = causal(s.gamma, q.shape[-2])
    mask[:, 3, 0] = 5.0  # an in-place write the proof's re-evaluation would not see
    return (q @ k.mT * mask) @ v


def _skip_current_token(s, q, k, v):
    ones = torch.ones(q.shape[-2], q.shape[-2]).tril()
    ones.fill_diagonal_(0)
    return (q @ k.mT * (ones * causal(s.gamma, q.shape[-2]))) @ v


def _clamped_decay(s, q, k, v):
    """A clamp of the decay values (not of positions): no window."""
    return (q @ k.mT * causal(s.gamma.clamp(1e-4, 1 - 1e-6), q.shape[-2])) @ v


def test_a_clamp_of_values_is_not_a_window():
    (region,) = regions(Fn(_clamped_decay), *qkv(t=10))
    assert region.claimed, region.reason


def test_windows_past_the_proven_lengths_are_declined_for_a_dynamic_length():
    """A window baked into a buffer (checked at the buffer's own length) or a period."""
    (region,) = regions(WindowBuffer(), *qkv(t=10))
    assert not region.claimed and "past the example length" in region.reason
    (region,) = regions(Fn(_periodic), *qkv(t=7))
    assert not region.claimed and "compares positions with 9" in region.reason


def _doubled_in_place(s, q, k, v):
    mask = causal(s.gamma, q.shape[-2])
    mask.mul_(2.0)  # still retention, with a row scale of 2
    return (q @ k.mT * mask) @ v


def _nan_cleared(s, q, k, v):
    idx = torch.arange(q.shape[-2])
    diff = (idx[:, None] - idx[None, :]).float()
    mask = s.gamma[:, None, None] ** diff * (diff >= 0).float()
    mask[mask != mask] = 0  # a no-op fix-up written in place (Jamie-Stirling/RetNet's spelling)
    return (q @ k.mT * mask) @ v


@pytest.mark.parametrize(
    "fn, claimed",
    [(_written_mask, False), (_skip_current_token, False), (_doubled_in_place, True),
     (_nan_cleared, True)],
    ids=lambda f: getattr(f, "__name__", str(f)),
)  # fmt: skip
def test_in_place_writes_to_a_mask_are_replayed_by_the_proof(fn, claimed):
    """The proof re-runs the mask with its in-place writes (they happen before the mask is used),
    and the op reads the mask where the region used it, after them."""
    (region,) = regions(Fn(fn), *qkv(), dynamic=False)
    assert region.claimed is claimed, region.reason
    model, x = Fn(fn), qkv()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend="rtp")(*x), model(*x))


def _fla_naive(s, q, k, v, subscripts="bhqd,bhkd,hqk->bhqk"):
    """flash-linear-attention's naive retention: the mask is the score einsum's third operand."""
    scores = torch.einsum(subscripts, q * K**-0.5, k, causal(s.gamma, q.shape[-2]))
    return torch.einsum("bhqk,bhkd->bhqd", scores, v)


def test_a_mask_inside_the_score_einsum_is_claimed_and_equals_eager():
    (region,) = regions(Fn(_fla_naive), *qkv())
    assert region.claimed and region.masks
    model = Fn(_fla_naive).double()
    x = [t.double().requires_grad_() for t in qkv()]
    torch._dynamo.reset()
    got, want = torch.compile(model, backend="rtp")(*x), model(*x)
    torch.testing.assert_close(got, want)
    for a, b in zip(
        torch.autograd.grad(got.sum(), x), torch.autograd.grad(want.sum(), x), strict=True
    ):
        torch.testing.assert_close(a, b)
    # the mask transposed ("hkq") is not a causal mask of these scores: nothing is claimed
    transposed = Fn(lambda s, q, k, v: _fla_naive(s, q, k, v, "bhqd,bhkd,hkq->bhqk"))
    assert not any(r.claimed for r in regions(transposed, *qkv()))


def test_dropout_declined_in_training_only():
    def fn(s, q, k, v):
        return F.dropout(q @ k.mT * _decay(s, T), p=0.5, training=s.training) @ v

    model = Fn(fn)
    assert not regions(model.train(), *qkv())[0].claimed
    assert regions(model.eval(), *qkv())[0].claimed


def test_detection_never_mutates_the_graph():
    seen = []

    def collect(gm, example_inputs, **_):
        before = gm.code
        find_regions(gm, example_inputs)
        seen.append(before == gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(Fn(SPELLINGS["einsum3"]), backend=collect, dynamic=True)(*qkv())
    assert seen == [True]


def test_decisions_are_counted():
    counters.clear()
    regions(Fn(SPELLINGS["matmul_scale_after"]), *qkv())
    regions(Fn(DECLINES["softplus on scores"][0]), *qkv(), torch.ones(B, T))
    assert counters["regions_claimed"] == 1 and counters["regions_declined"] == 1


def test_where_points_at_the_users_source_line():
    (region,) = regions(Fn(SPELLINGS["matmul_scale_after"]), *qkv())
    assert "test_detect.py:" in region.where


def _step_inputs(vk: bool = False, squeeze: bool = False):
    gen = torch.Generator().manual_seed(1)
    tok = () if squeeze else (1,)
    q, k = (torch.randn(B, H, *tok, K, generator=gen) for _ in range(2))
    v = torch.randn(B, H, *tok, V, generator=gen)
    state = torch.randn(B, H, V, K, generator=gen) if vk else torch.randn(B, H, K, V)
    return q, k, v, state


STEPS = {
    "kv_matmul": (lambda s, q, k, v, st: _kv(s, q, s.gamma[:, None, None] * st + k.mT @ v), False),
    "vk_matmul": (
        lambda s, q, k, v, st: (lambda n: ((n @ q.mT).mT, n))(
            s.gamma[:, None, None] * st + v.mT @ k
        ),
        True,
    ),
}


def _kv(s, q, new):
    return q @ new, new


def _vk(q, new):
    return (new @ q.mT).mT, new


@pytest.mark.parametrize("name", sorted(STEPS))
def test_recurrent_steps_are_claimed(name):
    fn, vk = STEPS[name]
    (region,) = regions(Fn(fn), *_step_inputs(vk))
    assert region.claimed and region.written == "recurrent step"
    assert region.state_vk is vk and region.decay == pytest.approx(gamma_of().tolist())


def test_recurrent_step_with_squeezed_tokens_and_broadcast_product():
    def fn(s, q, k, v, st):
        new = st * s.gamma[:, None, None] + k.unsqueeze(-1) * v.unsqueeze(-2)
        return (q.unsqueeze(-1) * new).sum(-2), new

    (region,) = regions(Fn(fn), *_step_inputs(squeeze=True))
    assert region.claimed and region.q.token_axis


def test_one_token_update_read_by_several_queries_is_declined():
    def fn(s, q, k, v, st):
        new = s.gamma[:, None, None] * st + k.mT @ v
        return q @ new, new

    _, k, v, st = _step_inputs()
    q = torch.randn(B, H, 5, K)
    (region,) = regions(Fn(fn), q, k, v, st)
    assert not region.claimed and "different token counts" in region.reason


def test_recurrent_step_with_activation_decay_is_declined():
    def fn(s, q, k, v, st):
        a = torch.sigmoid(q.sum(-1, keepdim=True))  # data-dependent gate
        new = a * st + k.mT @ v
        return q @ new, new

    (region,) = regions(Fn(fn), *_step_inputs())
    assert not region.claimed


def test_fit_decay_accepts_row_scaled_causal_decay():
    m = causal(gamma_of(), 9)
    m = m / m.sum(-1, keepdim=True).sqrt()
    reason, gamma, row_scale = fit_decay(m, 9, 1e-3)
    assert reason is None and row_scale
    assert gamma.tolist() == pytest.approx(gamma_of().tolist(), rel=1e-5)


def _poked():
    mask = causal(gamma_of(), 7)
    mask[:, 5, 1] *= 1.5
    return mask


@pytest.mark.parametrize(
    "mask, words",
    [
        (causal(gamma_of(), 7).transpose(-1, -2), "not causal"),
        (_poked(), "not gamma**(i-j)"),
        (causal(gamma_of(), 7) * torch.tensor([1.0, -1.0, 1.0])[:, None, None], "not positive"),
    ],
)
def test_fit_decay_rejects(mask, words):
    reason, _, _ = fit_decay(mask, 7, 1e-3)
    assert reason is not None and words in reason


class ChunkStep(nn.Module):
    """One chunk of the chunkwise form: parallel term + cross term + state update.

    ``score_scale`` (None: none) scales the scores and the cross term -- by ``cross_scale`` if
    given; the scaled variant also reads k and v through no-op casts, as ``rtpcompile.nn`` does.
    """

    def __init__(self, score_scale: float | None = None, cross_scale: float | None = None):
        super().__init__()
        self.register_buffer("gamma", gamma_of())
        self.score_scale, self.cross_scale = score_scale, cross_scale

    def forward(self, q, k, v, state):
        C = q.shape[2]
        log_g = torch.log(self.gamma)[:, None]
        idx = torch.arange(C)
        diff = idx[:, None] - idx[None, :]
        inner = torch.exp(log_g[..., None] * diff.clamp(min=0)) * (diff >= 0)
        cross = (q * torch.exp(log_g * (idx + 1))[..., None]) @ state
        scores = q @ k.transpose(-1, -2)
        if self.score_scale is not None:
            scores = scores * self.score_scale
            cross = cross * (self.score_scale if self.cross_scale is None else self.cross_scale)
            k, v = k.to(q.dtype), v.to(q.dtype)
        o = (scores * inner) @ v + cross
        k_decay = torch.exp(log_g * (C - 1 - idx))[..., None]
        new_state = torch.exp(log_g * C)[..., None] * state + (k * k_decay).transpose(-1, -2) @ v
        return o, new_state


def test_chunk_step_becomes_one_region_with_a_state():
    q, k, v = qkv(t=7)
    (region,) = regions(ChunkStep(), q, k, v, torch.randn(B, H, K, V))
    assert region.claimed and region.written == "chunk step"
    assert region.state is not None and region.state_output is not None


def test_chunk_step_with_a_wrong_cross_decay_stays_parallel():
    class Wrong(ChunkStep):
        def forward(self, q, k, v, state):
            o, new_state = super().forward(q, k, v, state)
            return o, new_state * 1.0

    q, k, v = qkv(t=7)
    found = regions(Wrong(), q, k, v, torch.randn(B, H, K, V))
    assert [r.written for r in found if r.claimed] == ["parallel"]


class ScaledChunkStep(ChunkStep):
    """``ChunkStep(score_scale, cross_scale)``; ``cross_scale`` None is the same attribute.

    NOTE: Dynamo may turn each float attribute into its own graph input, so two attributes with
    equal values are not provably equal: "the same scale" is the same attribute here."""

    def __init__(self, score_scale: float, cross_scale: float | None):
        super().__init__(score_scale, cross_scale)


@pytest.mark.parametrize(
    "score_scale, cross_scale, written",
    [(0.25, None, "chunk step"), (0.25, 1.0, "parallel"), (0.25, 0.5, "parallel")],
)
def test_a_scaled_chunk_step_merges_only_with_the_same_scale(score_scale, cross_scale, written):
    q, k, v = qkv(t=7)
    model = ScaledChunkStep(score_scale, cross_scale)
    found = regions(model, q, k, v, torch.randn(B, H, K, V))
    assert [r.written for r in found if r.claimed] == [written]


class TwoDecayParams(nn.Module):
    """A chunk step whose mask decays with parameter ``a`` and whose cross term and state update
    decay with ``b``: equal at initialisation, apart once trained (``shared``: b is a)."""

    def __init__(self, shared: bool):
        super().__init__()
        logit = torch.logit(gamma_of().double())
        self.a = nn.Parameter(logit.clone())
        self.b = self.a if shared else nn.Parameter(logit.clone())

    def forward(self, q, k, v, state):
        C = q.shape[2]
        la, lb = (F.logsigmoid(p)[:, None] for p in (self.a, self.b))
        idx = torch.arange(C)
        diff = idx[:, None] - idx[None, :]
        inner = torch.exp(la[..., None] * diff.clamp(min=0)) * (diff >= 0)
        cross = (q * torch.exp(lb * (idx + 1))[..., None]) @ state
        o = (q @ k.transpose(-1, -2) * inner) @ v + cross
        k_decay = torch.exp(lb * (C - 1 - idx))[..., None]
        new_state = torch.exp(lb * C)[..., None] * state + (k * k_decay).transpose(-1, -2) @ v
        return o, new_state


@pytest.mark.parametrize("shared", [True, False])
def test_a_chunk_step_merges_only_when_its_decays_move_with_the_mask(shared):
    model = TwoDecayParams(shared).double()
    q, k, v = (x.double() for x in qkv(t=7))
    s = torch.randn(B, H, K, V, dtype=torch.float64)
    found = regions(model, q, k, v, s)
    assert [r.written for r in found if r.claimed] == ["chunk step" if shared else "parallel"]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="rtp", dynamic=True)
    compiled(q, k, v, s)
    with torch.no_grad():
        model.b.sub_(1.0)  # as training would move it
    for got, want in zip(compiled(q, k, v, s), model(q, k, v, s), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
