"""A retention written as one einsum of four operands (Mamba2's ``ssd_minimal`` style) is split
into its score and value einsums and claimed when the mask proves out; one that does not stays
exactly as written (``detect/fused_einsum.py``, ``detect.find_regions_split``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rtpcompile
from rtpcompile.backend import detect_and_rewrite
from rtpcompile.detect import counters
from rtpcompile.detect.fused_einsum import FUSED_REASON, roles
from rtpcompile.lowering import reference as ref
from rtpcompile.options import resolve

GAMMA = (0.9, 0.6, 1.0)


class Fused(nn.Module):
    """``einsum(equation, *operands)`` with q, k, v, the decay mask L [H, T, T] in ``order``."""

    def __init__(self, equation="bhqd,bhkd,hqk,bhkv->bhqv", order="qkLv", leak=0.0):
        super().__init__()
        self.register_buffer("g", torch.tensor(GAMMA[:2], dtype=torch.float64))
        self.equation, self.order, self.leak = equation, order, leak

    def forward(self, q, k, v):
        T = q.shape[2]
        i = torch.arange(T, device=q.device)
        d = i[:, None] - i[None, :]
        L = torch.where(d >= 0, self.g[:, None, None] ** d.clamp(min=0), self.leak)
        named = {"q": q, "k": k, "L": L.to(q.dtype), "v": v}
        return torch.einsum(self.equation, *(named[c] for c in self.order))


def qkv(T=23, K=6, V=10, B=2, H=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = (K, K, V)
    return [torch.randn(B, H, T, d, generator=g, dtype=dtype, requires_grad=True) for d in sizes]


def _graph(model, *args):
    """The FX graph Dynamo passes the backend, and what detect_and_rewrite makes of it."""
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["inputs"] = gm, list(example_inputs)
        seen["new"], seen["regions"] = detect_and_rewrite(gm, example_inputs, resolve(None))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=False)(*args)
    return seen


EINSUM = (torch.einsum, torch.functional.einsum)


def _einsums(gm):
    return [n.args[0] for n in gm.graph.nodes if n.target in EINSUM]


@pytest.mark.parametrize(
    "equation,order",
    [
        ("bhqd,bhkd,hqk,bhkv->bhqv", "qkLv"),
        ("hqk,bhkv,bhqd,bhkd->bhqv", "Lvqk"),
        ("bhtd,bhsd,hts,bhsf->bhtf", "qkLv"),  # other letters
        ("bhkv,bhqd,hqk,bhkd->bhqv", "vqLk"),
    ],
)
def test_a_fused_einsum_is_claimed_and_matches_eager(equation, order):
    model = Fused(equation, order)
    q, k, v = qkv()
    counters.clear()
    seen = _graph(model, q, k, v)
    (region,) = seen["regions"]
    assert region.claimed and region.written == "parallel"
    assert (counters["regions_claimed"], counters["regions_declined"]) == (1, 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="rtp")
    out, want = compiled(q, k, v), model(q, k, v)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    exp = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_the_op_computes_it_against_the_float64_reference():
    q, k, v = qkv(T=37, K=7, V=5)
    torch._dynamo.reset()
    out = torch.compile(Fused(), backend="rtp")(q, k, v)
    gamma = torch.tensor(GAMMA[:2], dtype=torch.float64)
    want, _ = ref.reference_recurrent(q, k, v, gamma, 1.0, None)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [1, 2, 65])
def test_awkward_lengths(T):
    q, k, v = qkv(T=T, K=5, V=3)
    torch._dynamo.reset()
    out = torch.compile(Fused(), backend="rtp")(q, k, v)
    torch.testing.assert_close(out, Fused()(q, k, v), rtol=1e-10, atol=1e-10)


def test_a_declined_one_stays_as_written_and_says_why():
    """A leaking mask (not zero above the diagonal) is no retention: the graph keeps the
    four-operand einsum, and the reason is the split's."""
    q, k, v = qkv()
    counters.clear()
    seen = _graph(Fused(leak=0.01), q, k, v)
    (region,) = seen["regions"]
    assert not region.claimed and region.reason.startswith(FUSED_REASON)
    assert "split into its score and value einsums, it is declined:" in region.reason
    assert seen["new"] is seen["gm"]
    assert _einsums(seen["new"]) == ["bhqd,bhkd,hqk,bhkv->bhqv"]
    assert (counters["regions_claimed"], counters["regions_declined"]) == (0, 1)


