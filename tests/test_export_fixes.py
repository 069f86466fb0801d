"""Regression tests for export and context-parallel bugs found by testing.

gamma = 0 gave NaN in the export decompositions and in context parallelism (log 0 = -inf, and
0 * -inf); export_program replaced a MultiScaleRetention subclass's own forward and dropped
module hooks (as did context_parallel_forward); exported parameter names differed from the
model's; a dynamic-T program with GroupNorm failed inside torch-mlir; ``rtpcompile export
--form recurrent`` ignored --seq-len; context parallelism graph-broke on ``Tensor.item()``
(with a warning) inside torch.compile.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rtpcompile import ops
from rtpcompile.export import export_program
from rtpcompile.export.decompose import decomposition_table
from rtpcompile.lowering.reference import reference_recurrent
from rtpcompile.nn import RTPHybridLM
from rtpcompile.nn.retention import MultiScaleRetention

needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)


def _qkv(B=1, H=2, T=10, K=4, V=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for d in (K, K, V)]


def _reference(q, k, v, gamma, s0=None, scale=0.5):
    """Outputs, final state and gradients of sum(o * w) + sum(s * ws), in float64."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gamma)]
    o, s = reference_recurrent(*leaves, scale=scale, initial_state=s0)
    g = torch.Generator().manual_seed(1)
    w, ws = torch.randn(o.shape, generator=g, dtype=o.dtype), torch.randn(s.shape, generator=g)
    ((o * w).sum() + (s * ws.to(s.dtype)).sum()).backward()
    return o.detach(), s.detach(), [t.grad for t in leaves], w, ws.to(s.dtype)


# -- 1. gamma = 0 ---------------------------------------------------------------------------------


class _OpsModel(torch.nn.Module):
    def __init__(self, gamma):
        super().__init__()
        self.register_buffer("gamma", gamma)

    def forward(self, q, k, v):
        return ops.retention(q, k, v, self.gamma, scale=0.5)


@pytest.mark.parametrize("form", ["chunkwise", "parallel", "recurrent"])
def test_gamma_zero_exports_finite_and_exact(form):
    q, k, v = _qkv(T=11)
    gamma = torch.tensor([0.0, 0.9], dtype=torch.float64)
    program = export_program(_OpsModel(gamma), q, k, v, form=form, chunk_size=4)
    want, *_ = _reference(q, k, v, gamma)
    torch.testing.assert_close(program.module()(q, k, v), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["chunkwise", "parallel", "recurrent"])
def test_gamma_zero_decomposition_gradients(form):
    q, k, v = _qkv(T=9)
    gamma = torch.tensor([0.0, 0.8], dtype=torch.float64)
    o_ref, s_ref, grads_ref, w, ws = _reference(q, k, v, gamma)
    fn = decomposition_table(form, 4)[torch.ops.rtp.retention_fwd.default]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gamma)]
    o, s = fn(*leaves, 0.5, None, "auto", 0)
    ((o * w).sum() + (s * ws).sum()).backward()
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    for name, got, want in zip("qkvg", (t.grad for t in leaves), grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"d{name}")


def _underflowed_decay_model():
    torch.manual_seed(0)
    m = RTPHybridLM(40, 24, 1, 2, ratio=1.0, learnable_decay=True).eval()
    with torch.no_grad():
        m.blocks[0].mixer.decay_logit[0] = -120.0  # exp(logsigmoid(-120)) == 0 in float32
    assert m.blocks[0].mixer.gamma[0].item() == 0.0
    return m


@pytest.mark.parametrize("form", ["chunkwise", "parallel"])
def test_model_with_underflowed_decay_exports(form):
    model = _underflowed_decay_model()
    ids = torch.randint(0, 40, (1, 13), generator=torch.Generator().manual_seed(0))
    got = export_program(model, ids, form=form, chunk_size=4).module()(ids)
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids), rtol=1e-4, atol=1e-4)


# -- 2, 3, 4. subclasses, hooks, names -----------------------------------------------------------


class _ScaledRetention(MultiScaleRetention):
    def forward(self, x, state=None, offset=0, return_state=False):
        out = super().forward(x, state=state, offset=offset, return_state=return_state)
        return (out[0] * 2.0 + x, out[1]) if return_state else out * 2.0 + x


class _OneMixer(torch.nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.mix = mixer

    def forward(self, x):
        return self.mix(x)


def test_subclass_with_its_own_forward_is_exported_as_written():
    torch.manual_seed(0)
    net = _OneMixer(_ScaledRetention(16, 2)).double().eval()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"mix \(_ScaledRetention\).*detect=True"):
        program = export_program(net, x, form="chunkwise", chunk_size=4)
    torch.testing.assert_close(program.module()(x), net(x), rtol=1e-12, atol=1e-12)
    assert "forward" not in vars(net.mix)


def _hooked_model():
    torch.manual_seed(0)
    m = RTPHybridLM(32, 16, 1, 2, ratio=1.0).double().eval()
    mixer = m.blocks[0].mixer
    mixer.register_forward_hook(lambda mod, args, out: out * 0.5)
    mixer.register_forward_pre_hook(lambda mod, args: (args[0] * 1.5, *args[1:]))
    return m


