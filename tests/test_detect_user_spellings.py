"""Retention spellings from users' code that detection used to decline, and their nearest
non-retention twins, which must stay declined:

- a mask finished in place (``m.tril_()``, ``D[D != D] = 0``) after ``q @ k^T`` but before the
  scores read it (``detect/mutation.py``: a mask's window starts at its first read);
- per-head decays from ``torch.arange(H)`` in forward (RetNet's ``1 - 2 ** (-5 - arange(H))``)
  under a dynamic T (``detect/positions.py``: a fixed-length arange only broadcast against the
  positions is a constant);
- ``torch.meshgrid`` / ``torch.cartesian_prod`` distance grids (layout);
- a python-float gamma (Jamie Stirling's SimpleRetention) that ``dynamic=True`` lifts to a
  SymFloat graph input (a constant, not a size);
- ``a & b`` of causal conditions (``operator.and_`` is not in place; on integer positions
  a bit operation cuts, and declines).

Twins: a write between the mask's read and the output; ``arange(4096)[:T]`` with a window
past the proven lengths; a log of shifted ``arange(T)``; an anti-causal (transposed) grid; a
grid of two differently shifted aranges; a difference of two rows shifted by a tensor; a float
window. explain() names a whole retention written as one einsum, and shows "-" heads for a
declined [B, T, d] region.
"""

from __future__ import annotations

import pytest
import torch
from test_detect import regions
from torch import nn

import rtpcompile
from rtpcompile.backend import counters

H, D = 2, 8
GAMMA = [1 - 2.0 ** (-5 - h) for h in range(H)]


def _distance(T, dtype=torch.float64):
    i = torch.arange(T, dtype=dtype)
    return i[:, None] - i[None, :]


class Retention(nn.Module):
    """``((q @ k^T) * mask) @ v`` with the mask from ``fn(self, T)``."""

    def __init__(self, fn, scores_first=False):
        super().__init__()
        self.fn, self.scores_first = fn, scores_first
        self.register_buffer("g", torch.tensor(GAMMA, dtype=torch.float64))
        self.gamma = GAMMA[0]

    def forward(self, q, k, v):
        T = q.shape[-2]
        if self.scores_first:
            s = q @ k.transpose(-1, -2)
            s = s * self.fn(self, T)
        else:
            m = self.fn(self, T)
            s = (q @ k.transpose(-1, -2)) * m
        return s @ v


def _qkv(T, heads=True, batch=2):
    shape = (batch, H, T, D) if heads else (batch, T, D)
    return [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]


def _verdicts(model, *inputs, dynamic=True):
    return [(r.claimed, r.reason) for r in regions(model, *inputs, dynamic=dynamic)]


def _compiled_equals_eager(model, dynamic, lengths=(9, 17), heads=True):
    """Compiled (every graph's region claimed) == eager, outputs and q/k/v gradients, float64."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="rtp", dynamic=dynamic)
    for T in lengths:
        inputs = _qkv(T, heads)
        mine = [x.clone().requires_grad_(True) for x in inputs]
        ref = [x.clone().requires_grad_(True) for x in inputs]
        out, want = compiled(*mine), model(*ref)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
        w = torch.randn_like(want)
        (out * w).sum().backward()
        (want * w).sum().backward()
        for a, b in zip(mine, ref, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)
    assert counters["regions_claimed"] >= 1 and counters["regions_declined"] == 0, dict(counters)


# --- 1. a mask finished in place after the score product ---------------------------------


def tril_in_place(s, T):
    m = s.g[:, None, None] ** _distance(T).clamp(min=0)
    m.tril_()
    return m


def nan_cleared_in_place(s, T):
    dd = _distance(T)
    m = (s.g[:, None, None] ** dd) * (dd >= 0)
    m[m != m] = 0
    return m


@pytest.mark.parametrize("fn", [tril_in_place, nan_cleared_in_place], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dynamic", [False, True])
def test_a_mask_finished_in_place_after_the_scores_is_claimed(fn, dynamic):
    model = Retention(fn, scores_first=True)
    assert _verdicts(model, *_qkv(9), dynamic=dynamic) == [(True, None)]


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_a_mask_finished_in_place_after_the_scores_compiles_to_eager(dynamic):
    _compiled_equals_eager(Retention(tril_in_place, scores_first=True), dynamic)


class WrittenAfterRead(nn.Module):
    """The mask (or q) written in place between the scores' read of it and the output."""

    def __init__(self, what):
        super().__init__()
        self.what = what
        self.register_buffer("g", torch.tensor(GAMMA, dtype=torch.float64))

    def forward(self, q, k, v):
        m = (self.g[:, None, None] ** _distance(q.shape[-2]).clamp(min=0)).tril()
        s = (q @ k.transpose(-1, -2)) * m
        if self.what == "mask":
            m.mul_(2)
        else:
            q.mul_(2)
        return s @ v


