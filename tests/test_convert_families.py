"""retrofit of Phi-3, GPT-NeoX (Pythia), Phi and Falcon (and Persimmon, GPT-NeoX's layout).

Each layout gets: discovery and geometry, the converted layer against a float64 retention computed
by hand from the same projections with the same rotary (outputs and gradients), prefill +
token-by-token decode with ``handle.new_cache()`` equal to the full forward, greedy ``generate``
equal to recomputation, bit-exact ``undo()``, and type C checked exactly against the original
attention (the output columns of the retention heads zeroed). ALiBi and other layouts a
converted layer could not reproduce are refused with the reason. Tiny random models, CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rtpcompile.convert import distill, retrofit
from rtpcompile.convert.layers import RetrofitRetention

transformers = pytest.importorskip(
    "transformers", reason="retrofit of Hugging Face models needs the transformers extra"
)

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# variant -> (config, model, config overrides, (family, heads, kv_heads, head_dim, rotary width))
VARIANTS = {
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(num_key_value_heads=2, partial_rotary_factor=0.5),
        ("phi3", 4, 2, 16, 8),
    ),
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.25), ("neox", 4, 4, 16, 4)),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        dict(num_key_value_heads=2, partial_rotary_factor=0.5, qk_layernorm=True),
        ("phi", 4, 2, 16, 8),
    ),
    "falcon-grouped": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(new_decoder_architecture=True, num_kv_heads=2),
        ("falcon", 4, 2, 16, 16),
    ),
    "falcon-mq": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(multi_query=True),
        ("falcon", 4, 1, 16, 16),
    ),
    "falcon-per-head": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(multi_query=False),
        ("falcon", 4, 4, 16, 16),
    ),
    "persimmon": (
        "PersimmonConfig",
        "PersimmonForCausalLM",
        dict(qk_layernorm=True),
        ("neox", 4, 4, 16, 8),
    ),
}
TYPE_C = [v for v, spec in VARIANTS.items() if spec[3][2] > 1]  # K/V heads split in groups


def tiny(variant: str, attn: str = "sdpa", **extra) -> nn.Module:
    torch.manual_seed(0)
    config_cls, model_cls, kw, _ = VARIANTS[variant]
    cfg = getattr(transformers, config_cls)(**{**COMMON, **kw, **extra})
    model = getattr(transformers, model_cls)(cfg)
    model.config._attn_implementation = attn
    return model.eval()


def ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _attention(model: nn.Module, index: int = 0) -> nn.Module:
    names = ("self_attn", "attention", "self_attention")
    found = [m for n, m in model.named_modules() if n.rpartition(".")[2] in names]
    return found[index]


def _rotary(model: nn.Module) -> nn.Module:
    return next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))


# -- discovery ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ratio, converted", [(0.5, [0]), (1.0, [0, 1])])
def test_found_with_its_geometry(variant, ratio, converted):
    model = tiny(variant)
    family, heads, kv, dim, _ = VARIANTS[variant][3]
    handle = retrofit(model, ratio=ratio)
    assert [(s.family, s.num_heads, s.num_kv_heads, s.head_dim) for s in handle.sites] == [
        (family, heads, kv, dim)
    ] * 2
    assert handle.converted == converted and not handle.skipped
    text = str(model)
    assert text.count(f"converted_from={family}:") == len(converted)
    for i in converted:
        assert isinstance(model.get_submodule(handle.sites[i].name), RetrofitRetention)
    # the reused projections keep their state-dict keys
    assert set(tiny(variant).state_dict()) <= set(model.state_dict())


# -- the float64 oracle: same projections, same rotary, retention by hand -------------------------


def _split(variant: str, attn: nn.Module, x: torch.Tensor):
    """q [B, H, T, D], k and v [B, H_kv, T, D] read from the weights as the original lays them."""
    B, T, _ = x.shape
    _, H, KV, D, _ = VARIANTS[variant][3]
    if variant == "phi":
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    else:
        fused = attn.qkv_proj if variant == "phi3" else attn.query_key_value
        y = F.linear(x, fused.weight, fused.bias)
        if variant in ("neox", "persimmon", "falcon-per-head"):  # [H, 3, D]
            y = y.view(B, T, H, 3, D)
            q, k, v = y[..., 0, :], y[..., 1, :], y[..., 2, :]
        elif variant == "falcon-grouped":  # [KV, H / KV + 2, D]
            y = y.view(B, T, KV, H // KV + 2, D)
            q, k, v = y[..., :-2, :].reshape(B, T, H, D), y[..., -2, :], y[..., -1, :]
        elif variant == "falcon-mq":  # [H + 2, D]
            y = y.view(B, T, H + 2, D)
            q, k, v = y[..., :H, :], y[..., H, :], y[..., H + 1, :]
        else:  # phi3: [q | k | v]
            q, k, v = y.split([H * D, KV * D, KV * D], dim=-1)
    q, k, v = (t.reshape(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    if getattr(attn, "q_layernorm", None) is not None:
        qn, kn = attn.q_layernorm, attn.k_layernorm
        q = F.layer_norm(q, (D,), qn.weight, qn.bias, qn.eps)
        k = F.layer_norm(k, (D,), kn.weight, kn.bias, kn.eps)
    return q, k, v


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] channels, the rest passed through."""
    r = cos.shape[-1]
    rot, rest = t[..., :r], t[..., r:]
    t1, t2 = rot.chunk(2, -1)
    rot = rot * cos[:, None] + torch.cat([-t2, t1], -1) * sin[:, None]
    return torch.cat([rot, rest], -1)


