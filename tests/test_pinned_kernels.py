"""Kernel behaviours no other test pinned down (found by mutation testing the templates).

Each test runs the generated Triton kernels under the interpreter on tiny shapes against a
float64 reference: a row scale read through its strides, stores that stay inside their outputs
(T, K, V not multiples of a block), a gamma far below 1e-30 read as itself, and the float16
split pass's state derivatives kept out of float16's range limit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from rtpcompile import kernels  # noqa: E402
from rtpcompile.kernels import launch  # noqa: E402
from rtpcompile.lowering import reference as ref  # noqa: E402

F64 = torch.float64
# (form, config): every kernel that reads q rows (fused and split chunkwise, parallel, recurrent)
ROW_PASSES = [
    ("chunkwise", {"split": 0}),
    ("chunkwise", {"split": 1}),
    ("parallel", None),
    ("recurrent", None),
]
ROW_IDS = ["chunkwise-fused", "chunkwise-split", "parallel", "recurrent"]


@pytest.fixture(autouse=True)
def _kernels(triton_on_cpu):
    yield


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's largest entry; inf when a is not finite."""
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(("form", "config"), ROW_PASSES, ids=ROW_IDS)
def test_row_scale_is_read_through_its_strides(form, config):
    """A per-row query scale given as a [B, T, H] tensor seen as [B, H, T] (time stride H)."""
    g = torch.Generator().manual_seed(11)
    B, H, T, K, V = 1, 2, 7 if form == "recurrent" else 37, 12, 20
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, K, V))
    rs = (torch.rand(B, T, H, generator=g, dtype=F64) + 0.5).transpose(1, 2)
    assert rs.stride(-1) == H
    gamma = torch.tensor([0.5, 0.95], dtype=F64)
    expect, _ = ref.reference_parallel(q * rs[..., None], k, v, gamma, 0.3)
    p = launch.Pass(form, q.float(), k.float(), v.float(), gamma.float(), 0.3, row_scale=rs.float())
    o, _, _ = launch.run(p, 16, config)
    assert _rel(o, expect) < 2e-4


# NOTE: every gradient (the four-kernel path, chunk_dqk) and d gamma alone (the dq pass split)
@pytest.mark.parametrize("needs", [None, (False, False, False, True, False)], ids=["all", "dgamma"])
def test_float16_split_dgamma_with_state_derivatives_past_65504(needs):
    """float16 split backward: the dq pass's states stay in range while their derivatives in
    gamma (~T times the states) pass 65504; d gamma stays finite and accurate."""
    g = torch.Generator().manual_seed(7)
    B, H, T, K, V = 1, 1, 128, 16, 16
    q = 1e-2 * torch.randn(B, H, T, K, generator=g, dtype=F64)
    k, v = (8 + 4 * torch.rand(B, H, T, d, generator=g, dtype=F64) for d in (K, V))
    do = 1e-2 * torch.randn(B, H, T, V, generator=g, dtype=F64)
    q, k, v, do = (x.half().double() for x in (q, k, v, do))
    gamma, scale = torch.tensor([1.0]), 0.25
    ins = [x.clone().requires_grad_() for x in (q, k, v, gamma.double())]
    o_ref, _ = ref.reference_parallel(*ins, scale)
    expect = torch.autograd.grad((o_ref * do).sum(), ins)
    halves = [x.half() for x in (q, k, v)]
    cfg = {"split": 1}
    _, sf = kernels.triton_forward("chunkwise", *halves, gamma, scale, None, 16, cfg)
    got = kernels.triton_backward(
        "chunkwise", do.half(), None, *halves, gamma, scale, None, sf, 16, cfg, needs=needs
    )
    if needs is None:
        for name, a, b in zip(("dq", "dk", "dv"), got[:3], expect[:3], strict=True):
            assert _rel(a, b) < 3e-3, f"{name}: rel err {_rel(a, b):.2e}"
    else:  # the dq pass alone (it sums d gamma): no dk, dv pass, and dq itself not returned
        assert got[0] is None and got[1] is None and got[2] is None
    assert _rel(got[3], expect[3]) < 1e-3, f"dgamma: rel err {_rel(got[3], expect[3]):.2e}"