class Two(nn.Module):
    """Two fused einsums in one graph: one retention, one with a leaking mask."""

    def __init__(self):
        super().__init__()
        self.good, self.bad = Fused(), Fused(leak=0.01)

    def forward(self, q, k, v):
        return self.good(q, k, v) + self.bad(q, k, v)


def test_only_the_claimed_einsum_is_split():
    q, k, v = qkv()
    counters.clear()
    seen = _graph(Two(), q, k, v)
    claimed = [r for r in seen["regions"] if r.claimed]
    declined = [r for r in seen["regions"] if not r.claimed]
    assert len(claimed) == 1 and len(declined) == 1
    assert "it is declined:" in declined[0].reason
    assert (counters["regions_claimed"], counters["regions_declined"]) == (1, 1)
    # the rewritten graph: the claimed einsum became the op, the declined one is as written
    assert _einsums(seen["new"]) == ["bhqd,bhkd,hqk,bhkv->bhqv"]
    targets = [n.target for n in seen["new"].graph.nodes]
    assert sum("rtp" in str(t) for t in targets) >= 1
    torch._dynamo.reset()
    model = Two()
    torch.testing.assert_close(
        torch.compile(model, backend="rtp")(q, k, v), model(q, k, v), rtol=1e-10, atol=1e-10
    )


def test_explain_shows_the_claim():
    report = rtpcompile.explain(Fused(), *qkv())
    (row,) = report.regions
    assert row.claimed and row.heads == 2


@pytest.mark.parametrize(
    "equation",
    [
        "bhqd,bhkd,hqk,bhkv->bhqk",  # the keys kept: no sum over them
        "bhqd,bhkd,hqk,bhqv->bhqv",  # v indexed by the queries
        "bhqd,bhkd,hqe,bhkv->bhqv",  # the mask has a letter of its own
        "bhqd,bhkd,bhkd,bhkv->bhqv",  # two pairs share the head dim
        "bhqq,bhkd,hqk,bhkv->bhqv",  # a diagonal
    ],
)
def test_roles_refuse_what_is_not_a_retention(equation):
    graph = torch.fx.Graph()
    ops = [graph.placeholder(name) for name in "abcd"]
    node = graph.call_function(torch.einsum, (equation, *ops))
    assert roles(node) is None


@settings(max_examples=12)
@given(
    order=st.permutations("qkLv"),
    letters=st.permutations("bhqkdv"),
    T=st.integers(1, 20),
    K=st.integers(1, 6),
    V=st.integers(1, 6),
)
def test_any_operand_order_and_letters_is_claimed(order, letters, T, K, V):
    b, h, qq, kk, d, vv = letters
    sub = {"q": b + h + qq + d, "k": b + h + kk + d, "L": h + qq + kk, "v": b + h + kk + vv}
    equation = ",".join(sub[c] for c in order) + f"->{b}{h}{qq}{vv}"
    model = Fused(equation, "".join(order))
    q, k, v = qkv(T=T, K=K, V=V)
    seen = _graph(model, q, k, v)
    (region,) = seen["regions"]
    assert region.claimed, region.reason
    (out,) = seen["new"](*seen["inputs"])  # the rewritten graph: the op in the einsum's place
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-10, atol=1e-10)


def test_a_split_that_finds_nothing_says_so():
    """The mask laid out [H, keys, queries] (its transpose): the split einsums hold no candidate,
    and the row says the split was tried rather than advising it."""
    q, k, v = qkv(T=9)
    seen = _graph(Fused("bhqd,bhkd,hkq,bhkv->bhqv"), q, k, v)
    (region,) = seen["regions"]
    assert not region.claimed and "no retention candidate in them" in region.reason
    assert "to have it claimed" not in region.reason
    assert _einsums(seen["new"]) == ["bhqd,bhkd,hkq,bhkv->bhqv"]
