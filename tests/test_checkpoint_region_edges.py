"""Edge cases of retention inside checkpoints and nested compile regions (found 2026-11-24):
one compile region called in two places, masks written in place or built without gradient,
masks and states that cross a body's boundary, verify of the graph around the bodies."""

from __future__ import annotations

import copy

import pytest
import torch
from test_backend import inductor, op_calls  # noqa: F401  (fixture)
from test_checkpoint_regions import (  # noqa: F401  (fixture)
    H,
    Layer,
    _bodies,
    _check_against_float64,
    _x,
    aot_eager_graphs,
    decay_mask,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

import rtpcompile.backend as backend
from rtpcompile.explain import explain
from rtpcompile.rewrite import rtp_decay


def _qkv(T: int, k: int = 4, v: int = 5, grad: bool = False):
    gen = torch.Generator().manual_seed(T)
    out = [torch.randn(2, H, T, d, generator=gen) for d in (k, k, v)]
    return [t.requires_grad_(grad) for t in out]


def _against_float64(model, compiled, inputs, tol=2e-4):
    """Every output and the gradients of every input and parameter, against float64 eager."""
    ref = copy.deepcopy(model).double()
    inputs64 = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    want, got = ref(*inputs64), compiled(*inputs)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    sum(w.sum() for w in want).backward()
    sum(g.sum() for g in got).backward()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)
    for a, b in zip(inputs, inputs64, strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=tol, atol=tol)
    for (name, p), (_, p64) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=tol, atol=tol, msg=name)


@torch.compiler.nested_compile_region
def _retention(q, k, v, mask):
    return (q @ k.transpose(-1, -2) * mask) @ v


class TwoPlaces(nn.Module):
    """One compile region called directly with a decay mask (claimed) and in a checkpoint with a
    lower-triangular mask that is no decay (declined): Dynamo gives both calls one body and one
    identifier, which AOTAutograd traces once for all its calls."""

    def __init__(self, T: int, checkpointed_first: bool):
        super().__init__()
        self.first = checkpointed_first
        d = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        gamma = torch.tensor([0.5, 0.7, 0.9])
        self.register_buffer("decay", decay_mask(gamma, T))
        harmonic = torch.where(d >= 0, 1 / (1 + d.clamp(min=0)), 0.0).expand(H, T, T)
        self.register_buffer("harmonic", harmonic.contiguous())  # NOTE: as decay's, one body

    def forward(self, q, k, v):
        if self.first:
            b = checkpoint(_retention, q, k, v, self.harmonic, use_reentrant=False)
            a = _retention(q, k, v, self.decay)
        else:
            a = _retention(q, k, v, self.decay)
            b = checkpoint(_retention, q, k, v, self.harmonic, use_reentrant=False)
        return a, b


@pytest.mark.parametrize("checkpointed_first", [False, True])
def test_a_compile_region_called_in_two_places_runs_its_own_body_in_each(
    aot_eager_graphs,  # noqa: F811
    checkpointed_first,
):
    model = TwoPlaces(8, checkpointed_first)
    q, k, v = _qkv(8, grad=True)
    _against_float64(model, torch.compile(model, backend="rtp", dynamic=False), [q, k, v])
    assert backend.counters["regions_claimed"] == 1 and backend.counters["regions_declined"] == 1
    (gm,) = aot_eager_graphs
    # NOTE: the rewritten body has an identifier of its own; the declined call keeps Dynamo's
    identifiers = {
        n.args[1]
        for g in [gm, *_bodies(gm)]
        for n in g.graph.nodes
        if n.op == "call_function" and n.name.startswith("invoke_subgraph")
    }
    assert len(identifiers) == 2 and sum("_rtp_" in i for i in identifiers) == 1


class WrittenInPlace(nn.Module):
    """A mask (or what it is built from) changed in place inside the checkpointed function."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("gamma", torch.tensor([0.5, 0.7, 0.9]))
        self.register_buffer("temperature", torch.tensor([0.5, 1.5, 2.0]))

    def layer(self, q, k, v):
        if self.how == "mask":
            mask = decay_mask(self.gamma, q.shape[-2])
            mask.mul_(self.temperature[:, None, None])
        else:
            gamma = self.gamma.clone()
            gamma.pow_(2)
            mask = decay_mask(gamma, q.shape[-2])
        return (q @ k.transpose(-1, -2) * mask) @ v

    def forward(self, q, k, v):
        return checkpoint(self.layer, q, k, v, use_reentrant=False)


@pytest.mark.parametrize("how", ["mask", "ancestor"])
def test_a_mask_written_in_place_in_a_checkpoint_is_read_inside(inductor, how):  # noqa: F811
    """Before the fix gamma was read before the call from a copy of the mask's nodes that missed
    the write (max error 6.9 against outputs of 14)."""
    model = WrittenInPlace(how)
    q, k, v = _qkv(8, grad=True)
    _against_float64(model, torch.compile(model, backend="rtp", dynamic=False), [q, k, v])
    ((gm, _),) = inductor
    assert [op_calls(body) for body in _bodies(gm)] == [1]
    assert not any(n.target is rtp_decay for n in gm.graph.nodes)


class FrozenMask(nn.Module):
    """A learnable decay whose mask is built under no_grad inside the checkpointed function: the
    logit's gradient comes only from the explicit product after the region."""

    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.logit(torch.tensor([0.5, 0.7, 0.9])))

    def layer(self, q, k, v):
        with torch.no_grad():
            mask = decay_mask(torch.sigmoid(self.logit), q.shape[-2])
        return ((q @ k.transpose(-1, -2) * mask) @ v) * self.logit[:, None, None]

    def forward(self, q, k, v):
        return checkpoint(self.layer, q, k, v, use_reentrant=False)


