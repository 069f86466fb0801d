"""Reference modules (rtpcompile.nn): retention forms agree, the hybrid cache decodes exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpcompile.nn import (
    CausalSelfAttention,
    HybridCache,
    MultiScaleRetention,
    RTPBlock,
    RTPConfig,
    RTPHybridLM,
    default_config,
    retnet_decay,
)

F64 = torch.float64


# -- a naive, independent MSR: complex rotation, token-by-token recurrence ----------------------


def _rotate_complex(x: torch.Tensor, offset: int, base: float) -> torch.Tensor:
    """x [B, T, H, D] times e^{i n theta_j}, channel j and j + D/2 as one complex number."""
    D = x.shape[-1]
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
    theta = base ** (-torch.arange(0, D, 2, dtype=F64) / D)
    n = torch.arange(x.shape[1], dtype=F64) + offset
    z = z * torch.exp(1j * n[:, None] * theta[None, :])[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def naive_msr(m: MultiScaleRetention, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    B, T, _ = x.shape
    H, K, V = m.num_heads, m.head_dim_k, m.head_dim_v
    q = (x @ m.q_proj.weight.T).view(B, T, H, K)
    k = (x @ m.k_proj.weight.T).view(B, T, H, K)
    v = (x @ m.v_proj.weight.T).view(B, T, H, V)
    if m.rotary:
        q, k = _rotate_complex(q, offset, m.rope_base), _rotate_complex(k, offset, m.rope_base)
    gamma = m.gamma.to(F64)
    state = torch.zeros(B, H, K, V, dtype=F64)
    ys = []
    for t in range(T):
        for h in range(H):
            outer = k[:, t, h, :, None] * v[:, t, h, None, :]
            state[:, h] = gamma[h] * state[:, h] + outer
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state) * K**-0.5)
    y = torch.stack(ys, dim=1)  # [B, T, H, V]
    if m.group_norm is not None:
        mean = y.mean(-1, keepdim=True)
        var = y.var(-1, unbiased=False, keepdim=True)
        y = (y - mean) / torch.sqrt(var + m.group_norm.eps)
        y = y.reshape(B, T, H * V) * m.group_norm.weight + m.group_norm.bias
    y = y.reshape(B, T, H * V)
    if m.g_proj is not None:
        y = F.silu(x @ m.g_proj.weight.T) * y
    return y @ m.out_proj.weight.T


def _msr(seed: int = 0, **kwargs) -> MultiScaleRetention:
    torch.manual_seed(seed)
    kwargs.setdefault("dim", 16)
    kwargs.setdefault("num_heads", 2)
    return MultiScaleRetention(**kwargs).to(F64)


# -- MultiScaleRetention -------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 7, 16], ids=lambda t: f"T{t}")
@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # K=8, V=16
        {"head_dim_k": 6, "head_dim_v": 10},
        {"head_dim_v": 8, "gate": False, "group_norm": False},
        {"rotary": False, "num_heads": 3, "dim": 12},
    ],
    ids=["default", "K6V10", "plain", "norot-H3"],
)
def test_parallel_equals_naive_recurrence(T, kwargs):
    m = _msr(**kwargs)
    torch.manual_seed(1)
    x = torch.randn(2, T, m.dim, dtype=F64)
    torch.testing.assert_close(m(x), naive_msr(m, x), rtol=1e-10, atol=1e-10)


def test_offset_shifts_positions():
    m = _msr()
    x = torch.randn(1, 5, m.dim, dtype=F64)
    torch.testing.assert_close(m(x, offset=11), naive_msr(m, x, offset=11), rtol=1e-10, atol=1e-10)


@settings(deadline=None, max_examples=25)
@given(T=st.integers(2, 24), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_split_and_continue_from_state(T, frac, seed):
    m = _msr(seed, head_dim_k=4, head_dim_v=6, num_heads=3, dim=12)
    split = 1 + int(frac * (T - 2))
    x = torch.randn(2, T, m.dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    full, full_state = m(x, return_state=True)
    y1, s1 = m(x[:, :split], return_state=True)
    y2, s2 = m(x[:, split:], state=s1, offset=split)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, full_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "dtype,state_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (F64, F64)],
    ids=["f32", "bf16", "f64"],
)
def test_state_dtype_and_shape(dtype, state_dtype):
    m = MultiScaleRetention(16, 2, head_dim_v=12).to(dtype)
    x = torch.randn(3, 5, 16).to(dtype)
    y, s = m(x, return_state=True)
    assert y.dtype == dtype and s.dtype == state_dtype and s.shape == (3, 2, 8, 12)
    y2, s2 = m(x[:, :1], state=s, offset=5)
    assert y2.dtype == dtype and s2.dtype == state_dtype


def test_decay_buffer_is_retnet_decay():
    m = MultiScaleRetention(32, 4)
    torch.testing.assert_close(m.gamma.double(), retnet_decay(4), rtol=1e-6, atol=0)
    assert "log_gamma" in dict(m.named_buffers())


def test_learnable_decay_gets_gradient():
    m = _msr(learnable_decay=True)
    x = torch.randn(2, 9, m.dim, dtype=F64)
    m(x).square().sum().backward()
    grad = m.decay_logit.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(m.gamma.detach(), retnet_decay(2), rtol=1e-8, atol=0)


def test_long_sequence_decay_stays_finite():
    m = MultiScaleRetention(8, 1, rotary=False)
    x = torch.randn(1, 1500, 8)
    assert torch.isfinite(m(x)).all()


# -- blocks and the hybrid model -----------------------------------------------------------------


def _tiny_lm(layout: str, ratio: float, **kw) -> RTPHybridLM:
    torch.manual_seed(0)
    return RTPHybridLM(
        vocab_size=40, dim=32, num_layers=4, num_heads=4, layout=layout, ratio=ratio, **kw
    ).to(F64)


LAYOUT_CASES = [
    ("A", 0.5),
    ("A", 0.75),
    ("B", 0.5),
    ("B", 1.0),
    ("B", 0.0),
    ("C", 0.5),
    ("C", 0.25),
]


@pytest.mark.parametrize("layout,ratio", LAYOUT_CASES, ids=lambda v: str(v))
def test_prefill_then_decode_matches_full_forward(layout, ratio):
    model = _tiny_lm(layout, ratio).eval()
    ids = torch.randint(0, 40, (2, 13), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    cache = model.new_cache(2)
    logits = [model(ids[:, :6], cache=cache)]
    sizes = [cache.nbytes()]
    for t in range(6, 13):
        logits.append(model(ids[:, t : t + 1], cache=cache))
        sizes.append(cache.nbytes())
    assert cache.seq_len == 13
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-9, atol=1e-10)
    _check_cache_sizes(model, sizes)


def _check_cache_sizes(model: RTPHybridLM, sizes: list[dict]) -> None:
    """Retention state bytes never change; KV bytes grow by one position per decoded token."""
    cfg = model.config
    head_dim = cfg.dim // cfg.num_heads
    for i, kind in enumerate(model.layer_types):
        per_step = [s["layers"][i] for s in sizes]
        assert all(d["kind"] == kind for d in per_step)
        states = {d["state"] for d in per_step}
        assert len(states) == 1
        assert (states.pop() > 0) == (kind != "attention")
        kv = [d["kv"] for d in per_step]
        if kind == "retention":
            assert kv == [0] * len(kv)
        else:
            att_heads = cfg.num_heads - model.config.layer_plan()[i][1]
            step = 2 * 2 * att_heads * head_dim * 8  # K and V, batch 2, float64
            assert [b - a for a, b in zip(kv, kv[1:], strict=False)] == [step] * (len(kv) - 1)
    assert sizes[-1]["total"] == sizes[-1]["state"] + sizes[-1]["kv"]


@pytest.mark.parametrize("layout", ["A", "B", "C"])
def test_chunked_prefill_matches_full_forward(layout):
    """Multi-token chunks continue from the cache (recurrent retention, offset causal mask)."""
    model = _tiny_lm(layout, 0.5).eval()
    ids = torch.randint(0, 40, (1, 11), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(1)
    # a one-token prefill, then chunks of 5 and 5 tokens continuing from the cache
    parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 1), (1, 6), (6, 11))]
    torch.testing.assert_close(torch.cat(parts, dim=1), model(ids), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "layout,ratio,expected",
    [
        ("A", 2 / 3, ["attention"] * 2 + ["retention"] * 4),
        ("B", 2 / 3, ["retention"] * 4 + ["attention"] * 2),
        ("B", 0.5, ["retention"] * 3 + ["attention"] * 3),
        ("C", 0.5, ["hybrid"] * 6),
        ("C", 1.0, ["retention"] * 6),
        ("C", 0.0, ["attention"] * 6),
    ],
)
def test_layer_types(layout, ratio, expected):
    model = RTPHybridLM(16, 16, 6, 4, layout=layout, ratio=ratio)
    assert model.layer_types == expected


def test_hybrid_layer_head_split_and_cache_kind():
    model = RTPHybridLM(16, 32, 1, 8, layout="C", ratio=0.25)
    mixer = model.blocks[0].mixer
    assert mixer.retention.num_heads == 2 and mixer.attention.num_heads == 6
    cache = model.new_cache(1)
    assert isinstance(cache, HybridCache) and cache[0].kind == "hybrid"
    assert cache[0].state is not None and cache[0].keys is None


def test_default_config_and_model_shapes():
    cfg = default_config()
    assert (cfg.vocab_size, cfg.dim, cfg.num_layers, cfg.num_heads, cfg.layout) == (
        256,
        256,
        6,
        8,
        "B",
    )
    model = RTPHybridLM.from_config(RTPConfig(dim=32, num_heads=4, num_layers=3))
    assert model.layer_types == ["retention"] * 2 + ["attention"]
    assert model(torch.randint(0, 256, (2, 5))).shape == (2, 5, 256)


def test_untied_head_and_layernorm_gelu():
    model = _tiny_lm("B", 0.5, tie_embeddings=False, norm="layernorm", ffn="gelu")
    assert model.lm_head is not None
    ids = torch.randint(0, 40, (1, 7))
    cache = model.new_cache(1)
    out = torch.cat(
        [model(ids[:, :3], cache=cache)]
        + [model(ids[:, t : t + 1], cache=cache) for t in range(3, 7)],
        dim=1,
    )
    torch.testing.assert_close(out, model(ids), rtol=1e-9, atol=1e-10)


def test_generate_greedy_with_and_without_cache_agree():
    model = _tiny_lm("C", 0.5).eval()
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(5))
    with_cache = model.generate_greedy(prompt, 8)
    without = model.generate_greedy(prompt, 8, cache=False)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without) and torch.equal(with_cache[:, :5], prompt)


def test_model_trains():
    torch.manual_seed(0)
    model = RTPHybridLM(32, 32, 2, 4, layout="B", ratio=0.5, learnable_decay=True)
    ids = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert model.blocks[0].mixer.decay_logit.grad is not None
    assert losses[0] == pytest.approx(math.log(32), rel=0.1)


# -- bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: RTPHybridLM(10, 30, 2, 4), "multiple of 4, got dim=30"),
        (lambda: RTPHybridLM(10, 32, 2, 4, layout="D"), r"\('A', 'B', 'C'\), got 'D'"),
        (lambda: RTPHybridLM(10, 32, 2, 4, ratio=1.5), r"\[0, 1\], got 1.5"),
        (lambda: RTPHybridLM(10, 32, 2, 4, ratio=-0.1), r"\[0, 1\], got -0.1"),
        (lambda: RTPHybridLM(10, 32, 2, 4, dropout=0.1), r"unknown option.*dropout.*valid"),
        (lambda: RTPHybridLM(10, 32, 0, 4), "num_layers must be a positive int, got 0"),
        (lambda: RTPHybridLM(10, 32, 2, 4, norm="batch"), r"'rmsnorm', 'layernorm'\), got"),
        (lambda: MultiScaleRetention(30, 4), "multiple of 4, got dim=30"),
        (lambda: MultiScaleRetention(12, 4), "even head_dim_k, got 3"),
        (lambda: RTPBlock(16, 2, mixer="mamba"), r"mixer must be one of .*got 'mamba'"),
        (lambda: RTPBlock(16, 2, retention_heads=1), "for mixer='hybrid' only"),
        (lambda: RTPHybridLM(10, 32, 2, 4, ffn_mult="2"), "ffn_mult must be a finite number"),
        (lambda: RTPHybridLM(10, 32, 2, 4, rope_base=math.inf), "rope_base must be a finite"),
        (lambda: RTPHybridLM(10, 32, 2, 4, learnable_decay="no"), "True or False, got 'no'"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_raise():
    m = MultiScaleRetention(16, 2)
    with pytest.raises(ValueError, match=r"expected state of shape \(1, 2, 8, 16\), got"):
        m(torch.randn(1, 3, 16), state=torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"expected x of shape \[B, T, 16\], got \(3, 16\)"):
        m(torch.randn(3, 16))
    model = RTPHybridLM(10, 16, 2, 2)
    with pytest.raises(ValueError, match="built for batch 2, got input_ids with batch 1"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=model.new_cache(2))
    with pytest.raises(ValueError, match="integer input_ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"T >= 1 \(a prompt to continue\), got shape \(2, 0\)"):
        model.generate_greedy(torch.zeros(2, 0, dtype=torch.long), 3)
    att = CausalSelfAttention(16, 2)
    with pytest.raises(
        ValueError, match=r"past keys must have shape \[1, 2, P, 8\], got \(1, 2, 4, 4\)"
    ):
        att(torch.randn(1, 3, 16), past=(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 8)))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got 2.5"):
        model.generate_greedy(torch.zeros(2, 3, dtype=torch.long), 2.5)


@pytest.mark.parametrize("layout", ["B", "C"])
def test_autocast_keeps_the_state_float32_through_prefill_and_decode(layout):
    """Under bfloat16 autocast the state's products still run in float32: a prefill's state is
    float32 and decoding continues from it (it was refused as bfloat16)."""
    model = _tiny_lm(layout, 0.5).float().eval()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(2)
        model(ids[:, :6], cache=cache)
        states = [layer.state for layer in cache.layers if layer.state is not None]
        assert states and all(s.dtype == torch.float32 for s in states)
        for t in range(6, 9):
            model(ids[:, t : t + 1], cache=cache)
        assert model.generate_greedy(ids[:, :4], 3).shape == (2, 7)
    # and the state equals the float32 one of the same tokens (only q/k/v were rounded)
    with torch.no_grad():
        ref = model.new_cache(2)
        model(ids, cache=ref)
    for a, b in zip(cache.layers, ref.layers, strict=True):
        if a.state is not None:
            assert (a.state - b.state).norm() < 0.05 * b.state.norm()


def test_prefill_caches_contiguous_keys_and_values():
    """Like every later call's concatenation: a compiled decode does not recompile on strides."""
    model = _tiny_lm("C", 0.5).eval()
    cache = model.new_cache(2)
    model(torch.randint(0, 40, (2, 6)), cache=cache)
    kv = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    assert kv and all(t.is_contiguous() for t in kv)


