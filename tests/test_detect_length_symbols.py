"""q's and k's lengths as two size symbols: Dynamo gives every input's dims their own symbols,
so a compiled function taking q, k and v whose only mask is the scores' tril has nothing tying
them. Such a region is claimed under a guard that they are equal; unequal lengths recompile and
run the graph as written."""

from __future__ import annotations

import pytest
import torch


def scores_tril(q, k, v):
    return (q @ k.mT).tril() @ v


def decayed_scores_tril(q, k, v):
    gamma = torch.tensor([0.9, 0.7])[:, None, None]
    T = q.shape[2]
    i = torch.arange(T)
    return ((q @ k.mT) * gamma ** (i[:, None] - i[None, :]).clamp(min=0)).tril() @ v


def _qkv(Tq, Tk, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, Tq, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, Tk, d, generator=gen, dtype=torch.float64) for d in (8, 12))
    return q, k, v


@pytest.mark.parametrize("fn", [scores_tril, decayed_scores_tril])
@pytest.mark.parametrize("how", ["automatic", "mark_dynamic"])
def test_separate_length_symbols_are_claimed_at_every_length(op_calls, fn, how):
    compiled = torch.compile(fn, backend="rtp", dynamic=None)
    for seed, T in enumerate((13, 9, 21, 1 + 64)):
        q, k, v = _qkv(T, T, seed)
        args = [x.float() for x in (q, k, v)]
        if how == "mark_dynamic":
            for x in args:
                torch._dynamo.mark_dynamic(x, 2)
        op_calls.clear()
        got = compiled(*args)
        assert len(op_calls) == 1, (T, how)
        torch.testing.assert_close(got.double(), fn(q, k, v), rtol=1e-5, atol=1e-5)


def test_unequal_lengths_after_the_claim_recompile_and_run_as_written(op_calls):
    """The guard, not the claim, meets a rectangular call: the tril of [9, 12] scores is not
    retention, and the recompiled graph computes it as eager does."""
    compiled = torch.compile(scores_tril, backend="rtp", dynamic=None)
    for seed, T in enumerate((13, 9)):
        compiled(*(x.float() for x in _qkv(T, T, seed)))
    for Tq, Tk in ((9, 12), (12, 9), (5, 7)):
        q, k, v = _qkv(Tq, Tk, Tq + Tk)
        op_calls.clear()
        got = compiled(q.float(), k.float(), v.float())
        assert not op_calls, (Tq, Tk)
        torch.testing.assert_close(got.double(), scores_tril(q, k, v), rtol=1e-5, atol=1e-5)
    # NOTE: equal again, served by the newest graph whose guards pass (Dynamo tries the newest
    # first): the rectangular one, which runs the scores as written
    q, k, v = _qkv(17, 17, 3)
    got = compiled(q.float(), k.float(), v.float())
    torch.testing.assert_close(got.double(), scores_tril(q, k, v), rtol=1e-5, atol=1e-5)


def test_sizes_taken_for_equal_only_while_detection_collects_them():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from rtpcompile.detect.graph_view import assumed_equal_sizes, same_size

    env = ShapeEnv()
    a, b, c = (env.create_unbacked_symint() for _ in range(3))
    with FakeTensorMode(shape_env=env):
        assert not same_size(a, b)
        with assumed_equal_sizes() as pairs:
            assert not same_size(a, b)  # unbacked: no example value to compare
        assert pairs == [] and not same_size(a, c)
