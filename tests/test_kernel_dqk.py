"""The split chunkwise backward: the dq pass's states, the dv pass, one kernel for dq and dk.

Runs under the Triton interpreter on CPU. ``tests/test_kernel_split.py`` checks the forced-split
backward (this path) against the float64 reference on its awkward sizes and by hypothesis;
here: that the path is taken (four kernels, not six) exactly when both passes split, that it
agrees with the three-pass backward, that the reversed passes' end-padded chunks line up with
the forward ones, and the dq/dk kernel's own blocks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from conftest import clean_rtp_env  # noqa: E402
from test_kernels import check, make  # noqa: E402

from rtpcompile import kernels  # noqa: E402
from rtpcompile.kernels import backward, launch  # noqa: E402
from rtpcompile.kernels.spec import choose, default_blocks, dqk_blocks  # noqa: E402
from rtpcompile.lowering import cost, tune  # noqa: E402
from rtpcompile.lowering.plan import Plan, Problem  # noqa: E402

SPLIT = {"split": 1}


@pytest.fixture(autouse=True)
def _interpreter(request, tmp_path, monkeypatch):
    clean_rtp_env(monkeypatch, tmp_path / "cache")
    if "gpu" in request.keywords:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _stages(form, *args, cfg=SPLIT) -> list[str]:
    """The kernels (form.stage/direction) one backward call would launch."""
    with launch.recording() as seen:
        kernels.triton_backward(form, *args, 16, cfg)
    return [k.spec.short().split()[0] for k in seen]


def _inputs(T=45, K=24, V=40, dtype=torch.float32, state=True, device="cpu"):
    _, (q, k, v, g, s0) = make(2, 2, T, K, V, dtype, device, state=state, btHd=True, seed=3)
    o, sf = kernels.triton_forward("chunkwise", q, k, v, g, 0.3, s0, 16, SPLIT)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(device, dtype)
    dsf = torch.randn(sf.shape, generator=gen).to(device)
    return do, dsf, q, k, v, g, 0.3, s0, sf


def test_split_backward_is_four_kernels_and_fused_stays_three_passes():
    args = _inputs()
    assert _stages("chunkwise", *args) == [
        "chunkwise.states/fwd",  # the dq pass's states (do, v, k)
        "chunkwise.states/bwd",  # the dv pass (k, q, do), its states kept for dk
        "chunkwise.output/bwd",
        "chunkwise.dqk/bwd",
    ]
    assert (
        _stages("chunkwise", *args, cfg={"split": 0}) == ["chunkwise/fwd"] + ["chunkwise/bwd"] * 2
    )


STATES = [(False, False), (True, True), (True, False), (False, True)]


# NOTE: every state combination at T = 45 (the last chunk partial), both at T = 1 and 64
@pytest.mark.parametrize(
    "T,state,dsf", [(45, *c) for c in STATES] + [(1, True, True), (64, True, True)]
)
def test_dqk_path_equals_the_three_passes(T, state, dsf, monkeypatch):
    """The same gradients as six split launches (the dk pass's own states, dq and dk apart), to
    float32 rounding: d gamma, dq, dk summed in another order, the dk states transposed."""
    _four_equals_six(monkeypatch, _inputs(T=T, state=state), dsf, 1e-5)


def _four_equals_six(monkeypatch, inputs, dsf: bool, eps: float, chunk: int = 16) -> None:
    do, dsf_, q, k, v, g, scale, s0, sf = inputs
    args = (do, dsf_ if dsf else None, q, k, v, g, scale, s0, sf, chunk, SPLIT)
    four = kernels.triton_backward("chunkwise", *args)
    with monkeypatch.context() as m:
        m.setattr(backward, "_split_passes", lambda *a: None)
        six = kernels.triton_backward("chunkwise", *args)
    assert (four[4] is None) == (six[4] is None) == (s0 is None)
    for a, b, name in zip(four, six, ("dq", "dk", "dv", "dgamma", "ds0"), strict=True):
        if b is not None:
            a, b = a.double(), b.double()
            tol = eps * (b.abs().max().item() + 1e-6)
            torch.testing.assert_close(a, b, rtol=eps, atol=tol, msg=name)


def test_dqk_path_with_two_k_blocks_and_k_not_a_power_of_two(monkeypatch):
    """K = 40 in float32 is two 32-wide K blocks of the dq/dk kernel (the second partial), each
    recomputing the scores and writing its own d gamma partials; V = 24 one partial V step."""
    _four_equals_six(monkeypatch, _inputs(T=37, K=40, V=24), True, 1e-5)


def test_dqk_rejects_state_buffers_of_another_chunking():
    _, (q, k, v, g, _) = make(1, 2, 40, 8, 8, torch.float32)
    hq = torch.zeros(2, 2, 8, 8)  # two chunk states, where T = 40 in 16-row chunks has three
    with pytest.raises(ValueError, match=r"hq holds 2 chunk states, expected 3"):
        launch.run_dqk(q, k, v, v, g, 0.5, (hq, hq), (hq, hq), 1, 16, SPLIT)


def test_reversed_split_pass_with_every_feature_matches_a_direct_sum():
    """A time-reversed split pass with a ones column, row scales, row dots and a state at position
    0, T not a multiple of the chunk (so pad rows lead its first chunk), against the float64 sum
    it stands for: o_t = scale sum_{s>=t} gamma^(s-t) (r_t . w_s) [u_s, 1]
    + state_scale gamma^(T-1-t) r_t S0 (t physical; the logical time is T - 1 - t)."""
    B, H, T, K, V, scale, state_scale = 1, 2, 37, 12, 20, 0.4, 1.5
    _, (q, k, v, g, _) = make(B, H, T, K, V, torch.float32, seed=11)
    gen = torch.Generator().manual_seed(12)
    s0 = torch.randn(B, H, K, V + 1, generator=gen)
    x = torch.rand(B, H, T, generator=gen) + 0.5
    r = torch.randn(B, H, T, V + 1, generator=gen)
    p = launch.Pass("chunkwise", q, k, v, g, scale, reverse=True, s0=s0, state_offset=0,
                    state_scale=state_scale, row_dot_with=r, row_scale=x,
                    extra_value_column=True)  # fmt: skip
    o, _, part = launch.run(p, 16, SPLIT)
    qd, kd = (q.double() * x.double()[..., None]), k.double()
    gd = g.double().requires_grad_()
    ud = torch.cat([v.double(), torch.ones(B, H, T, 1, dtype=torch.float64)], -1)
    t = torch.arange(T, dtype=torch.float64)
    lag = t[None, :] - t[:, None]  # s - t
    decay = torch.where(lag >= 0, gd[:, None, None] ** lag.clamp(min=0), 0.0)  # [H, T, T]
    want = scale * torch.einsum("bhtk,bhsk,hts,bhsv->bhtv", qd, kd, decay, ud)
    want += state_scale * (gd[:, None] ** (T - 1 - t))[None, :, :, None] * (qd @ s0.double())
    want_o = want.detach()
    torch.testing.assert_close(o.double(), want_o, rtol=1e-5, atol=1e-5 * want_o.abs().max().item())
    # the row dots: sum_t <r_t, d o_t / d gamma> (forward mode, the reversed pass's logical time)
    want_dg = torch.autograd.grad((want * r.double()).sum(), gd)[0]
    got = part.sum((0, 1, 3)).double()
    torch.testing.assert_close(got, want_dg, rtol=1e-4, atol=1e-4 * want_dg.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("K,V", [(128, 64), (256, 256)])
def test_gpu_dqk_path_equals_the_three_passes(K, V, dtype, monkeypatch):
    """Compiled for the GPU, bfloat16 included (the interpreter cannot run its tl.dot): within 2%
    of the largest entry of the three-pass backward (bfloat16 rounds at 0.4%), 0.1% in float32,
    at T = 3000 (47 chunks, the last partial)."""
    inputs = _inputs(T=3000, K=K, V=V, dtype=dtype, device="cuda")
    # NOTE: the kernels actually launched (launch.recording() would launch nothing): the
    # split path must run its dq/dk kernel here, or four and six are the same three passes
    launched = []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda spec, *a: launched.append(spec) or real(spec, *a))
    _four_equals_six(monkeypatch, inputs, True, 2e-2 if dtype == torch.bfloat16 else 1e-3, 64)
    stages = [spec.stage for spec in launched]
    four = stages[: stages.index("dqk") + 1] if "dqk" in stages else stages
    assert four == ["states", "states", "output", "dqk"], stages
    assert stages[len(four) :] == ["states", "output"] * 3, stages  # the six: three split passes


def test_a_pass_that_would_not_split_keeps_the_three_passes():
    """K = 256 splits the dv pass (K = 256) but not the dq pass (K = V = 16): no shared states,
    so the backward runs its three passes, each as the rule says, and stays exact."""
    args = _inputs(T=70, K=256, V=16, dtype=torch.float16, state=False)
    stages = _stages("chunkwise", *args, cfg=None)
    assert "chunkwise.dqk/bwd" not in stages and "chunkwise.output/bwd" in stages
    check("chunkwise", 1, 1, 70, 256, 16, torch.float16, False, True, chunk=64)


def test_reversed_chunks_are_the_forward_chunks_from_the_end():
    """A reversed split pass with T not a multiple of the chunk: its first chunk is the partial
    last one of the forward (pad rows first), so its stored states are those of the forward's
    chunk boundaries."""
    _, (q, k, v, g, _) = make(1, 2, 45, 8, 12, torch.float32, seed=5)
    p = launch.Pass("chunkwise", q, k, v, g, 0.5, reverse=True)
    (h, _), _ = launch.chunk_states(p, 16, SPLIT)
    assert h.shape == (2, 3, 8, 12)  # 45 rows: chunks of 16, 16, 13
    # reversed chunk 1 (rows 31..16) starts after the 13 rows 44..32: the state of rows t >= 32
    # held at row 32, the last the pass read (the forward's convention, mirrored)
    w = g.double()[:, None] ** torch.arange(0, 13, dtype=torch.float64)  # gamma^(t - 32)
    want = torch.einsum("ht,htk,htv->hkv", w, k[0, :, 32:].double(), v[0, :, 32:].double())
    torch.testing.assert_close(h[:, 1].double(), want, rtol=1e-5, atol=1e-5)
    assert not h[:, 0].any()  # nothing enters the first reversed chunk (no state)


def test_dqk_blocks_step_over_v():
    """V is the dq/dk kernel's reduction: its step is half V's block (at least two loop steps
    from V = 32 up), whatever BV the tuner picked for the other passes."""
    spec = choose("chunkwise", "bwd", 128, 64, torch.bfloat16, torch.bfloat16, 64,
                  {"split": 1, "BV": 128}, stage="dqk")  # fmt: skip
    assert (spec.BV, spec.BKC, spec.BT, spec.num_warps) == (32, 64, 64, 8)
    # with d gamma's terms (a third state tile and a fourth accumulator) the step is 16
    spec = choose("chunkwise", "bwd", 128, 64, torch.bfloat16, torch.bfloat16, 64,
                  {"split": 1, "BV": 128}, stage="dqk", row_dot=True)  # fmt: skip
    assert (spec.BV, spec.BKC, spec.BT, spec.num_warps) == (16, 64, 64, 8)
    for V, BV in ((16, 16), (32, 16), (80, 64), (256, 64)):
        assert dqk_blocks(default_blocks("chunkwise", 64, V, 64, True), V)["BV"] == BV
    wide = dqk_blocks(default_blocks("chunkwise", 64, 64, 64, True, dtype="float32"), 64)
    assert (wide["BT"], wide["BKC"], wide["num_warps"]) == (32, 32, 8)


def test_cost_model_and_resource_rule_know_the_dqk_kernel(monkeypatch):
    p = Problem(4, 16, 4096, 128, 128, "bfloat16", "cpu", "triton", False, phase="bwd")
    names = [k.name for k in cost._triton_kernels(p, Plan("chunkwise", 64, config=(("split", 1),)))]
    assert names == ["states", "states", "output", "dqk"]
    fused = cost._triton_kernels(p, Plan("chunkwise", 64, config=(("split", 0),)))
    assert [k.name for k in fused] == ["fused"] * 3
    # 64 KiB of shared memory: the output stage pipelines 56 KiB, the dq/dk kernel's do, v and
    # two state tiles per V step 64 KiB plus q and k after the loop
    monkeypatch.setattr(tune, "_shared_memory", lambda device: 65536)
    cfg = {"BV": 64, "num_warps": 8, "num_stages": 2, "split": 1}
    why = tune.why_not_fits(p, "chunkwise", 64, cfg)
    assert why is not None and why.startswith("dq/dk kernel: 81920 bytes of shared memory")
    assert tune.why_not_fits(p, "chunkwise", 64, {**cfg, "num_stages": 1}) is None
    assert tune.why_not_fits(dataclasses.replace(p, phase="fwd"), "chunkwise", 64, cfg) is None