@pytest.mark.parametrize(("form", "config"), ROW_PASSES, ids=ROW_IDS)
def test_kernels_store_only_inside_their_outputs(form, config, monkeypatch):
    """Every row, column and state entry a kernel stores lies inside its output tensor: outputs
    that end in NaN-filled spare memory keep it NaN (T, K and V not multiples of a block), and
    forward and backward still match float64."""
    spare = []
    real = launch._outputs

    def canaried(p, spec, rows=True, state=True):
        outs = list(real(p, spec, rows, state))
        for i in (0, 1):  # o, the final state (contiguous: the kernels index them so)
            x = outs[i]
            if x is not None:
                buf = torch.full((x.numel() + 4096,), float("nan"), dtype=x.dtype)
                spare.append(buf[x.numel() :])
                outs[i] = buf[: x.numel()].view(x.shape)
        return tuple(outs)

    monkeypatch.setattr(launch, "_outputs", canaried)
    g = torch.Generator().manual_seed(12)
    B, H, T, K, V = 1, 2, 5 if form == "recurrent" else 37, 12, 20
    q, k, v, do = (torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, K, V, V))
    s0, dsf = (torch.randn(B, H, K, V, generator=g, dtype=F64) for _ in range(2))
    gamma = torch.tensor([0.5, 0.95], dtype=F64)
    ins = [x.clone().requires_grad_() for x in (q, k, v, gamma, s0)]
    o_ref, s_ref = ref.reference_parallel(*ins[:4], 0.3, ins[4])
    expect = torch.autograd.grad((o_ref * do).sum() + (s_ref * dsf).sum(), ins)
    f32 = [x.float() for x in (q, k, v, gamma, s0)]
    o, sf = kernels.triton_forward(form, *f32[:4], 0.3, f32[4], 16, config)
    got = kernels.triton_backward(
        form, do.float(), dsf.float(), *f32[:4], 0.3, f32[4], sf, 16, config
    )
    assert spare and all(bool(s.isnan().all()) for s in spare)
    assert _rel(o, o_ref) < 2e-4 and _rel(sf, s_ref) < 2e-4
    for name, a, b in zip(("dq", "dk", "dv", "dgamma", "ds0"), got, expect, strict=True):
        assert _rel(a, b) < 2e-4, f"{name}: rel err {_rel(a, b):.2e}"


@pytest.mark.parametrize(("form", "config"), ROW_PASSES, ids=ROW_IDS)
def test_tiny_gamma_is_read_as_itself(form, config):
    """gamma = 1e-35 (above float32's smallest normal, 2**-126, where the kernels clamp) decays
    by itself: a row whose own key is 0 gets exactly scale * gamma * (q . k_prev) v_prev."""
    g = torch.Generator().manual_seed(13)
    B, H, T, K, V = 1, 1, 2, 16, 16
    q, k, v, do = (torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, K, V, V))
    k[:, :, 1] = 0
    gamma = torch.tensor([1e-35], dtype=F64)
    ins = [x.clone().requires_grad_() for x in (q, k, v, gamma)]
    o_ref, s_ref = ref.reference_parallel(*ins, 0.3)
    expect = torch.autograd.grad((o_ref * do).sum(), ins)
    f32 = [x.float() for x in (q, k, v, gamma)]
    o, sf = kernels.triton_forward(form, *f32, 0.3, None, 16, config)
    assert o_ref[0, 0, 1].abs().max() < 1e-33  # the decayed term alone
    assert _rel(o[0, 0, 1], o_ref[0, 0, 1]) < 1e-5 and _rel(o, o_ref) < 1e-5
    got = kernels.triton_backward(form, do.float(), None, *f32, 0.3, None, sf, 16, config)
    assert _rel(got[3], expect[3]) < 1e-5, f"dgamma: rel err {_rel(got[3], expect[3]):.2e}"