def _retention(q, k, v, gamma):
    """o_t = D**-0.5 * sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s, float64."""
    n = torch.arange(q.shape[-2], dtype=torch.float64)
    decay = gamma.double()[:, None, None] ** (n[:, None] - n[None, :]).clamp(min=0)
    decay = decay * (n[:, None] >= n[None, :])
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return (scores * decay) @ v


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_matches_float64_oracle_outputs_and_gradients(variant):
    model = tiny(variant).double()
    attn = _attention(model)
    _, H, KV, D, rot = VARIANTS[variant][3]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 64, dtype=torch.float64, generator=gen, requires_grad=True)
    cos, sin = _rotary(model)(x, torch.arange(7)[None] + 2)
    assert cos.shape[-1] == rot  # partial rotary really exercised where the config asks for it
    layer = retrofit(model, placement=[0], decay=[0.9, 0.8, 0.7, 0.6]).modules[0]
    with torch.no_grad():
        layer.out_norm.copy_(torch.rand(H, D, generator=gen, dtype=torch.float64) + 0.5)
    got, _ = layer(x, position_embeddings=(cos, sin))

    q, k, v = _split(variant, attn, x)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    o = _retention(q, k, v, layer.gamma())
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.out_norm[:, None]
    out = attn.o_proj if variant == "phi3" else attn.dense
    want = F.linear(o.transpose(1, 2).reshape(2, 7, H * D), out.weight, out.bias)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)

    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    assert layer.decay_logit in params[1:]
    cot = torch.randn(got.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(got, params, cot)
    refs = torch.autograd.grad(want, params, cot, allow_unused=True)
    for g, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-6, atol=1e-9)


# -- cache, generate, undo ------------------------------------------------------------------------