@pytest.mark.parametrize("what", ["mask", "q"])
def test_a_write_between_the_read_and_the_output_stays_declined(what):
    (verdict,) = _verdicts(WrittenAfterRead(what), *_qkv(9))
    assert verdict[0] is False and "in place" in verdict[1]


# --- 2. per-head decays from arange(H) computed in forward -------------------------------


def heads_arange_log(s, T):
    """torchscale's RetNetRelPos: decay = log(1 - 2 ** (-5 - arange(H)))."""
    decay = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64)))
    dd = _distance(T)
    return torch.exp(dd.clamp(min=0) * decay[:, None, None]) * (dd >= 0)


def heads_arange_pow(s, T):
    g = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))
    return torch.tril(g[:, None, None] ** _distance(T))


def heads_linspace(s, T):
    import math

    g = 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), H, dtype=torch.float64))
    return torch.tril(g[:, None, None] ** _distance(T))


@pytest.mark.parametrize(
    "fn", [heads_arange_log, heads_arange_pow, heads_linspace], ids=lambda f: f.__name__
)
def test_per_head_decays_from_a_fixed_arange_are_claimed_under_a_dynamic_length(fn):
    assert _verdicts(Retention(fn), *_qkv(9)) == [(True, None)]


@pytest.mark.slow
def test_per_head_decays_from_a_fixed_arange_compile_to_eager():
    _compiled_equals_eager(Retention(heads_arange_log), dynamic=None, lengths=(9, 17, 33))


def sliced_fixed_arange_window(s, T):
    """arange(4096)[:T] is positions: a window of 1500 (past the lengths the proof evaluates
    with a dynamic T) must decline, as it did before fixed aranges became constants."""
    p = torch.arange(4096, dtype=torch.float64)[:T]
    dd = p[:, None] - p[None, :]
    return torch.where((dd >= 0) & (dd < 1500), s.g[:, None, None] ** dd, 0.0)


def fixed_arange_written_into_a_tensor(s, T):
    """The fixed arange's values written into another tensor, then sliced to T."""
    x = torch.zeros(4096, dtype=torch.float64)
    x[:] = torch.arange(4096, dtype=torch.float64)
    p = x[:T]
    dd = p[:, None] - p[None, :]
    return torch.where((dd >= 0) & (dd < 1500), s.g[:, None, None] ** dd, 0.0)


def log_of_shifted_positions(s, T):
    """The same formula over arange(T) instead of arange(H): log of shifted positions."""
    decay = torch.log(1 - 2.0 ** (-5 - torch.arange(T, dtype=torch.float64)))
    return torch.exp(_distance(T).clamp(min=0) * decay[:, None]) * (_distance(T) >= 0)


@pytest.mark.parametrize(
    "fn",
    [sliced_fixed_arange_window, fixed_arange_written_into_a_tensor, log_of_shifted_positions],
    ids=lambda f: f.__name__,
)
def test_aranges_reaching_the_positions_stay_positions(fn):
    (verdict,) = _verdicts(Retention(fn), *_qkv(9))
    assert verdict[0] is False


# --- 3. meshgrid and cartesian_prod distance grids ---------------------------------------


def meshgrid_ij(s, T):
    r = torch.arange(T)
    ii, jj = torch.meshgrid(r, r, indexing="ij")
    return torch.where(ii >= jj, s.g[:, None, None] ** (ii - jj).double(), torch.zeros(()))


def meshgrid_xy(s, T):
    r = torch.arange(T, dtype=torch.float64)
    jj, ii = torch.meshgrid(r, r, indexing="xy")
    return torch.tril(s.g[:, None, None] ** (ii - jj))


def meshgrid_list(s, T):
    r = torch.arange(1, T + 1)
    ii, jj = torch.meshgrid([r, r], indexing="ij")
    d = ii - jj
    return torch.where(d >= 0, s.g[:, None, None] ** d, 0.0)


