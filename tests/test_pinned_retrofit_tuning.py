"""Behaviours of retrofit discovery, rotary reading, autotuning and the aten cost model that no
other test pinned (found by mutation testing: each test fails on a plausible one-line bug)."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from torch import nn

from rtpcompile.convert.find import find_attention
from rtpcompile.convert.rules import applies_rotary, llama_rotary, rotate
from rtpcompile.lowering import plan, tune
from rtpcompile.lowering.plan import Plan, Problem


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    for name in ("RTP_AUTOTUNE", "RTP_CHUNK_SIZE", "RTP_FORM", "RTP_KERNELS", "RTP_TUNE_CONFIGS"):
        monkeypatch.delenv(name, raising=False)
    plan.reset()
    yield
    plan.reset()


# ----------------------------------------------------------------------------- discovery


class _Attn(nn.Module):
    """A Llama-style attention (q/k/v/o projections, head_dim) with a Hugging Face-like config."""

    def __init__(self, layer_idx: int, config, heads: int = 2, kv: int = 2, dim: int = 4):
        super().__init__()
        self.head_dim, self.layer_idx, self.config = dim, layer_idx, config
        self.q_proj = nn.Linear(8, heads * dim)
        self.k_proj = nn.Linear(8, kv * dim)
        self.v_proj = nn.Linear(8, kv * dim)
        self.o_proj = nn.Linear(heads * dim, 8)


def _windows(config, layers: int = 2) -> list[int | None]:
    model = nn.ModuleList(_Attn(i, config) for i in range(layers))
    return [site.sliding_window for site in find_attention(model)]


def test_only_sliding_layer_types_get_the_window():
    """A layer typed other than sliding (Llama4's chunked attention) keeps no sliding window."""
    config = types.SimpleNamespace(
        sliding_window=8, layer_types=["sliding_attention", "chunked_attention"]
    )
    assert _windows(config) == [8, None]


def test_a_disabled_sliding_window_is_ignored():
    """Qwen2's ``use_sliding_window=False`` config keeps an unused window: no window is read."""
    off = types.SimpleNamespace(sliding_window=4, use_sliding_window=False)
    on = types.SimpleNamespace(sliding_window=4, use_sliding_window=True)
    assert _windows(off) == [None, None]
    assert _windows(on) == [4, 4]


class _Generic(nn.Module):
    def __init__(self, heads: int, kv: int, dim: int = 4):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv, dim
        self.q_proj = nn.Linear(8, heads * dim)
        self.k_proj = nn.Linear(8, kv * dim)
        self.v_proj = nn.Linear(8, kv * dim)
        self.out_proj = nn.Linear(heads * dim, 8)


def test_generic_heads_must_be_a_multiple_of_kv_heads():
    """A predicate-picked module whose query heads do not group over its K/V heads is refused."""
    model = nn.Sequential(_Generic(heads=6, kv=4))
    with pytest.raises(ValueError, match="cannot determine the head geometry"):
        find_attention(model, predicate=lambda name, m: isinstance(m, _Generic))
    ok = find_attention(nn.Sequential(_Generic(6, 3)), lambda n, m: isinstance(m, _Generic))
    assert (ok[0].num_heads, ok[0].num_kv_heads, ok[0].head_dim) == (6, 3, 4)


# ----------------------------------------------------------------------------- rotary reading


def test_rotary_of_odd_width_is_refused():
    """cos/sin of an odd width cannot rotate pairs of channels: ValueError, not a wrong rotation."""
    q = k = torch.randn(1, 2, 3, 8)
    cos = sin = torch.ones(1, 3, 3)
    with pytest.raises(ValueError, match="expected an even width"):
        rotate(llama_rotary, q, k, cos, sin)


def apply_rotary_pos_emb(q, k, cos, sin):  # the name the converter looks for in forward
    return q, k


class _NotEqualGuard(nn.Module):
    def __init__(self, every: int):
        super().__init__()
        self.rope_every = every

    def forward(self, q, k, cos, sin):
        if self.rope_every != 0:
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k


def test_rotary_guard_with_not_equal_is_read():
    """``if self.x != 0:`` around the rotary call is evaluated as written (not as ==)."""
    assert applies_rotary(_NotEqualGuard(1)) is True
    assert applies_rotary(_NotEqualGuard(0)) is False


# ----------------------------------------------------------------------------- autotuning


def _problem(backend="aten", device="cpu", **changes) -> Problem:
    p = Problem(1, 2, 64, 16, 16, "float32", device, backend, False)
    return dataclasses.replace(p, **changes)


def test_timing_is_the_best_of_the_runs(monkeypatch):
    """A candidate's time is its fastest run after the warm-up, not its last one."""
    durations = iter([0.003, 0.001] + [0.005] * 20)  # each timed run, in seconds
    clock = {"now": 0.0, "start": True}

    def perf_counter():
        if not clock["start"]:
            clock["now"] += next(durations)
        clock["start"] = not clock["start"]
        return clock["now"]

    monkeypatch.setattr(tune, "time", types.SimpleNamespace(perf_counter=perf_counter))
    ms = tune._time(lambda: None, torch.device("cpu"), budget=0.05)
    assert ms == pytest.approx(1.0)


def test_interpreter_searches_the_quick_space_only_on_cpu(monkeypatch):
    """Under TRITON_INTERPRET the auto space is "quick" for CPU problems and "full" elsewhere."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tune.config_space(_problem("triton", "cpu")) == "quick"
    assert tune.config_space(_problem("triton", "cuda:0")) == "full"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert tune.config_space(_problem("triton", "cpu")) == "full"


def test_too_large_aten_parallel_candidate_is_not_run(monkeypatch):
    """On aten, a parallel candidate whose T x T temporaries exceed memory scores inf unrun."""
    p = _problem(T=30000, K=1, V=1, H=1)
    assert tune._parallel_bytes(p) > tune.MACHINES["aten"].memory

    def never(fn, device):
        raise AssertionError("the oversized parallel candidate was run")

    monkeypatch.setattr(tune, "_time", never)
    assert tune.benchmark(p, [Plan("parallel", 64)]) == {Plan("parallel", 64): math.inf}


def test_out_of_resources_errors_skip_the_candidate():
    """Triton's "out of resources" (by message) is a resource error: skipped, not fatal."""
    err = RuntimeError("triton: out of resources: shared memory, Required: 1, Hardware limit: 0")
    assert tune._is_resource_error(err)
    assert not tune._is_resource_error(RuntimeError("index out of range"))


def test_empty_problem_is_not_tuned(monkeypatch):
    """A call with nothing to compute (T = 0) is never benchmarked nor stored."""

    def never(p, plans):
        raise AssertionError("an empty problem was benchmarked")

    monkeypatch.setattr(tune, "benchmark", never)
    assert tune.autotune(_problem(T=0), {"spec": "empty"}) is None


def test_one_chunk_split_variants_are_not_searched(monkeypatch):
    """With T no longer than one split chunk, the full space adds no split=1 variant."""
    monkeypatch.setenv("RTP_TUNE_CONFIGS", "full")
    one = _problem("triton", T=32, K=32, V=32)
    assert all(dict(c).get("split") != 1 for c in tune.triton_configs(one, "chunkwise", 32))
    two = _problem("triton", T=64, K=32, V=32)
    assert any(dict(c).get("split") == 1 for c in tune.triton_configs(two, "chunkwise", 64))


# ----------------------------------------------------------------------------- aten cost model


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_aten_backward_costs_three_forwards(form):
    """The aten model prices a backward as three forwards (docs/autotune.md)."""
    p = _problem(T=256)
    c = Plan(form, 64)
    bwd = dataclasses.replace(p, phase="bwd")
    assert tune.estimate(bwd, c) == pytest.approx(3 * tune.estimate(p, c), rel=1e-12)


def test_aten_chunkwise_pays_for_the_padded_last_chunk():
    """A partial last chunk costs a whole chunk: T = 65 at C = 64 is priced like T = 128."""
    c = Plan("chunkwise", 64)
    padded = tune.estimate(_problem(T=65), c)
    assert padded == pytest.approx(tune.estimate(_problem(T=128), c), rel=1e-12)
    assert padded > tune.estimate(_problem(T=64), c)


def test_aten_parallel_memory_limit_counts_the_batch():
    """The T x T temporaries scale with B * H: a large batch alone makes parallel infeasible."""
    one = _problem(B=1, H=1, T=5000)
    many = dataclasses.replace(one, B=8)
    c = Plan("parallel", 64)
    assert tune.estimate(one, c) < math.inf
    assert tune.estimate(many, c) == math.inf
    assert tune.model_choice(many).form == "chunkwise"


# ----------------------------------------------------------------------------- fused families


class _PhiLike(nn.Module):
    """Phi's layout: q_proj/k_proj/v_proj and a ``dense`` output projection."""

    def __init__(self, heads: int, kv: int, dim: int = 4):
        super().__init__()
        self.head_dim = dim
        self.q_proj = nn.Linear(8, heads * dim)
        self.k_proj = nn.Linear(8, kv * dim)
        self.v_proj = nn.Linear(8, kv * dim)
        self.dense = nn.Linear(heads * dim, 8)


def test_phi_layout_heads_must_group_over_kv_heads():
    """A Phi-style attention whose query heads do not group over its K/V heads stays attention."""
    from rtpcompile.convert.find import survey

    sites, skipped = survey(nn.Sequential(_PhiLike(heads=6, kv=4)))
    assert sites == [] and len(skipped) == 1 and "do not fit the phi layout" in skipped[0].reason
    sites, skipped = survey(nn.Sequential(_PhiLike(heads=6, kv=3)))
    assert [(s.family, s.num_heads, s.num_kv_heads) for s in sites] == [("phi", 6, 3)]


def test_fused_family_layer_keeps_the_original_score_scale():
    """A converted Phi-3 layer's softmax heads score with the original's ``scaling``."""
    transformers = pytest.importorskip("transformers")
    from rtpcompile.convert import retrofit

    torch.manual_seed(0)
    cfg = transformers.Phi3Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.Phi3ForCausalLM(cfg).eval()
    attn = model.model.layers[0].self_attn
    attn.scaling = 0.125  # head_dim 16: the default would be 0.25
    handle = retrofit(model, ratio=1.0)
    layer = model.get_submodule(handle.sites[0].name)
    assert layer.attn_scale == 0.125


class _IntSoftcap(nn.Module):
    def __init__(self, cap):
        super().__init__()
        self.cap = cap

    def forward(self, q, k, v, attention_interface):
        return attention_interface(q, k, v, softcap=self.cap)


def test_integer_softcap_is_read():
    """A soft cap written as an int (``softcap=50``) is applied as 50.0, not dropped."""
    from rtpcompile.convert.rules import attention_softcap

    assert attention_softcap(_IntSoftcap(50)) == 50.0
    assert attention_softcap(_IntSoftcap(30.0)) == 30.0
    assert attention_softcap(_IntSoftcap(0)) is None


# ----------------------------------------------------------------------------- cost model rates


def test_float64_dots_run_at_the_fp64_rate():
    """A compute-bound float64 kernel is priced at the FP64 rate, float32 at the FMA rate."""
    m = tune.MACHINES["triton"]
    k = tune.KernelCost("fused", programs=m.sms, flops=1e12, bytes=0.0, steps=0)
    assert tune.kernel_seconds(k, m, "float64", m.sms) == pytest.approx(
        1e12 / m.fp64_flops + m.launch
    )
    assert tune.kernel_seconds(k, m, "float32", m.sms) == pytest.approx(
        1e12 / m.fma_flops + m.launch
    )


def test_aten_temporaries_beyond_the_cache_cost_extra(monkeypatch):
    """On aten, temporaries larger than the warm cache add the fresh-memory cost."""
    p, c = _problem(T=1024, H=8, K=64, V=64), Plan("chunkwise", 64)
    priced = tune.estimate(p, c)
    monkeypatch.setitem(
        tune.MACHINES, "aten", dataclasses.replace(tune.MACHINES["aten"], cache=math.inf)
    )
    assert priced > tune.estimate(p, c) * 1.01
