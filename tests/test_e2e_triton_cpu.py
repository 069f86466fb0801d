"""The GPU end-to-end training check, on CPU: the generated Triton kernels under the interpreter.

``tests/test_gpu_e2e.py`` compiles the default hybrid model with backend "rtp" on CUDA and
compares training gradients with eager. Here the same path runs on CPU with
``RTP_KERNELS=triton TRITON_INTERPRET=1``: the rtp op launches the generated kernels (forward and
the backward's passes) on the model's real layouts -- q/k rotated, v a [B, T, H, V] view of
its projection, a strided ``do`` coming back from the group norm, a materialised zero gradient
for the unused final state -- at T not a multiple of the chunk. float16 stands in for bfloat16
(``tl.dot`` in bfloat16 is broken in the interpreter).

Every run is compared with a float64 copy of the model run eagerly: the compiled model's error
must stay within a few times the eager model's own error (plus a small floor), per output and per
parameter gradient, so the tolerance follows the dtype instead of being guessed. One retention
block compiled and trained runs in the default tier, as does the op on the model's layouts
against the float64 reference; the three-layer models are ``slow`` (Inductor's compile of each
takes 15-30 s on two cores).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rtpcompile import ops
from rtpcompile.backend import counters as backend_counters
from rtpcompile.lowering import reference
from rtpcompile.nn import RTPHybridLM, default_config

pytest.importorskip("triton", reason="the Triton kernels need triton")


# NOTE: the error of the compiled model may be up to FACTOR times the eager model's (both round,
# in different orders: on CPU in bfloat16, Inductor's own attention backward alone reaches ~2x)
# plus a floor per dtype, relative to the largest reference value of each tensor.
FACTOR = 3
FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture
def triton_cpu(monkeypatch, kernel_launches):
    """Route the rtp op to the Triton kernels under the interpreter; count the launches."""
    monkeypatch.setenv("RTP_KERNELS", "triton")
    return kernel_launches


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def training_errors(model, compiled, ids) -> list[tuple[str, float, float]]:
    """(name, eager error, compiled error) for the logits and every parameter gradient.

    Errors are max |x - ref| / max |ref| against a float64 copy of ``model`` run eagerly.
    """
    ref_model = copy.deepcopy(model).double()
    runs = []
    for fn, m in ((ref_model, ref_model), (model, model), (compiled, model)):
        m.zero_grad(set_to_none=True)
        logits = fn(ids)
        loss = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), ids.flatten())
        loss.backward()
        grads = {n: p.grad.detach().double().clone() for n, p in m.named_parameters()}
        runs.append((logits.detach().double(), grads))
    (ref, ref_g), (eager, eager_g), (comp, comp_g) = runs
    rows = [("logits", _rel_err(eager, ref), _rel_err(comp, ref))]
    for name, want in ref_g.items():
        rows.append((name, _rel_err(eager_g[name], want), _rel_err(comp_g[name], want)))
    return rows


def check_errors(rows, dtype) -> None:
    """Fail with one line per offending tensor (worst first), dtype and bound included."""
    floor = FLOOR[dtype]
    bad = [(n, e, c) for n, e, c in rows if not c <= FACTOR * e + floor]
    bad.sort(key=lambda r: r[2] - FACTOR * r[1], reverse=True)
    lines = [
        f"{n}: compiled err {c:.3e} > {FACTOR} * eager err {e:.3e} + {floor:g}" for n, e, c in bad
    ]
    assert not bad, f"{dtype}: {len(bad)} of {len(rows)} tensors off\n" + "\n".join(lines[:10])


def small_default(dtype, layers: int, learnable_decay=False) -> RTPHybridLM:
    """The default model's layer shapes (dim 256, 8 heads, K 32, V 64), fewer layers."""
    cfg = dataclasses.replace(default_config(), num_layers=layers, learnable_decay=learnable_decay)
    torch.manual_seed(0)
    return RTPHybridLM.from_config(cfg).to(dtype)


def _compiled_training(dtype, T, layers, learnable_decay, launches):
    model = small_default(dtype, layers, learnable_decay)
    retention_layers = model.layer_types.count("retention")
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    before = backend_counters["regions_claimed"]
    compiled = torch.compile(model, backend="rtp", options={"strict": True})
    rows = training_errors(model, compiled, ids)
    assert backend_counters["regions_claimed"] - before == retention_layers
    directions = {spec.direction for spec in launches}
    assert directions == {"fwd", "bwd"}, f"the Triton kernels did not run both ways: {directions}"
    check_errors(rows, dtype)
    if learnable_decay:
        names = [n for n, _, _ in rows if n.endswith("decay_logit")]
        assert len(names) == retention_layers, names


