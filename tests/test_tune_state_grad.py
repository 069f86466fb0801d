"""The backward's tuning and resource rule cover the final-state gradient, and a tuned config
that Triton cannot launch falls back to the kernels' defaults (docs/autotune.md).

One backward plan serves calls with and without a final-state gradient (``Problem.state_out``),
and with one the parallel kernel stages a [BK, BV] state tile: on sm_90 bfloat16, K = V = 192,
BV = 256, 3 stages uses 262,144 bytes of shared memory (34,816 without), above an H200's 232,448.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from rtpcompile import ops  # noqa: E402
from rtpcompile.kernels import launch  # noqa: E402
from rtpcompile.lowering import custom_ops, dispatch, tune  # noqa: E402
from rtpcompile.lowering import reference as ref  # noqa: E402
from rtpcompile.lowering.plan import Plan, Problem  # noqa: E402

H200_SHARED = 232448  # shared_memory_per_block_optin of an H100/H200


def problem(dtype="bfloat16", K=192, V=192, phase="bwd", has_state=False, device="cuda"):
    return Problem(B=1, H=8, T=256, K=K, V=V, dtype=dtype, device=device, backend="triton",
                   has_state=has_state, phase=phase)  # fmt: skip


def test_backward_is_tuned_with_a_final_state_gradient(triton_on_cpu, monkeypatch):
    """The tuner's backward runs get a dsf, so the dk and dv passes start from a state."""
    seen, specs = [], []
    real_backward, real_choose = dispatch.backward, launch.choose

    def spy(form, do, dsf, *args, **kwargs):
        seen.append(dsf)
        return real_backward(form, do, dsf, *args, **kwargs)

    monkeypatch.setattr(dispatch, "backward", spy)
    monkeypatch.setattr(
        launch, "choose", lambda *a, **kw: specs.append(kw) or real_choose(*a, **kw)
    )
    monkeypatch.setattr(tune, "_time", lambda fn, device: (fn(), 1.0)[1])
    launch._choose.cache_clear()
    p = Problem(B=1, H=2, T=8, K=16, V=16, dtype="float32", device="cpu", backend="triton",
                has_state=False, phase="bwd")  # fmt: skip
    plans = [Plan("parallel", 64, "model")]
    assert tune.benchmark(p, plans)[plans[0]] == 1.0
    assert seen and all(d is not None for d in seen)
    assert all(d.shape == (1, 2, 16, 16) and d.dtype == torch.float32 for d in seen)
    assert all(d.abs().sum() > 0 for d in seen)
    # the dk and dv passes start from the state at position 0
    assert any(kw.get("state_in") and kw.get("state_offset") == 0 for kw in specs)


def test_forward_tuning_passes_no_final_state_gradient():
    assert tune._inputs(problem(device="cpu", phase="fwd", K=16, V=16))["dsf"] is None


@pytest.mark.parametrize(
    "dtype, K, cfg",
    [
        ("bfloat16", 192, {"BV": 256, "num_stages": 3, "num_warps": 8}),
        ("float32", 256, {"BV": 256, "num_stages": 1, "num_warps": 4}),
    ],
)
def test_parallel_state_tile_counts_against_shared_memory(monkeypatch, dtype, K, cfg):
    monkeypatch.setattr(tune, "_shared_memory", lambda device: H200_SHARED)
    listed = lambda p: cfg in [dict(c) for c in tune.triton_configs(p, "parallel", 64)]  # noqa: E731
    fwd = problem(dtype, K, K, phase="fwd")
    assert tune.why_not_fits(fwd, "parallel", 64, cfg) is None and listed(fwd)
    # the backward may get a final-state gradient; a forward may start from a state
    for p in (problem(dtype, K, K), problem(dtype, K, K, phase="fwd", has_state=True)):
        why = tune.why_not_fits(p, "parallel", 64, cfg)
        assert why is not None and "shared memory" in why and not listed(p)