def test_export_keeps_module_hooks_and_restores_the_module():
    model = _hooked_model()
    ids = torch.randint(0, 32, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    for form in ("chunkwise", "parallel"):
        got = export_program(model, ids, form=form, chunk_size=4).module()(ids)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mixer = model.blocks[0].mixer
    assert type(mixer) is MultiScaleRetention and "forward" not in vars(mixer)


def test_program_parameter_names_are_the_models():
    torch.manual_seed(0)
    model = RTPHybridLM(vocab_size=40, dim=24, num_layers=1, num_heads=2, ratio=1.0).eval()
    ids = torch.randint(0, 40, (1, 12))
    program = export_program(model, ids, form="chunkwise")
    assert set(program.state_dict) == set(model.state_dict())
    program.module().load_state_dict(model.state_dict())


class _Paper(torch.nn.Module):
    """Retention written in the parallel form: found by detection (the capture path)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.register_buffer("log_gamma", torch.log(torch.tensor([0.97, 0.6])))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.proj(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
        n = torch.arange(T)
        diff = n[:, None] - n[None, :]
        mask = torch.exp(self.log_gamma[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        return ((q @ k.transpose(-1, -2)) * 0.35 * mask) @ v


def test_detection_program_parameter_names_are_the_models():
    pytest.importorskip("rtpcompile.backend", reason="the rtp backend is not available")
    torch.manual_seed(0)
    model = _Paper().eval()
    x = torch.randn(1, 20, 16)
    program = export_program(model, x, form="chunkwise", chunk_size=8)
    assert set(program.state_dict) == set(model.state_dict())
    module = program.module()
    module.load_state_dict(model.state_dict())
    torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)


# -- context parallelism: gamma = 0, hooks (one spawn) -------------------------------------------


def _cp_worker(rank, world, q, k, v, gamma, w, ws, lengths, ids):
    from rtpcompile.distributed import (
        context_parallel_forward,
        context_parallel_retention,
        shard_sequence,
    )

    a, n = sum(lengths[:rank]), lengths[rank]
    leaves = [x.narrow(2, a, n).clone().requires_grad_() for x in (q, k, v)]
    g = gamma.clone().requires_grad_()
    o, end = context_parallel_retention(*leaves, g, scale=0.5, chunk_size=4)
    loss = (o * w.narrow(2, a, n)).sum() + ((end * ws).sum() if rank == world - 1 else 0)
    loss.backward()
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(context_parallel_retention, backend="eager")
    with torch.no_grad():
        o_compiled, _ = compiled(*(x.narrow(2, a, n) for x in (q, k, v)), gamma, scale=0.5)
    with torch.no_grad():
        hooked = context_parallel_forward(_hooked_model(), shard_sequence(ids, rank, [5, 6]))
        underflowed = context_parallel_forward(
            _underflowed_decay_model(), shard_sequence(ids, rank, [5, 6])
        )
    return {
        "o": o.detach(),
        "end": end.detach(),
        "grads": [t.grad for t in (*leaves, g)],
        "hooked": hooked,
        "underflowed": underflowed,
        "compiled": o_compiled,
        "graph_breaks": list(counters["graph_break"]),
    }


@needs_gloo
def test_context_parallel_gamma_zero_and_hooks():
    from rtpcompile.distributed import run_local

    q, k, v = _qkv(T=12, K=4, V=4)
    gamma = torch.tensor([0.0, 0.9], dtype=torch.float64)
    o_ref, s_ref, grads_ref, w, ws = _reference(q, k, v, gamma)
    ids = torch.randint(0, 32, (1, 11), generator=torch.Generator().manual_seed(0))
    lengths = [5, 7]
    res = run_local(_cp_worker, 2, args=(q, k, v, gamma, w, ws, lengths, ids))
    torch.testing.assert_close(torch.cat([r["o"] for r in res], 2), o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res[-1]["end"], s_ref, rtol=1e-12, atol=1e-12)
    for i, name in enumerate(("dq", "dk", "dv")):
        got = torch.cat([r["grads"][i] for r in res], 2)
        torch.testing.assert_close(got, grads_ref[i], rtol=1e-10, atol=1e-10, msg=name)
    dgamma = sum(r["grads"][3] for r in res)
    torch.testing.assert_close(dgamma, grads_ref[3], rtol=1e-10, atol=1e-10, msg="dgamma")
    with torch.no_grad():
        want_hooked = _hooked_model()(ids)
        want_underflowed = _underflowed_decay_model()(ids)
    got_hooked = torch.cat([r["hooked"] for r in res], 1)
    torch.testing.assert_close(got_hooked, want_hooked, rtol=1e-12, atol=1e-12)
    got_underflowed = torch.cat([r["underflowed"] for r in res], 1)
    torch.testing.assert_close(got_underflowed, want_underflowed, rtol=1e-4, atol=1e-4)
    # inside torch.compile: same result, and no "Graph break from Tensor.item()" warning
    got_compiled = torch.cat([r["compiled"] for r in res], 2)
    torch.testing.assert_close(got_compiled, o_ref, rtol=1e-12, atol=1e-12)
    for r in res:
        assert not any("item()" in reason for reason in r["graph_breaks"]), r["graph_breaks"]


# -- 6. dynamic-T MLIR import, 7. CLI ------------------------------------------------------------


def test_group_norm_rewrite_matches_aten():
    from rtpcompile.export.mlir import _group_norm

    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.float16, 2e-3)):
        x = (torch.randn(7, 12, 3, generator=g) * 3 + 1).to(dtype)
        weight, bias = (
            torch.randn(12, generator=g).to(dtype),
            torch.randn(12, generator=g).to(dtype),
        )
        want = torch.nn.functional.group_norm(x.double(), 4, weight.double(), bias.double())
        got = _group_norm(x, 4, weight, bias, 1e-5)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_dynamic_length_program_imports_to_mlir():
    from rtpcompile.export import have_torch_mlir, import_program

    if not have_torch_mlir():
        pytest.skip("torch-mlir is not installed")
    torch.manual_seed(0)
    model = RTPHybridLM(vocab_size=40, dim=24, num_layers=1, num_heads=2, ratio=1.0).eval()
    T = torch.export.Dim("T", min=2, max=4096)
    ids = torch.randint(0, 40, (1, 70))
    program = export_program(model, ids, chunk_size=16, dynamic_shapes=({1: T},))
    text = str(import_program(program, "torch"))
    assert "%arg0: !torch.vtensor<[1,?],si64>" in text


def test_cli_recurrent_export_refuses_seq_len(capsys):
    from rtpcompile.cli import main

    assert main(["export", "--form", "recurrent", "--seq-len", "64", "--program"]) == 2
    assert "--seq-len 64 does not apply to --form recurrent" in capsys.readouterr().err


def test_refused_mixer_leaves_no_module_swapped():
    from rtpcompile.distributed.sequence_parallel import _sharded_mixers, _ShardInfo

    class NotShardableRetention(torch.nn.Module):
        def forward(self, x):
            return x

    model = torch.nn.Sequential(MultiScaleRetention(8, 2), NotShardableRetention())
    with pytest.raises(ValueError, match="NotShardableRetention"):
        with _sharded_mixers(model, _ShardInfo(None, [3], 0)):
            pass
    assert "forward" not in vars(model[0])
    net = torch.nn.Sequential(MultiScaleRetention(16, 2), _ScaledRetention(16, 2))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="boom"):
        from rtpcompile.export import retention_via_ops

        with retention_via_ops(net):
            assert "forward" in vars(net[0])
            raise RuntimeError("boom")
    assert "forward" not in vars(net[0]) and "forward" not in vars(net[1])


# ---------------------------------------------- detection export: outputs, attributes


class _ParallelForm(torch.nn.Module):
    """Retention in the parallel form (found by detection); ``plain``: γ a plain attribute."""

    def __init__(self, plain: bool = False):
        super().__init__()
        gamma = torch.tensor([0.9, 0.6])
        if plain:
            self.gamma = gamma
        else:
            self.register_buffer("gamma", gamma)

    def retention(self, q, k, v):
        n = torch.arange(q.shape[2])
        diff = (n[:, None] - n[None, :]).float()
        mask = (self.gamma[:, None, None] ** diff).masked_fill(diff < 0, 0)
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 * mask) @ v


class _DictOut(_ParallelForm):
    def forward(self, q, k, v):
        return {"o": self.retention(q, k, v), "step": 3}


class _NestedOut(_ParallelForm):
    def forward(self, q, k, v):
        o = self.retention(q, k, v)
        return o, (o.sum(-1), q)


class _OneTuple(_ParallelForm):
    def forward(self, q, k, v):
        return (self.retention(q, k, v),)


class _AttrOut(_ParallelForm):
    def __init__(self):
        super().__init__(plain=True)

    def forward(self, q, k, v):
        return self.retention(q, k, v), self.gamma


@pytest.mark.parametrize("cls", [_DictOut, _NestedOut, _OneTuple, _AttrOut])
def test_a_detected_model_exports_with_its_own_output_structure(cls):
    """The replay returned the graph's flat outputs: ``{"o": o}`` came back a bare tensor and
    ``(o, (a, b))`` a flat 3-tuple until 2026-11-25."""
    q, k, v = _qkv(T=5)
    model = cls()
    want = model(q, k, v)
    got = export_program(model, q, k, v, form="chunkwise", chunk_size=2).module()(q, k, v)
    assert torch.utils._pytree.tree_structure(got) == torch.utils._pytree.tree_structure(want)
    for a, b in zip(*map(torch.utils._pytree.tree_leaves, (got, want)), strict=True):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert a == b


def test_a_plain_tensor_attribute_is_read_as_model_state():
    """``self.gamma = torch.tensor(...)`` (not a buffer) was refused as "neither an argument
    nor a parameter or buffer" although plain ``torch.export`` takes it."""
    q, k, v = _qkv(T=6)
    model = _ParallelForm(plain=True)
    model.forward = model.retention
    program = export_program(model, q, k, v, form="chunkwise", chunk_size=4)
    torch.testing.assert_close(program.module()(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-5)
