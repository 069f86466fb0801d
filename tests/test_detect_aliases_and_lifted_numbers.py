"""Two ways a claimed region computed something else, found by a soundness review (2026-11-25):
a write through an alias the mutation check did not know (``reshape_as``, ``.data``, ...), and
a Python float attribute Dynamo lifted to a graph input that decided the mask's structure at
its example value and then changed without a recompile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rtpcompile.backend import counters

GAMMA = (0.9, 0.7)


def _distance(T, dtype):
    i = torch.arange(T, dtype=dtype)
    return i[:, None] - i[None, :]


def _decay(T, dtype):
    d = _distance(T, dtype)
    return torch.tensor(GAMMA, dtype=dtype)[:, None, None] ** d.clamp(min=0) * (d >= 0)


ALIASES = {
    "view_as": lambda m: m.view_as(m),
    "reshape_as": lambda m: m.reshape_as(m),
    "broadcast_tensors": lambda m: torch.broadcast_tensors(m)[0],
    "sum_to_size": lambda m: m.sum_to_size(m.shape),
    "data": lambda m: m.data,
    "aten.alias": lambda m: torch.ops.aten.alias.default(m),
    "aten.view": lambda m: torch.ops.aten.view.default(m, [-1]),
    "aten.slice": lambda m: torch.ops.aten.slice.Tensor(m, 0, 0, 2**62),
}


def _written_through(alias):
    def fn(q, k, v):
        m = _decay(q.shape[2], q.dtype)
        a = alias(m)
        s = (q @ k.mT) * m
        a.add_(1.0)  # NOTE: eager's scores already hold the old values; the op would read new
        return s @ v

    return fn


def _qkv(T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, T, 8, generator=gen, dtype=torch.float64) for _ in range(3)]


def _check(compiled, eager, T, seed=0):
    q, k, v = _qkv(T, seed)
    got = compiled(q.float(), k.float(), v.float()).double()
    want = eager(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_a_write_through_any_alias_of_the_mask_declines(op_calls, name):
    fn = _written_through(ALIASES[name])
    compiled = torch.compile(fn, backend="rtp", dynamic=True)
    for T in (9, 17):
        _check(compiled, fn, T)
    assert not op_calls and counters["regions_claimed"] == 0, dict(counters)


def test_a_copy_of_the_mask_is_not_an_alias(op_calls):
    """The control: ``squeeze_copy`` copies, so a write to the copy changes nothing read."""
    fn = _written_through(torch.squeeze_copy)
    _check(torch.compile(fn, backend="rtp", dynamic=True), fn, 9)
    assert op_calls == [1]


class Leaky(nn.Module):
    """``1 + leak * (d > 0)``: retention only while ``leak`` is 0 (the diagonal stays 1, the
    distances past it grow by 1 + leak: no decay with a row scale fits). NOTE: not ``decay +
    leak * (d < 0)``: an exponential of positions summed with other positions declines as such
    under a dynamic T (``exp(d - W) + (d >= 0)`` is causal at every length proven)."""

    def __init__(self, leak):
        super().__init__()
        self.leak = leak

    def forward(self, q, k, v):
        d = _distance(q.shape[2], q.dtype)
        m = _decay(q.shape[2], q.dtype) * (1 + self.leak * (d > 0))
        return ((q @ k.mT) * m) @ v


@pytest.mark.parametrize("dynamic", [True, None])
def test_a_lifted_float_attribute_is_guarded_to_its_proven_value(op_calls, dynamic):
    model = Leaky(0.0)
    compiled = torch.compile(model, backend="rtp", dynamic=dynamic)
    for seed, (leak, T, claimed) in enumerate(
        [(0.0, 9, True), (1e-30, 13, None), (0.0, 17, True), (0.5, 17, False), (0.5, 40, False)]
    ):
        model.leak = leak
        op_calls.clear()
        _check(compiled, model, T, seed)
        if claimed is not None:
            assert bool(op_calls) is claimed, (leak, T, op_calls)


def test_a_number_read_from_the_length_is_not_guarded(op_calls):
    """Only lifted Python numbers are guarded: a float computed from T (``T ** -0.5``) guarded
    to its example value would fix the length (a recompile per T)."""
    from torch._dynamo.utils import counters as dynamo_counters

    def fn(q, k, v):
        T = q.shape[2]
        return ((q @ k.mT) * (_decay(T, q.dtype) * T**-0.5)) @ v

    compiled = torch.compile(fn, backend="rtp", dynamic=True)
    for seed, T in enumerate((9, 17, 33)):
        op_calls.clear()
        _check(compiled, fn, T, seed)
        assert op_calls == [1], T
    assert dynamo_counters["stats"]["unique_graphs"] == 1, dict(dynamo_counters["stats"])
