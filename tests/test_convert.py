"""retrofit(): structure, undo, weight reuse, hybrid cache + generate, memory report, errors.

Tiny random Hugging Face models (2-4 layers, hidden 64) built from configs (tests/models.py);
nothing downloaded.
"""

from __future__ import annotations

import pytest
import torch
from models import HF_FAMILIES, MHAModel, tiny_hf, token_ids
from torch import nn

import rtpcompile
from rtpcompile.convert import memory_report, retrofit, select_layers
from rtpcompile.convert.layers import RetrofitRetention

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face models need the transformers extra"
)

# -- placement ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio, placement, expected",
    [
        (0.5, "front", [0, 1]),
        (0.5, "back", [2, 3]),
        (0.75, "front", [0, 1, 2]),
        (0.0, "front", []),
        (1.0, "back", [0, 1, 2, 3]),
        (0.5, "interleave:2", [0, 2]),
        (0.5, "interleave:4", [0, 1, 2]),
        (0.5, [3, 1], [1, 3]),
        (0.5, [-1], [3]),
    ],
    ids=lambda v: str(v),
)
def test_select_layers(ratio, placement, expected):
    assert select_layers(4, ratio, placement) == expected


@pytest.mark.parametrize(
    "ratio, placement, match",
    [
        (1.5, "front", "ratio"),
        (0.5, "middle", "placement"),
        (0.5, "interleave:1", "interleave"),
        (0.5, [4], "out of range"),
    ],
)
def test_select_layers_rejects(ratio, placement, match):
    with pytest.raises(ValueError, match=match):
        select_layers(4, ratio, placement)


@pytest.mark.parametrize("name", HF_FAMILIES)
@pytest.mark.parametrize(
    "placement, expected", [("front", [0, 1]), ("back", [2, 3]), ("interleave:2", [0, 2])]
)
def test_structure_per_placement(name, placement, expected):
    model = tiny_hf(name)
    handle = retrofit(model, ratio=0.5, placement=placement)
    assert handle.converted == expected
    converted = [
        i
        for i, s in enumerate(handle.sites)
        if isinstance(model.get_submodule(s.name), RetrofitRetention)
    ]
    assert converted == expected
    text = str(model)
    for i in expected:
        assert f"retention, layer={i}," in text
    assert text.count("converted_from=") == len(expected)
    assert "attention (kept)" in repr(handle)


def test_gqa_and_fused_geometry():
    llama = retrofit(tiny_hf("llama"))
    assert (llama.sites[0].num_heads, llama.sites[0].num_kv_heads, llama.sites[0].head_dim) == (
        4,
        2,
        16,
    )
    gpt2 = retrofit(tiny_hf("gpt2"))
    assert gpt2.sites[0].family == "gpt2" and gpt2.sites[0].num_kv_heads == 4
    # state-dict keys of the reused projections do not move
    keys = set(tiny_hf("llama").state_dict())
    assert keys <= set(_model_retrofitted_state("llama"))


def _model_retrofitted_state(name):
    model = tiny_hf(name)
    retrofit(model)
    return model.state_dict()


# -- undo and weight reuse -----------------------------------------------------------------------


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_undo_restores_exact_outputs(name):
    model, ids = tiny_hf(name), token_ids()
    with torch.no_grad():
        before = model(ids).logits
        handle = retrofit(model, ratio=0.5)
        changed = model(ids).logits
        handle.undo()
        after = model(ids).logits
    assert not torch.equal(before, changed)
    assert torch.equal(before, after)
    assert not any(isinstance(m, RetrofitRetention) for m in model.modules())
    handle.undo()  # idempotent


def _reference_retention(q, k, v, gamma):
    """o_t = K**-0.5 * sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s, float64."""
    T = q.shape[-2]
    n = torch.arange(T, dtype=torch.float64)
    decay = gamma.double()[:, None, None] ** (n[:, None] - n[None, :]).clamp(min=0)
    decay = decay * (n[:, None] >= n[None, :])
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    return (scores * decay) @ v.double()