def test_a_mask_built_without_gradient_in_a_checkpoint_gives_the_decay_none(inductor):  # noqa: F811
    model = FrozenMask()
    q, k, v = _qkv(8, grad=True)
    _against_float64(model, torch.compile(model, backend="rtp", dynamic=False), [q, k, v])
    ((gm, _),) = inductor
    assert sum(n.target is rtp_decay for n in gm.graph.nodes) == 1  # still read before the call


def test_verify_checks_the_gamma_read_before_the_checkpoint(inductor, monkeypatch):  # noqa: F811
    """The per-region check runs the original body; the rewritten graph reads gamma before the
    call, which verify checks by comparing the two graphs' outputs."""
    from test_checkpoint_regions import Stack

    import rtpcompile.rewrite as rewrite

    model, x = Stack(), _x(9)
    real = rewrite.rtp_decay
    monkeypatch.setattr(rewrite, "rtp_decay", lambda *a: (real(*a)[0] * 0.5, real(*a)[1]))
    wrong = torch.compile(model, backend="rtp", options={"verify": True}, dynamic=False)
    with pytest.raises(RuntimeError, match=r"rtp verify: the rewritten graph \(graph output 0"):
        wrong(x)


class Outside(nn.Module):
    """The mask built once outside and passed into every checkpointed layer (torchscale's
    decoder does this)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x):
        mask = decay_mask(self.layers[0].gamma, x.shape[1])
        for layer in self.layers:
            x = x + checkpoint(layer, x, mask, use_reentrant=False)
        return x


def test_a_mask_passed_into_checkpoints_is_proven_at_a_dynamic_length(inductor):  # noqa: F811
    """The boundary node the mask crosses is an identity for the position rules (it was "not an
    op that keeps a decay a decay" once T was symbolic)."""
    model = Outside()
    compiled = torch.compile(model, backend="rtp", dynamic=True)
    for T in (9, 13):
        for p in model.parameters():
            p.grad = None
        _check_against_float64(model, compiled, _x(T, seed=T))
    assert backend.counters["graphs"] == 1 and backend.counters["regions_claimed"] == 2
    assert [r.claimed for r in explain(model, _x(11)).regions] == [True, True]


class Steps(nn.Module):
    """A recurrent step or a chunk step (one chunk per call, a state in and out) with a learnable
    log-decay, inside a checkpoint or a compile region."""

    def __init__(self, kind: str, wrap: str):
        super().__init__()
        self.kind, self.wrap = kind, wrap
        self.logit = nn.Parameter(torch.logit(1 - 2.0 ** (-2 - torch.arange(H).float())))

    def chunk(self, q, k, v, state):
        C = q.shape[2]
        log_g = nn.functional.logsigmoid(self.logit)[:, None]
        idx = torch.arange(C)
        diff = idx[:, None] - idx[None, :]
        inner = torch.exp(log_g[..., None] * diff.clamp(min=0)) * (diff >= 0)
        cross = (q * torch.exp(log_g * (idx + 1))[..., None]) @ state
        o = (q @ k.transpose(-1, -2) * inner) @ v + cross
        k_decay = torch.exp(log_g * (C - 1 - idx))[..., None]
        new = torch.exp(log_g * C)[..., None] * state + (k * k_decay).transpose(-1, -2) @ v
        return o, new

    def recurrent(self, q, k, v, state):
        new = torch.sigmoid(self.logit)[:, None, None] * state + k.mT @ v
        return q @ new, new

    def forward(self, q, k, v, state, state2=None):
        if self.wrap == "checkpoint":
            return checkpoint(getattr(self, self.kind), q, k, v, state, use_reentrant=False)
        # NOTE: two layers' steps, each with its own state (Dynamo inlines a region called once)
        o, new = _recurrent_step(q, k, v, state, self.logit)
        o2, new2 = _recurrent_step(q, k, v, state2, self.logit)
        return o + o2, new, new2


@torch.compiler.nested_compile_region
def _recurrent_step(q, k, v, state, logit):
    new = torch.sigmoid(logit)[:, None, None] * state + k.transpose(-1, -2) @ v
    return q @ new, new


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_steps_in_a_checkpoint_keep_their_state(inductor, kind):  # noqa: F811
    """The state enters the body through a boundary node and leaves it as the body's output:
    both count as the graph's state input and output (the steps were declined, or claimed as
    their parallel part only)."""
    model = Steps(kind, "checkpoint")
    T = 6 if kind == "chunk" else 1
    inputs = [*_qkv(T), torch.randn(2, H, 4, 5)]
    inputs = [t.requires_grad_() for t in inputs]
    _against_float64(model, torch.compile(model, backend="rtp", dynamic=False), inputs)
    (region,) = explain(model, *[t.detach() for t in inputs]).regions
    assert region.claimed and region.written == f"{kind} step"


def test_a_recurrent_step_in_a_compile_region_is_claimed(aot_eager_graphs):  # noqa: F811
    model = Steps("recurrent", "region")
    inputs = [*_qkv(1), torch.randn(2, H, 4, 5), torch.randn(2, H, 4, 5)]
    with torch.no_grad():
        want = copy.deepcopy(model).double()(*[t.double() for t in inputs])
        got = torch.compile(model, backend="rtp", dynamic=False)(*inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=2e-4, atol=2e-4)
    assert backend.counters["regions_claimed"] == 2
    (gm,) = aot_eager_graphs
    assert [op_calls(body) for body in _bodies(gm)] == [1, 1]  # NOTE: one body, two calls


def test_a_learnable_mask_is_not_built_outside_the_checkpoint(fresh_compile):
    """Built before the call (to read gamma there), a mask that takes a gradient left its
    [H, T, T] intermediates saved for the backward outside the checkpoint (two float32 buffers
    per layer for ``rtpcompile.nn``'s learnable decay); read inside, the forward allocates none
    (the backward still computes the mask's gradient)."""
    from torch._inductor.utils import run_and_get_code

    from rtpcompile.nn import RTPHybridLM

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lm = RTPHybridLM(64, 32, 2, 4, ratio=1.0, learnable_decay=True)

        def forward(self, ids):
            x = self.lm.embed(ids)
            for block in self.lm.blocks:
                x = checkpoint(block, x, None, 0, use_reentrant=False)
            return x

    T = 300
    model = Checkpointed()

    def step():
        out = torch.compile(model, backend="rtp", dynamic=False)(torch.randint(0, 64, (1, T)))
        out.sum().backward()
        return out

    _, (forward, *_) = run_and_get_code(step)
    assert backend.counters["regions_claimed"] == 2
    assert f"(4, {T}, {T})" not in forward
    assert model.lm.blocks[0].mixer.decay_logit.grad.abs().sum() > 0


class CheckpointedRegions(nn.Module):
    """Regional compilation and activation checkpointing together: each layer's forward a
    nested compile region, each layer called through checkpoint."""

    def __init__(self):
        from test_checkpoint_regions import RegionLayer

        super().__init__()
        self.layers = nn.ModuleList(RegionLayer() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + checkpoint(layer, x, use_reentrant=False)
        return x


def test_compile_regions_inside_checkpoints_train(aot_eager_graphs):  # noqa: F811
    """The rewritten region body sits inside a checkpoint's body: its new identifier names that
    path with "_" (a "." crashed AOTAutograd, which registers the identifier as a module name)."""
    model = CheckpointedRegions()
    _check_against_float64(model, torch.compile(model, backend="rtp", dynamic=False), _x(9))
    assert backend.counters["regions_claimed"] == 2
    (gm,) = aot_eager_graphs
    calls = [n for b in _bodies(gm) for n in b.graph.nodes if n.name.startswith("invoke_subgraph")]
    assert calls and all("_rtp_" in n.args[1] and "." not in n.args[1] for n in calls)


@pytest.fixture
def regional_blocks(monkeypatch):
    """``rtpcompile.nn`` with every block's forward a nested compile region."""
    from rtpcompile.nn.block import RTPBlock

    forward = torch.compiler.nested_compile_region(RTPBlock.forward)
    monkeypatch.setattr(RTPBlock, "forward", forward)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_explain_runs_a_model_of_regional_blocks(regional_blocks):
    """Dynamo passes a block's RMSNorm eps to the shared body as a float at the second call and
    as a 0-d tensor at the first; an eager invoke_subgraph failed on it (explain runs the graph),
    explain now runs the bodies itself."""
    from rtpcompile.nn import RTPHybridLM

    torch.manual_seed(0)
    model = RTPHybridLM(64, 32, 3, 4, layout="B")
    ids = torch.randint(0, 64, (2, 13))
    report = explain(model, ids)
    assert [len(r.scope) for r in report.claimed] == [1, 1]
    assert str(report).count("parallel (in compile region)") == 2


def test_a_hybrid_of_regional_blocks_decodes_with_its_cache(regional_blocks):
    """An attention layer stored its concatenated keys through .contiguous(), an alias Dynamo
    refuses to let leave a compile region's body (every backend failed at the first token)."""
    from rtpcompile.nn import RTPHybridLM

    torch.manual_seed(0)
    model = RTPHybridLM(64, 32, 3, 4, layout="B", ratio=0.5)
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        cache, reference = model.new_cache(1), model.new_cache(1)
        for _ in range(3):
            got, want = compiled(ids, cache=cache), model(ids, cache=reference)
            torch.testing.assert_close(got, want)
            ids = want[:, -1:].argmax(-1)