def cartesian(s, T):
    r = torch.arange(T)
    idx = torch.cartesian_prod(r, r)
    dd = (idx[:, 0] - idx[:, 1]).view(T, T).double()
    return torch.where(dd >= 0, s.g[:, None, None] ** dd, 0.0)


@pytest.mark.parametrize(
    "fn", [meshgrid_ij, meshgrid_xy, meshgrid_list, cartesian], ids=lambda f: f.__name__
)
def test_grid_spellings_are_claimed_under_a_dynamic_length(fn):
    assert _verdicts(Retention(fn), *_qkv(9)) == [(True, None)]


@pytest.mark.slow
@pytest.mark.parametrize("fn", [meshgrid_xy, cartesian], ids=lambda f: f.__name__)
def test_grid_spellings_compile_to_eager(fn):
    _compiled_equals_eager(Retention(fn), dynamic=True)


def meshgrid_xy_transposed(s, T):
    """indexing="xy" read as if it were "ij": the grid is transposed, anti-causal."""
    r = torch.arange(T, dtype=torch.float64)
    ii, jj = torch.meshgrid(r, r, indexing="xy")
    return torch.where(ii >= jj, s.g[:, None, None] ** (ii - jj), 0.0)


def meshgrid_shifted_apart(s, T):
    """A grid of two aranges shifted apart: i - j - 1500, a window no short length shows."""
    r = torch.arange(T)
    ii, jj = torch.meshgrid(r, r + 1500, indexing="ij")
    d = ii - jj + 1500
    return torch.where((d >= 0) & (ii - jj < 0), s.g[:, None, None] ** d, 0.0)


def rows_shifted_by_a_tensor(s, T):
    """Two rows of one tensor, the second shifted by 1500: their difference is i - j - 1500."""
    p = torch.arange(T, dtype=torch.float64)
    y = p[None, :] + torch.tensor([[0.0], [1500.0]], dtype=torch.float64)
    window = y[0][:, None] - y[1][None, :]
    dd = _distance(T)
    return torch.where((window < 0) & (dd >= 0), s.g[:, None, None] ** dd, 0.0)


@pytest.mark.parametrize(
    "fn",
    [meshgrid_xy_transposed, meshgrid_shifted_apart, rows_shifted_by_a_tensor],
    ids=lambda f: f.__name__,
)
def test_grids_that_are_not_retention_stay_declined(fn):
    (verdict,) = _verdicts(Retention(fn), *_qkv(9))
    assert verdict[0] is False


# --- 4. a python-float gamma lifted by dynamic=True --------------------------------------


def stirling(s, T):
    """Jamie Stirling's SimpleRetention._get_D, gamma a python float."""
    n = torch.arange(T).unsqueeze(1)
    m = torch.arange(T).unsqueeze(0)
    d = (s.gamma ** (n - m)) * (n >= m).double()
    d[d != d] = 0
    return d


def float_window(s, T):
    """A python-float window: a size-like cut the proof sees at one value only."""
    dd = _distance(T)
    return torch.where((dd >= 0) & (dd < s.gamma * 2000), s.g[:, None, None] ** dd, 0.0)


class OneHead(nn.Module):
    """[B, T, d] with one head, as Stirling's repo writes it."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.gamma = fn, GAMMA[0]
        self.register_buffer("g", torch.tensor(GAMMA, dtype=torch.float64))

    def forward(self, q, k, v):
        return ((q @ k.transpose(-1, -2)) * self.fn(self, q.shape[1]).unsqueeze(0)) @ v


def test_a_float_gamma_lifted_to_a_symfloat_is_claimed():
    assert _verdicts(OneHead(stirling), *_qkv(9, heads=False)) == [(True, None)]
    report = rtpcompile.explain(OneHead(stirling), *_qkv(9, heads=False))
    assert [r.claimed for r in report.regions] == [True]


@pytest.mark.slow
def test_a_float_gamma_lifted_to_a_symfloat_compiles_to_eager():
    # NOTE: ``float ** int tensor`` is of the default dtype: float64, so that eager's mask is
    # not rounded to float32 (the op reads gamma from it and powers it in full precision)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _compiled_equals_eager(OneHead(stirling), dynamic=True, heads=False)
    finally:
        torch.set_default_dtype(old)


class ClassGamma(nn.Module):
    """The float set in the class body: Dynamo reads it through the module's type."""

    gamma = 0.96875

    def forward(self, q, k, v):
        return ((q @ k.transpose(-1, -2)) * stirling(self, q.shape[-2]).to(q.dtype)) @ v