def test_defaults_with_a_state_still_fit():
    """The kernels' default parallel blocks stay within the rule with a state (96 KiB)."""
    from rtpcompile.kernels.spec import default_blocks

    for dtype in ("bfloat16", "float16", "float32"):
        for K in (16, 64, 128, 256):
            d = default_blocks("parallel", K, K, 64, dtype=dtype)
            cfg = {name: d[name] for name in ("BV", "num_warps", "num_stages")}
            assert (
                tune.why_not_fits(problem(dtype, K, K, device="cpu"), "parallel", 64, cfg) is None
            )


class OutOfResources(RuntimeError):  # named like Triton's (triton.runtime.errors)
    pass


TUNED = Plan("chunkwise", 16, "cache", (("BV", 32), ("num_stages", 3), ("num_warps", 8)))


def _refusing(monkeypatch, exc, plan_=TUNED):
    """Plans ``plan_``; the implementation raises ``exc`` whenever it is given a config."""
    configs = []
    monkeypatch.setattr(custom_ops, "_planned", lambda *a, **kw: plan_)
    for name in ("forward", "backward"):
        real = getattr(dispatch, name)

        def run(*args, _real=real, _name=name, **kwargs):
            config = args[8] if _name == "forward" else args[11]
            configs.append((_name, config))
            if config:
                raise exc
            return _real(*args, **kwargs)

        monkeypatch.setattr(dispatch, name, run)
    return configs


def test_tuned_config_out_of_resources_falls_back_to_the_defaults(monkeypatch):
    configs = _refusing(monkeypatch, OutOfResources("out of resource: shared memory, 262144"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    gamma = torch.tensor([0.9, 0.6], dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gamma)]
    with pytest.warns(RuntimeWarning, match=r"BV=32,num_stages=3,num_warps=8\] \(autotune cache"):
        o = ops.retention(*leaves)
        o.sum().backward()
    assert configs == [("forward", TUNED.config), ("forward", ()),
                       ("backward", TUNED.config), ("backward", ())]  # fmt: skip
    r = [x.clone().requires_grad_() for x in (q, k, v, gamma)]
    expected = ref.reference_parallel(*r)[0]
    expected.sum().backward()
    torch.testing.assert_close(o, expected)
    for a, e in zip(leaves, r, strict=True):
        torch.testing.assert_close(a.grad, e.grad)


def test_other_errors_are_not_retried(monkeypatch):
    """Only OutOfResources is retried (a default plan's too: the test below)."""
    q = k = v = torch.ones(1, 1, 4, 8, dtype=torch.float64)
    gamma = torch.tensor([0.9], dtype=torch.float64)
    configs = _refusing(monkeypatch, RuntimeError("kernel bug"))
    with pytest.raises(RuntimeError, match="kernel bug"):
        ops.retention(q, k, v, gamma)
    assert len(configs) == 1


def test_defaults_out_of_resources_fall_back_to_the_smallest_blocks(monkeypatch):
    """The float64 parallel kernel's defaults at K = 256 need more shared memory than an A100
    or an sm_86 GPU gives a block (kernels.aot): a default plan that cannot launch runs once
    more with BV 16 and one stage; if that fails too, its error propagates."""
    monkeypatch.setattr(custom_ops, "_planned", lambda *a, **kw: Plan("parallel", 64, "rule"))
    configs, real = [], dispatch.forward

    def forward(*args, **kwargs):
        configs.append(("forward", args[8]))
        if args[8] != (("BV", 16), ("num_stages", 1)):
            raise OutOfResources("out of resource: shared memory, 196608")
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "forward", forward)
    q = k = v = torch.ones(1, 1, 4, 8, dtype=torch.float64)
    gamma = torch.tensor([0.9], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"with the defaults; running it with \{'BV': 16"):
        o = ops.retention(q, k, v, gamma)
    assert configs == [("forward", ()), ("forward", custom_ops.SMALLEST_CONFIG)]
    torch.testing.assert_close(o, ref.reference_parallel(q, k, v, gamma)[0])
    monkeypatch.setattr(custom_ops, "SMALLEST_CONFIG", (("BV", 32),))  # NOTE: fails as well
    configs.clear()
    with pytest.raises(OutOfResources, match="196608"), pytest.warns(RuntimeWarning):
        ops.retention(q, k, v, gamma)
    assert configs == [("forward", ()), ("forward", (("BV", 32),))]