def test_models_know_nothing_of_the_compiler():
    """nn/ imports only torch and its own modules (the dependency rule of DESIGN.md)."""
    import pathlib
    import re

    import rtpcompile.nn as nn_pkg

    for path in pathlib.Path(nn_pkg.__file__).parent.glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+(\S+)", path.read_text(), re.M)
        outside = [
            m for m in imports if m.startswith(("rtpcompile", "..")) and m != "rtpcompile.nn"
        ]
        assert outside == [], f"{path.name} imports {outside}"


@pytest.mark.parametrize("T", [2, 5, 17])
def test_chunk_step_equals_the_token_loop(T):
    """A multi-token continuation runs as one chunk step: same output, state and gradients as
    the recurrent loop (float64)."""
    from rtpcompile.nn import MultiScaleRetention

    torch.manual_seed(0)
    msr = MultiScaleRetention(32, 2, learnable_decay=True).double()
    q, k, v = (torch.randn(2, 2, T, d, dtype=torch.float64, requires_grad=True) for d in (16,) * 3)
    s0 = torch.randn(2, 2, 16, 16, dtype=torch.float64, requires_grad=True)
    got, want = msr.chunk_step(q, k, v, s0), msr.recurrent(q, k, v, s0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    leaves = (q, k, v, s0, msr.decay_logit)
    g1 = torch.autograd.grad(sum(x.sin().sum() for x in got), leaves)
    g2 = torch.autograd.grad(sum(x.sin().sum() for x in want), leaves)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("mult", "dim", "hidden"),
    [(2.2, 200, 440), (7 / 3, 216, 504), (9 / 7, 168, 216), (2.2, 360, 792), (8 / 3, 32, 88)],
)
def test_the_mlp_width_is_the_exact_product_rounded_up_to_8(mult, dim, hidden):
    """``8 * ceil(2.2 * 200 / 8)`` was 448: 2.2 * 200 is 440.00000000000006 in float."""
    from rtpcompile.nn.block import FeedForward

    assert FeedForward(dim, mult).hidden == hidden