def test_a_class_attribute_float_gamma_is_model_state(fresh_compile, monkeypatch):
    """explain said "the mask depends on activations" (the source passes through the module's
    type) while the compile claimed it; both claim it now, and changing the class attribute
    between calls gives eager's values (a gamma > 1 included: not claimed, run as written)."""
    q, k, v = _qkv(9)
    assert [r.claimed for r in rtpcompile.explain(ClassGamma(), q, k, v).regions] == [True]
    compiled = torch.compile(ClassGamma(), backend="rtp", dynamic=True)
    for T, gamma in ((9, 0.96875), (17, 0.5), (11, 1.2)):
        monkeypatch.setattr(ClassGamma, "gamma", gamma)
        q, k, v = _qkv(T)
        want = ClassGamma()(q, k, v)
        got = compiled(q.float(), k.float(), v.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_a_float_window_stays_declined():
    (verdict,) = _verdicts(Retention(float_window), *_qkv(9))
    assert verdict[0] is False


# --- 5. a & b of causal conditions -------------------------------------------------------


def and_of_conditions(s, T):
    dd = _distance(T)
    keep = (dd >= 0) & torch.ones(T, T, dtype=torch.bool)
    return torch.where(keep, s.g[:, None, None] ** dd, 0.0)


def test_and_of_causal_conditions_is_not_an_in_place_write():
    assert _verdicts(Retention(and_of_conditions), *_qkv(9)) == [(True, None)]


def bit_and_of_positions(s, T):
    """``d & 2048`` of integer positions: a cut at 2048, past the lengths the proof sees."""
    i = torch.arange(T)
    dd = i[:, None] - i[None, :]
    keep = (dd >= 0) & ((dd & 2048) == 0)
    return torch.where(keep, s.g[:, None, None] ** dd, 0.0)


def bitwise_and_of_positions(s, T):
    i = torch.arange(T)
    dd = i[:, None] - i[None, :]
    keep = (dd >= 0) & (torch.bitwise_and(dd, 2048) == 0)
    return torch.where(keep, s.g[:, None, None] ** dd, 0.0)


@pytest.mark.parametrize(
    "fn", [bit_and_of_positions, bitwise_and_of_positions], ids=lambda f: f.__name__
)
def test_a_bit_operation_on_integer_positions_stays_declined(fn):
    (verdict,) = _verdicts(Retention(fn), *_qkv(9))
    assert verdict[0] is False and "bit operation" in verdict[1]


# --- explain rows ------------------------------------------------------------------------


class FusedEinsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("g", torch.tensor(GAMMA, dtype=torch.float64))

    def forward(self, q, k, v):
        L = torch.tril(self.g[:, None, None] ** _distance(q.shape[2]))
        return torch.einsum("bhqd,bhkd,hqk,bhkv->bhqv", q, k, L, v)


class FusedEinsumWithScale(FusedEinsum):
    """Five operands (a per-query scale too): no split is tried, explain says what to do."""

    def forward(self, q, k, v):
        L = torch.tril(self.g[:, None, None] ** _distance(q.shape[2]))
        w = torch.ones(q.shape[2], dtype=q.dtype)
        return torch.einsum("bhqd,bhkd,hqk,q,bhkv->bhqv", q, k, L, w, v)


def test_explain_names_a_retention_written_as_one_einsum():
    """Four operands are split and claimed (tests/test_fused_einsum.py); other fused einsums are
    declined with a row saying how to write them."""
    (row,) = rtpcompile.explain(FusedEinsum(), *_qkv(9)).regions
    assert row.claimed
    (row,) = rtpcompile.explain(FusedEinsumWithScale(), *_qkv(9)).regions
    assert not row.claimed and "one einsum computes both the scores and the values" in row.reason
    assert "split it into a score einsum" in row.reason


def declined_one_head(s, T):
    return torch.where(_distance(T) >= 0, 0.5 ** _distance(T).abs(), 1.0)


def test_explain_shows_no_head_count_for_a_declined_three_d_region():
    report = rtpcompile.explain(OneHead(declined_one_head), *_qkv(9, heads=False))
    (row,) = report.regions
    assert not row.claimed and row.heads is None
    row_text = str(report).splitlines()[3].split()
    assert row_text[:2] == ["0", "declined"] and row_text[4] == "-"
