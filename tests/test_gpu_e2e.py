"""End to end on a GPU: the default hybrid model compiled with backend "rtp" on CUDA tensors.

Run: ``pytest -m gpu tests/test_gpu_e2e.py -q --tb=short -rA``. Failures name the stage that
raised (explain, compiled forward, compiled backward) or the tensors whose error is out of
bounds, worst first, so a cut-off log still shows the diagnosis in its summary line.

Tolerances: eager and compiled are both compared with a float64 copy of the model run eagerly on
the same device; the compiled error may be a few times the eager one plus a dtype floor (see
``tests/test_e2e_triton_cpu.py``, which runs the same check on CPU through the interpreter).
Comparing bfloat16 compiled with bfloat16 eager directly is not meaningful: both round, in
different orders (Inductor keeps float32 intermediates), and they differ by ~10 % of a gradient's
largest entry while each is within a few % of the float64 result.
"""

from __future__ import annotations

import pytest
import torch

import rtpcompile
from rtpcompile import ops
from rtpcompile.nn import default_model

pytest.importorskip("triton", reason="the Triton kernels need triton")

from test_e2e_triton_cpu import (  # noqa: E402
    check_errors,
    check_op_on_model_layouts,
    training_errors,
)

pytestmark = pytest.mark.gpu


def _stage(name, fn, *args):
    """Run one stage; an exception is re-raised with the stage's name in its first line."""
    try:
        return fn(*args)
    except Exception as exc:
        raise RuntimeError(f"{name} raised {type(exc).__name__}: {str(exc)[:400]}") from exc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_training_matches_eager(dtype):
    torch.manual_seed(0)
    model = default_model().to("cuda", dtype)
    ids = torch.randint(0, 256, (2, 700), device="cuda")
    report = _stage("explain", rtpcompile.explain, model, ids)
    assert len(report.claimed) == 4, str(report)
    compiled = torch.compile(model, backend="rtp", options={"strict": True})
    rows = _stage(
        "training (eager, compiled, float64 reference)", training_errors, model, compiled, ids
    )
    print(f"\n{dtype}: relative error vs float64 (eager, compiled)")
    for name, eager, comp in rows:
        print(f"  {name:45s} {eager:.3e} {comp:.3e}")
    check_errors(rows, dtype)


@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_on_model_layouts_on_gpu(dtype, with_state):
    """The op alone on the model's strides (kernel bugs show here, backend bugs above)."""
    check_op_on_model_layouts(dtype, with_state, device="cuda", T=700)