def test_llama_layer_matches_float64_reference():
    """Q/K/V/O weights, GQA repeat, rotary, decay and output norm, checked by hand."""
    model = tiny_hf("llama").double()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(7)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    handle = retrofit(model, placement=[0], decay=[0.9, 0.8, 0.7, 0.6])
    layer = handle.modules[0]
    with torch.no_grad():
        layer.out_norm.copy_(torch.rand(4, 16, generator=torch.Generator().manual_seed(2)) + 0.5)
        got, _ = layer(x, position_embeddings=(cos, sin))

        def heads(t):
            return t.view(2, 7, -1, 16).transpose(1, 2)

        def rope(t):
            t1, t2 = t.chunk(2, -1)
            return t * cos[:, None] + torch.cat([-t2, t1], -1) * sin[:, None]

        q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        gamma = layer.gamma()  # float32 logit: gamma within float32 rounding of the request
        torch.testing.assert_close(gamma.float(), torch.tensor([0.9, 0.8, 0.7, 0.6]))
        o = _reference_retention(q, k, v, gamma)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.out_norm[:, None]
        want = attn.o_proj(o.transpose(1, 2).reshape(2, 7, 64))
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_new_parameters_and_decay_options():
    handle = retrofit(tiny_hf("llama"), ratio=0.5)
    params = handle.new_parameters()
    assert len(params) == 4  # decay + output norm, two layers
    gamma = handle.modules[0].gamma().detach()
    torch.testing.assert_close(gamma, rtpcompile.ops.retention_init_decay(4))
    fixed = retrofit(tiny_hf("llama"), decay=lambda h: torch.full((h,), 0.9), learn_decay=False)
    assert not isinstance(fixed.modules[0].decay_logit, nn.Parameter)
    torch.testing.assert_close(fixed.modules[0].gamma(), torch.full((4,), 0.9))
    with pytest.raises(ValueError, match="one per head"):
        retrofit(tiny_hf("llama"), decay=[0.9, 0.8])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        retrofit(tiny_hf("llama"), decay=1.5)
    with pytest.raises(ValueError, match="head_mix"):
        retrofit(tiny_hf("llama"), head_mix=0.0)


# -- plain nn.Module models ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_attention_model(batch_first):
    torch.manual_seed(0)
    model = MHAModel(batch_first=batch_first).eval()
    x = torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)
    with torch.no_grad():
        before = model(x)
        handle = retrofit(model, ratio=0.5, placement="back")
        assert handle.converted == [2, 3]
        out = model(x)
        handle.undo()
        after = model(x)
    assert out.shape == before.shape and torch.isfinite(out).all()
    assert torch.equal(before, after)


def test_multihead_attention_is_causal():
    torch.manual_seed(0)
    model = MHAModel().eval()
    retrofit(model, ratio=1.0)
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        full, prefix = model(x), model(x[:, :5])
    torch.testing.assert_close(full[:, :5], prefix, rtol=1e-5, atol=1e-5)


class FusedAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        raise AssertionError("replaced by retrofit")


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = nn.Linear(32, 32)


def test_predicate_picks_custom_attention():
    model = nn.Sequential(FusedAttention(), nn.GELU(), FusedAttention())
    handle = retrofit(model, ratio=1.0, predicate=lambda name, m: isinstance(m, FusedAttention))
    assert [s.family for s in handle.sites] == ["generic", "generic"]
    out = model(torch.randn(2, 5, 32))
    assert out.shape == (2, 5, 32)