def _decode(model: nn.Module, cache, x: torch.Tensor, prefill: int) -> torch.Tensor:
    out = model(x[:, :prefill], past_key_values=cache, use_cache=True)
    steps = [out.logits]
    for t in range(prefill, x.shape[1]):
        steps.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(steps, 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ratio", [0.5, 1.0])
@torch.no_grad()
def test_prefill_and_decode_equal_the_full_forward(variant, ratio):
    model = tiny(variant).double()
    handle = retrofit(model, ratio=ratio)
    x = ids(length=11, seed=3)
    full = model(x, use_cache=False).logits
    cache = handle.new_cache()
    torch.testing.assert_close(_decode(model, cache, x, 5), full, rtol=1e-9, atol=1e-9)
    assert cache.get_seq_length() == 11
    assert cache.layers[0].state.shape == (2, 4, 16, 16)


@pytest.mark.parametrize("variant", ["phi3", "neox", "phi", "falcon-grouped"])
@torch.no_grad()
def test_generate_equals_recompute(variant):
    model = tiny(variant)
    handle = retrofit(model, ratio=0.5)
    x = ids(length=7, seed=5)
    seq = x
    for _ in range(4):
        logits = model(seq, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    gen = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    assert torch.equal(model.generate(x, past_key_values=handle.new_cache(), **gen), seq)
    assert torch.equal(model.generate(x, **gen), seq)  # a plain DynamicCache adapts itself


@pytest.mark.parametrize("variant", ["neox", "phi3", "falcon-per-head"])
@torch.no_grad()
def test_left_padded_row_equals_its_unpadded_run(variant):
    model = tiny(variant)
    retrofit(model, ratio=0.5, head_mix=0.5)
    a, b = ids(1, 9, seed=1), ids(1, 6, seed=2)
    x = torch.cat([a, torch.cat([ids(1, 3, seed=9), b], 1)])  # row 1: 3 pads, then b
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    padded = model.generate(x, attention_mask=mask, **gen)[1, 9:]
    assert torch.equal(padded, model.generate(b, attention_mask=torch.ones_like(b), **gen)[0, 6:])


def test_distill_calls_the_converted_layers_with_the_original_arguments():
    """GPT-NeoX and Falcon pass the cache as layer_past, Falcon also alibi=None."""
    for variant in ("neox", "falcon-grouped"):
        model = tiny(variant)
        teacher = copy.deepcopy(model)
        retrofit(model, ratio=0.5)
        batches = [ids(2, 8, seed=s) for s in range(2)]
        result = distill(model, teacher, batches, stage1_steps=2, stage2_steps=1, progress=False)
        assert len(result.stage1) == 2 and all(torch.isfinite(torch.tensor(result.stage1)))


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_undo_restores_the_original_bit_exactly(variant):
    model, x = tiny(variant), ids()
    before = model(x).logits
    handle = retrofit(model, ratio=1.0)
    assert not torch.equal(model(x).logits, before)
    handle.undo()
    assert torch.equal(model(x).logits, before)
    assert not any(isinstance(m, RetrofitRetention) for m in model.modules())


# -- type C: the softmax heads are the original attention -----------------------------------------


def _softmax_heads_only(variant: str, attn: str, **extra) -> tuple[nn.Module, nn.Module]:
    """(original, converted) whose outputs read only the heads ``head_mix=0.5`` keeps as
    softmax: the output-projection columns of the retention heads are zeroed (shared tensor)."""
    model = tiny(variant, attn=attn, **extra)
    handle = retrofit(model, ratio=1.0, head_mix=0.5)
    with torch.no_grad():
        for layer in handle.modules.values():
            assert 0 < layer.retention_heads < layer.site.num_heads
            out = getattr(layer, layer.OUT)
            out.weight[:, : layer.retention_heads * layer.site.head_dim] = 0
    converted = copy.deepcopy(model)
    handle.undo()
    return model, converted


@pytest.mark.parametrize(
    "variant, attn, extra",
    [(v, "sdpa", {}) for v in TYPE_C]
    + [("falcon-grouped", "eager", {}), ("neox", "eager", {})]
    + [("phi3", "sdpa", {"sliding_window": 4})],  # the softmax heads keep Phi-3's window
    ids=str,
)
@torch.no_grad()
def test_type_c_softmax_heads_equal_the_original(variant, attn, extra):
    original, converted = _softmax_heads_only(variant, attn, **extra)
    x = ids(length=10, seed=4)
    want = original(x, use_cache=False).logits
    torch.testing.assert_close(converted(x, use_cache=False).logits, want)
    cache = transformers.DynamicCache(config=converted.config)
    torch.testing.assert_close(_decode(converted, cache, x, 4), want)


def test_type_c_needs_more_than_one_kv_head():
    with pytest.raises(ValueError, match="single K/V head"):
        retrofit(tiny("falcon-mq"), head_mix=0.5)


# -- refused, with the reason ---------------------------------------------------------------------


def _model(config: str, model: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return getattr(transformers, model)(getattr(transformers, config)(**{**COMMON, **kw})).eval()


def test_alibi_is_refused():
    falcon = _model("FalconConfig", "FalconForCausalLM", alibi=True)
    with pytest.raises(ValueError, match=r"none can become retention.*ALiBi"):
        retrofit(falcon, ratio=1.0)
    with pytest.raises(
        ValueError, match=r"predicate picked 'transformer.h.1.self_attention'.*ALiBi"
    ):
        retrofit(falcon, predicate=lambda name, m: name == "transformer.h.1.self_attention")
    bloom = _model("BloomConfig", "BloomForCausalLM", n_layer=2, n_head=4)
    with pytest.raises(ValueError, match=r"BloomAttention.*ALiBi"):
        retrofit(bloom, ratio=1.0)


def test_unreproducible_layouts_are_refused():
    japanese = _model("GPTNeoXJapaneseConfig", "GPTNeoXJapaneseForCausalLM")
    with pytest.raises(ValueError, match=r"returns 3 values"):
        retrofit(japanese, ratio=1.0)
    model = tiny("neox")
    _attention(model, 1).extra = nn.Linear(4, 4)
    handle = retrofit(model, ratio=0.5)  # layer 0 only: the extra sub-module is on layer 1
    assert handle.converted == [0]
    with pytest.raises(ValueError, match=r"sub-modules \['extra'\] would be ignored"):
        retrofit(model, placement=[1])
    narrow = tiny("phi3")
    _attention(narrow).qkv_proj = nn.Linear(64, 70, bias=False)
    handle = retrofit(narrow, ratio=1.0)
    assert [s.name for s in handle.skipped] == ["model.layers.0.self_attn"]
    assert "do not fit the phi3 layout" in handle.skipped[0].reason