def test_compiled_prefill_and_decode_match_full_forward():
    torch.manual_seed(0)
    model = default_model().to("cuda").eval()
    compiled = torch.compile(model, backend="rtp")
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1)
        steps = [compiled(ids[:, :290], cache=cache)[:, -1]]
        for t in range(290, 299):
            steps.append(compiled(ids[:, t : t + 1], cache=cache)[:, -1])
    got = torch.stack(steps, dim=1)
    torch.testing.assert_close(got, full[:, 289:299], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("T", [1, 300], ids=["decode", "prefill"])
def test_op_replays_from_a_cuda_graph(T):
    """The op does no host synchronisation, so a decode step (or a prefill) captured in a CUDA
    graph replays with new inputs and matches eager: how a serving loop removes launch cost."""
    torch.manual_seed(0)
    B, H, K, V = 2, 4, 48, 80
    q, k = (torch.randn(B, H, T, K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, T, V, device="cuda", dtype=torch.bfloat16)
    gamma = ops.retention_init_decay(H).cuda()
    s0 = torch.randn(B, H, K, V, device="cuda")

    def step():
        return torch.ops.rtp.retention_fwd(q, k, v, gamma, K**-0.5, s0, "auto", 0)

    with torch.no_grad():
        step()  # compile the kernels and plan outside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o, sf = step()
        for x in (q, k, v, s0):
            x.copy_(torch.randn_like(x))
        graph.replay()
        want_o, want_sf = step()
    torch.testing.assert_close(o, want_o, rtol=0, atol=0)
    torch.testing.assert_close(sf, want_sf, rtol=0, atol=0)


def test_compiled_decode_under_reduce_overhead_matches_full_forward():
    """``mode="reduce-overhead"`` passes through the rtp backend to Inductor (CUDA graphs): the
    prefill and every decode step match the full forward, and Inductor skipped no graph (a
    mutated cache input or a CPU tensor in the rtp op's graph would make it run the steps
    eagerly, silently: the host cost the mode exists to remove). ``TORCH_LOGS=cudagraphs``
    prints the skip reasons."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = default_model().to("cuda").eval()
    compiled = torch.compile(model, backend="rtp", mode="reduce-overhead")
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    counters.clear()
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1)
        # NOTE: graph outputs are overwritten by the next replay: keep copies of the logits,
        # and the cache takes copies of its new tensors (without own_tensors() the second decode
        # step fails reading a state the replay overwrote, with backend="inductor" too)
        steps = [compiled(ids[:, :290], cache=cache)[:, -1].clone()]
        cache.own_tensors()
        for t in range(290, 299):
            steps.append(compiled(ids[:, t : t + 1], cache=cache)[:, -1].clone())
            cache.own_tensors()
    inductor = dict(counters["inductor"])
    skips = inductor.get("cudagraph_skips", 0)
    print("\ncudagraph skips:", skips)
    got = torch.stack(steps, dim=1)
    torch.testing.assert_close(got, full[:, 289:299], rtol=2e-3, atol=2e-3)
    assert skips == 0, (
        f"Inductor skipped CUDA graphs {skips} times under reduce-overhead (rerun with "
        f"TORCH_LOGS=cudagraphs for the reasons); inductor counters: {inductor}"
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_op_on_a_device_that_is_not_current():
    """Triton launches on the current device: the op must make its tensors' device current, or
    an eager call on cuda:1 (a model placed there, nothing compiled) runs on cuda:0."""
    torch.manual_seed(0)
    B, H, T, K, V = 2, 4, 130, 48, 80
    q, k = (torch.randn(B, H, T, K, device="cuda:1") for _ in range(2))
    v = torch.randn(B, H, T, V, device="cuda:1", requires_grad=True)
    gamma = ops.retention_init_decay(H).to("cuda:1")
    torch.cuda.set_device(0)
    o = ops.retention(q, k, v, gamma, form="chunkwise")
    o.sum().backward()
    want = ops.retention(q.double(), k.double(), v.double(), gamma, form="parallel")
    assert o.device == torch.device("cuda", 1) and v.grad.device == o.device
    torch.testing.assert_close(o.double(), want, rtol=1e-3, atol=1e-3)
    torch.cuda.synchronize(1)


def _retrofitted_llama(device):
    """A tiny random Llama (2 layers, grouped K/V) with its first layer converted, float32."""
    pytest.importorskip("transformers", reason="retrofit of Hugging Face models needs transformers")
    from test_convert_generate import ids, tiny

    model = tiny("llama", dtype=torch.float32).to(device)
    handle = rtpcompile.retrofit(model, ratio=0.5)
    return model, handle, ids(2, 40, seed=4).to(device)


def retrofit_reduce_overhead_errors(device):
    """Max abs error of the retrofitted model's logits compiled with backend "rtp" under
    ``mode="reduce-overhead"`` against eager (two calls: the second replays the graph), and
    the number of graphs Inductor ran without CUDA graphs."""
    from torch._dynamo.utils import counters

    from rtpcompile import backend

    model, _, x = _retrofitted_llama(device)
    counters.clear()
    backend.counters.clear()
    with torch.no_grad():
        want = model(x, use_cache=False).logits
        compiled = torch.compile(model, backend="rtp", mode="reduce-overhead")
        got = [compiled(x, use_cache=False).logits.clone() for _ in range(2)]
    claimed = backend.counters["regions_claimed"]
    skips = counters["inductor"].get("cudagraph_skips", 0)
    return max((g - want).abs().max().item() for g in got), claimed, skips


def retrofit_generate_tokens(device):
    """Greedy tokens of the retrofitted model: eager ``generate``, and ``generate`` with its
    forward compiled in place with backend "rtp" (docs/retrofit.md), both on a retention cache."""
    model, handle, x = _retrofitted_llama(device)
    gen = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(x))
    with torch.no_grad():
        eager = model.generate(x, past_key_values=handle.new_cache(), **gen)
        model.forward = torch.compile(model.forward, backend="rtp")
        compiled = model.generate(
            x, past_key_values=handle.new_cache(), disable_compile=True, **gen
        )
    return eager, compiled


def test_retrofitted_model_under_reduce_overhead():
    """A Hugging Face model with converted layers, compiled under reduce-overhead on CUDA: the
    converted layer's op is claimed, the logits equal eager and no graph skipped CUDA graphs."""
    err, claimed, skips = _stage("compiled retrofit", retrofit_reduce_overhead_errors, "cuda")
    assert claimed >= 1, "the converted layer's op call was not claimed"
    assert err <= 1e-4, f"compiled logits differ from eager by {err:.3e}"
    assert skips == 0, f"Inductor skipped CUDA graphs {skips} times (TORCH_LOGS=cudagraphs)"


def test_retrofitted_model_generates_the_same_tokens_compiled():
    eager, compiled = _stage("compiled generate", retrofit_generate_tokens, "cuda")
    assert torch.equal(eager, compiled), f"eager {eager.tolist()} vs compiled {compiled.tolist()}"