def test_unsupported_architecture_message():
    with pytest.raises(ValueError, match="found no attention layers in Sequential.*q_proj.*c_attn"):
        retrofit(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
    with pytest.raises(ValueError, match=r"predicate picked 'mixer' \(Linear\).*looked for"):
        retrofit(Opaque(), predicate=lambda name, m: name == "mixer")


# -- hybrid cache and generation -----------------------------------------------------------------


def _greedy_by_recompute(model, ids, steps):
    seq = ids
    for _ in range(steps):
        logits = model(seq, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize(
    "name, kw",
    [
        ("llama", {}),
        ("mistral", {"placement": "interleave:2"}),
        ("qwen2", {"head_mix": 0.5}),
        ("gpt2", {"placement": "back"}),
        ("llama", {"ratio": 1.0}),
    ],
    ids=["llama-front", "mistral-interleave", "qwen2-typeC", "gpt2-back", "llama-all"],
)
def test_generate_with_hybrid_cache_equals_recompute(name, kw):
    model, ids = tiny_hf(name), token_ids()
    handle = retrofit(model, **kw)
    gen = dict(
        max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0
    )
    with torch.no_grad():
        want = _greedy_by_recompute(model, ids, 4)
        cache = handle.new_cache()
        got = model.generate(ids, past_key_values=cache, **gen)
        plain = model.generate(ids, **gen)  # a default DynamicCache adapts itself
    assert torch.equal(got, want)
    assert torch.equal(plain, want)
    sizes = cache.nbytes()
    assert sizes["state"] > 0


def test_cached_logits_match_full_forward_float64():
    model = tiny_hf("qwen2").double()
    handle = retrofit(model, head_mix=0.5, ratio=0.5)
    ids = token_ids(length=12)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = handle.new_cache()
        first = model(ids[:, :7], past_key_values=cache, use_cache=True).logits
        rest = [
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
            for t in range(7, 10)
        ]
        tail = model(ids[:, 10:], past_key_values=cache, use_cache=True).logits
    got = torch.cat([first, *rest, tail], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9)
    assert cache.get_seq_length() == 12
    slot = cache.layers[0]
    assert slot.state.dtype == torch.float64 and slot.state.shape == (2, 2, 16, 16)
    assert slot.keys.shape == (2, 1, 12, 16)  # type C: K/V of the attention half only


def test_cache_state_is_float32_and_fixed_size():
    model = tiny_hf("llama")
    handle = retrofit(model, ratio=0.5)
    cache = handle.new_cache()
    with torch.no_grad():
        model(token_ids(length=5), past_key_values=cache, use_cache=True)
        size = cache.nbytes()["state"]
        model(token_ids(length=1), past_key_values=cache, use_cache=True)
    assert cache.layers[0].state.dtype == torch.float32
    assert cache.nbytes()["state"] == size == 2 * (2 * 4 * 16 * 16 * 4)
    assert cache.layers[0].keys.numel() == 0 and cache.layers[2].keys.shape[-2] == 6


# -- memory report --------------------------------------------------------------------------------


def test_memory_report_exact_bytes():
    model = tiny_hf("llama")
    retrofit(model, ratio=0.5)
    rep = memory_report(model, seq_len=100, batch=3)
    kv, state = 2 * 2 * 16 * 4, 4 * 16 * 16 * 4  # K+V x kv heads x head_dim x fp32; H x K x V x 4
    assert [r.kind for r in rep.layers] == ["retention", "retention", "attention", "attention"]
    assert [r.index for r in rep.layers] == [0, 1, 2, 3]
    assert [r.kv_bytes_per_token for r in rep.layers] == [0, 0, kv, kv]
    assert [r.state_bytes for r in rep.layers] == [state, state, 0, 0]
    assert rep.layers[0].break_even == state / kv == 16
    assert rep.total == 3 * (2 * state + 2 * kv * 100)
    assert rep.original_total == 3 * 4 * kv * 100
    assert rep.warnings == []
    assert "break-even" in str(rep) and "saved" in str(rep)


def test_memory_report_warns_when_state_is_larger():
    model = tiny_hf("llama")
    retrofit(model, ratio=0.5)
    rep = memory_report(model, seq_len=8, batch=1)
    assert len(rep.warnings) == 2 and "larger than the K/V it replaces" in rep.warnings[0]
    assert rep.saving < 0


def test_memory_report_type_c_and_unconverted():
    model = tiny_hf("llama").to(torch.bfloat16)
    plain = memory_report(model, seq_len=10)
    assert plain.total == plain.original_total == 4 * 10 * (2 * 2 * 16 * 2)
    retrofit(model, ratio=0.25, head_mix=0.5)
    row = memory_report(model, seq_len=10).layers[0]
    assert row.kind == "hybrid"
    assert (row.kv_bytes_per_token, row.state_bytes) == (2 * 1 * 16 * 2, 2 * 16 * 16 * 4)
    assert row.break_even == (2 * 16 * 16 * 4) / (2 * 1 * 16 * 2)
    with pytest.raises(ValueError, match="seq_len"):
        memory_report(model, seq_len=0)


# -- the rtp backend claims converted layers ------------------------------------------------------


@pytest.mark.parametrize("ratio, claimed", [(1.0, 2), (0.5, 1)])
def test_compile_explain_claims_converted_layers(ratio, claimed):
    """Converted layers call torch.ops.rtp.retention_fwd directly: each is one claimed region."""
    model = MHAModel(layers=2).eval()
    handle = retrofit(model, ratio=ratio)
    report = rtpcompile.explain(model, torch.randn(1, 8, 32))
    assert len(handle.converted) == claimed
    assert len(report.claimed) == claimed
    # NOTE: the layers left as attention are named (nn.MultiheadAttention: softmax attention)
    assert [r.written for r in report.declined] == ["softmax attention"] * (2 - claimed)
    assert all(r.native and r.written == "rtp op (auto)" for r in report.claimed)
    wheres = sorted(r.where.split()[0] for r in report.claimed)
    assert wheres == [f"blocks.{i}.attn" for i in handle.converted]
    for row in report.rows():
        if row[1] == "declined":
            continue  # the attention layer (above)
        assert row[1] == "claimed" and row[-1].startswith("parallel at T=8")
        assert row[4:6] == ("4", "8 x 8")


@pytest.mark.slow
def test_torch_compile_rtp_backend_matches_eager():
    torch.manual_seed(0)
    model = MHAModel(layers=2).eval()
    retrofit(model, ratio=0.5)
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="rtp")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