# NOTE: ~25 s on the 2-core CI machine, most of it Inductor's compile of the rest of the block
def test_compiled_training_on_triton_kernels(triton_cpu):
    """One retention block of the default model, learnable decays, T = 70 (chunk 64 + 6)."""
    _compiled_training(torch.float32, 70, 1, learnable_decay=True, launches=triton_cpu)


@pytest.mark.slow
@pytest.mark.parametrize(("T", "layers"), [(70, 3), (130, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_compiled_training_on_triton_kernels_longer(triton_cpu, dtype, T, layers):
    """Retention then attention layers, as in the default model (float16 for bfloat16)."""
    _compiled_training(dtype, T, layers, learnable_decay=True, launches=triton_cpu)


# ------------------------------------------------------------------ the op alone, model layouts


OP_TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def _model_layout_inputs(dtype, T, device="cpu", seed=0):
    """q, k [B, H, T, K] slices of one fused projection; v a [B, T, H, V] view as [B, H, T, V]."""
    g = torch.Generator().manual_seed(seed)
    B, H, K, V, dim = 2, 8, 32, 64, 256
    x = torch.randn(B, T, dim, generator=g, dtype=torch.float64)
    w_qk = torch.randn(2 * H * K, dim, generator=g, dtype=torch.float64) / dim**0.5
    w_v = torch.randn(H * V, dim, generator=g, dtype=torch.float64) / dim**0.5
    qk = (x @ w_qk.T).to(device, dtype)
    q = qk[..., : H * K].view(B, T, H, K).transpose(1, 2)
    k = qk[..., H * K :].view(B, T, H, K).transpose(1, 2)
    v = (x @ w_v.T).to(device, dtype).view(B, T, H, V).transpose(1, 2)
    return q, k, v


def check_op_on_model_layouts(dtype, with_state: bool, device="cpu", T=70) -> None:
    """Output, final state and every gradient of the public op against the float64 reference.

    Inputs have the model's strides, and the output is read through a [B, T, H*V] view (as the
    group norm reads it), so ``do`` comes back with [B, T, H, V] strides.
    """
    q, k, v = (t.detach().requires_grad_() for t in _model_layout_inputs(dtype, T, device))
    gamma = ops.retention_init_decay(8, device=device).requires_grad_()
    gen = torch.Generator().manual_seed(3)
    s0 = None
    if with_state:
        s0 = torch.randn(2, 8, 32, 64, generator=gen).to(device).requires_grad_()
    o, sf = ops.retention(
        q, k, v, gamma, form="chunkwise", initial_state=s0, output_final_state=True
    )
    w = torch.randn(2, T, 8 * 64, generator=gen).to(device)
    loss = (o.transpose(1, 2).reshape(2, T, -1).float() * w).sum() + sf.sum() * 0.5
    leaves = [t for t in (q, k, v, gamma, s0) if t is not None]
    got = torch.autograd.grad(loss, leaves)
    r_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rq, rk, rv, rg = r_leaves[:4]
    rs0 = r_leaves[4] if with_state else None
    ro, rsf = reference.reference_parallel(rq, rk, rv, rg, 32**-0.5, rs0)
    r_loss = (ro.transpose(1, 2).reshape(2, T, -1) * w.double()).sum() + rsf.sum() * 0.5
    want = torch.autograd.grad(r_loss, r_leaves)
    names = ["o", "final state", "dq", "dk", "dv", "dgamma", "ds0"]
    errors = {
        name: _rel_err(a.detach(), b.detach())
        for name, a, b in zip(names, [o, sf, *got], [ro, rsf, *want], strict=False)
    }
    bad = {n: e for n, e in errors.items() if not e <= OP_TOL[dtype]}
    assert not bad, f"{dtype} on {device}: relative errors over {OP_TOL[dtype]:g}: {bad}"


@pytest.mark.parametrize(
    ("dtype", "with_state"),
    [
        (torch.float32, True),
        (torch.float16, False),
        (torch.float32, False),
        (torch.float16, True),
    ],
    ids=["float32-state", "float16", "float32", "float16-state"],
)
def test_op_on_model_layouts_matches_reference(triton_cpu, dtype, with_state):
    check_op_on_model_layouts(dtype, with_state)
    assert triton_cpu, "the Triton kernels did not run"
