"""Converted layers: padding masks, self-attention only, rotary conventions, decay dtype.

Tiny random Hugging Face models built from configs (nothing downloaded), CPU, float32.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from rtpcompile.convert import retrofit
from rtpcompile.convert.cache import key_valid
from rtpcompile.nn import MultiScaleRetention, RTPBlock, RTPConfig

transformers = pytest.importorskip(
    "transformers", reason="retrofit of Hugging Face models needs the transformers extra"
)

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "glm": ("GlmConfig", "GlmForCausalLM", {"head_dim": 16}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


def tiny(family: str, layers: int = 2, attn: str = "sdpa", **extra) -> nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=128
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        config_cls, model_cls, kw = FAMILIES[family]
        cfg = getattr(transformers, config_cls)(
            **{**COMMON, "num_hidden_layers": layers, **kw, **extra}
        )
        model = getattr(transformers, model_cls)(cfg)
    model.config._attn_implementation = attn
    return model.eval()


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def greedy(model, x, mask, steps=4):
    out = model.generate(
        x,
        attention_mask=mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, x.shape[1] :]


# -- 1. padding: zeroed keys are an exact key mask -----------------------------------------------


@pytest.mark.parametrize(
    "family, attn, head_mix",
    [
        ("llama", "sdpa", None),
        ("llama", "eager", None),
        ("llama", "sdpa", 0.5),
        ("gpt2", "eager", None),
    ],
    ids=str,
)
@torch.no_grad()
def test_left_padded_row_equals_its_unpadded_run(family, attn, head_mix):
    model = tiny(family, attn=attn)
    retrofit(model, ratio=0.5, head_mix=head_mix)
    a, b = ids(1, 9, seed=1), ids(1, 6, seed=2)
    # NOTE: pads are real token ids (pad_token_id 0 embeds to zero here, which would hide a bug)
    x = torch.cat([a, torch.cat([ids(1, 3, seed=9), b], 1)])
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    solo_mask = torch.ones_like(b)
    assert torch.equal(greedy(model, x, mask)[1], greedy(model, b, solo_mask)[0])
    # logits at the real positions, no cache (HF forward makes no position ids from the mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(x, attention_mask=mask, position_ids=pos, use_cache=False).logits[1, 3:]
    solo = model(b, attention_mask=solo_mask, use_cache=False).logits[0]
    torch.testing.assert_close(padded, solo, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_pad_in_the_middle_is_finite_and_leaves_the_prefix_alone():
    model = tiny("llama")
    retrofit(model, ratio=1.0, head_mix=0.5)
    x = ids(2, 8, seed=3)
    mask = torch.ones_like(x)
    mask[0, 4] = 0
    out = model(x, attention_mask=mask, use_cache=False).logits
    ref = model(x, use_cache=False).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :4], ref[0, :4])
    torch.testing.assert_close(out[1], ref[1])
    assert not torch.allclose(out[0, 5:], ref[0, 5:])


def test_key_valid_reads_the_mask_forms():
    pad = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    want = pad.bool()
    assert torch.equal(key_valid(pad, 2, 4), want)
    assert torch.equal(key_valid(pad, 2, 2), want[:, 2:])  # the new tokens are the last columns
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    four = causal[None, None] & want[:, None, None, :]
    assert torch.equal(key_valid(four, 2, 4), want)
    additive = torch.where(four, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(key_valid(additive, 2, 4), want)
    assert torch.equal(key_valid(additive[1:], 2, 4), want[1:].expand(2, 4))
    window = causal & ~torch.ones(4, 4, dtype=torch.bool).tril(-2)  # sliding window 2
    assert key_valid(window[None, None], 1, 4).all()
    assert key_valid(None, 2, 4) is None
    for bad, match in [
        (object(), "BlockMask"),
        (torch.ones(2, 4, 4), "2D .* or 4D"),
        (four[:, :, :3], "query rows"),
        (torch.ones(2, 3), "does not cover"),
        (torch.ones(2, 1, 4, 4, dtype=torch.long), "bool or floating"),
    ]:
        with pytest.raises(ValueError, match=match):
            key_valid(bad, 2, 4)


# -- 1b. sliding window: the softmax heads of a type-C layer keep it -----------------------------


def _softmax_heads_only(
    config: str, model_cls: str, attn: str = "sdpa", layers: int = 1, **kw
) -> tuple[nn.Module, nn.Module]:
    """A tiny model whose output reads only the heads ``head_mix=0.5`` keeps as softmax (the
    output-projection columns of the heads that become retention are zeroed): the converted
    model must then equal the original exactly (window, rotary, soft cap... included)."""
    torch.manual_seed(0)
    cfg = getattr(transformers, config)(**{**COMMON, "num_hidden_layers": layers, **kw})
    model = getattr(transformers, model_cls)(cfg).eval()
    model.config._attn_implementation = attn
    handle = retrofit(model, ratio=1.0, head_mix=0.5)
    with torch.no_grad():
        for layer in handle.modules.values():
            out = layer.o_proj if hasattr(layer, "o_proj") else layer.c_proj
            out.weight[:, : layer.retention_heads * layer.site.head_dim] = 0  # shared tensor
    converted = copy.deepcopy(model)
    handle.undo()
    return model, converted


def _mistral(attn: str) -> tuple[nn.Module, nn.Module]:
    """A 1-layer Mistral with a 4-token window (see ``_softmax_heads_only``)."""
    return _softmax_heads_only(
        "MistralConfig", "MistralForCausalLM", attn, sliding_window=4, head_dim=16
    )


def _assert_exact(original: nn.Module, model: nn.Module, length: int = 11, prefill: int = 5):
    """Full forward, then prefill + token-by-token decode with the cache, equal the original."""
    x = ids(2, length, seed=4)
    want = original(x, use_cache=False).logits
    torch.testing.assert_close(model(x, use_cache=False).logits, want)
    out = model(x[:, :prefill], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(prefill, length):
        out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), want)
    return cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_type_c_softmax_heads_keep_the_sliding_window(attn):
    cache = _assert_exact(*_mistral(attn))
    # the softmax heads' cache holds the last window - 1 K/V, as Hugging Face's sliding layer does
    assert cache.layers[0].keys.shape[-2] == 3


@torch.no_grad()
def test_type_c_sliding_window_with_left_padding():
    original, model = _mistral("sdpa")
    x = ids(2, 10, seed=5)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    want = original(x[1:, 3:], use_cache=False).logits
    got = model(x, attention_mask=mask, position_ids=pos, use_cache=False).logits[1:, 3:]
    torch.testing.assert_close(got, want)


# -- 1c. type C exactness per family: rotary rules, soft cap, fused layouts -----------------------

# Families whose global layers skip RoPE (layer 0 rotates, layer 1 does not).
NOPE = {
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {"sliding_window": 4}),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {"sliding_window": 4}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"no_rope_layers": [1, 0]}),
}


@pytest.mark.parametrize("family", sorted(NOPE))
@torch.no_grad()
def test_type_c_layers_without_rope_stay_without_rope(family):
    config, model_cls, kw = NOPE[family]
    if family != "smollm3":
        kw = {**kw, "layer_types": ["sliding_attention", "full_attention"]}
    original, model = _softmax_heads_only(config, model_cls, layers=2, **kw)
    assert [m.use_rotary for m in model.modules() if hasattr(m, "use_rotary")] == [True, False]
    _assert_exact(original, model)


@torch.no_grad()
def test_type_c_gemma2_applies_the_attention_soft_cap():
    kw = dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24, final_logit_softcapping=None)
    # NOTE: eager is Gemma2's own path (SDPA has no soft cap); a small cap makes it matter
    original, model = _softmax_heads_only(
        "Gemma2Config", "Gemma2ForCausalLM", "eager", 2, attn_logit_softcapping=0.05, **kw
    )
    _assert_exact(original, model)
    # Gemma3 keeps attn_logit_softcapping on the module but never passes it: no cap there
    kw["sliding_window_pattern"] = 2
    original, model = _softmax_heads_only(
        "Gemma3TextConfig", "Gemma3ForCausalLM", "eager", 2, attn_logit_softcapping=0.05, **kw
    )
    assert {m.softcap for m in model.modules() if hasattr(m, "softcap")} == {None}
    _assert_exact(original, model)


BIGCODE = dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, n_positions=64)


@torch.no_grad()
def test_type_c_gpt_bigcode_reads_its_per_head_qkv_layout():
    torch.manual_seed(0)
    original, model = _softmax_heads_only(
        "GPTBigCodeConfig", "GPTBigCodeForCausalLM", multi_query=False, **BIGCODE
    )
    _assert_exact(original, model)


@torch.no_grad()
def test_gpt_bigcode_multi_query_projects_like_the_original(monkeypatch):
    torch.manual_seed(0)
    cfg = transformers.GPTBigCodeConfig(multi_query=True, **BIGCODE)
    model = transformers.GPTBigCodeForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    module = sys.modules[type(model.transformer.h[0].attn).__module__]
    seen: list = []
    original = module.eager_attention_forward
    monkeypatch.setattr(
        module,
        "eager_attention_forward",
        lambda attn, q, k, v, *a, **kw: seen.append((q, k, v)) or original(attn, q, k, v, *a, **kw),
    )
    x = ids(2, 7, seed=3)
    model(x, use_cache=False)
    handle = retrofit(model, ratio=1.0)
    assert (handle.sites[0].num_heads, handle.sites[0].num_kv_heads) == (4, 1)
    hidden = model.transformer.wte(x) + model.transformer.wpe(torch.arange(7))
    got = handle.modules[0]._project(model.transformer.h[0].ln_1(hidden))
    for a, b in zip(got, seen[0], strict=True):
        torch.testing.assert_close(a, b)
    assert torch.isfinite(model(x).logits).all()


def test_attention_owning_parameters_directly_is_refused():
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        **{**COMMON, "num_hidden_layers": 1, "head_dim": 16, "num_local_experts": 2},
        num_experts_per_tok=1,
    )
    with pytest.raises(ValueError, match=r"GptOssAttention: it owns parameters \['sinks'\]"):
        retrofit(transformers.GptOssForCausalLM(cfg), ratio=1.0)


def test_q_norm_without_weight_is_refused():
    torch.manual_seed(0)
    cfg = transformers.NanoChatConfig(**{**COMMON, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match=r"q_norm \(NanoChatRMSNorm\) has no weight"):
        retrofit(transformers.NanoChatForCausalLM(cfg), ratio=1.0)


def test_rotary_guard_that_cannot_be_read_is_refused():
    from transformers.models.llama import modeling_llama as ml

    class GuardedRope(ml.LlamaAttention):
        def forward(self, hidden_states, position_embeddings=None, **kwargs):
            q = k = hidden_states
            if hidden_states.shape[1] > 1:
                q, k = ml.apply_rotary_pos_emb(q, k, *position_embeddings)
            return q, None

    class GivenRope(ml.LlamaAttention):
        def forward(self, hidden_states, position_embeddings=None, **kwargs):
            q = k = hidden_states
            if position_embeddings is not None and self.layer_idx == 0:
                q, k = ml.apply_rotary_pos_emb(q, k, *position_embeddings)
            return q, None

    model = tiny("llama", layers=2)
    model.model.layers[0].self_attn.__class__ = GuardedRope
    with pytest.raises(ValueError, match=r"only when `hidden_states.shape\[1\] > 1`"):
        retrofit(model, ratio=1.0)
    for layer in model.model.layers:
        layer.self_attn.__class__ = GivenRope  # the converted layer checks for cos/sin itself
    assert [m.use_rotary for m in retrofit(model, ratio=1.0).modules.values()] == [True, False]


# -- 2. self-attention only -----------------------------------------------------------------------


def test_multihead_retention_refuses_cross_attention_and_reads_key_padding():
    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(32, 4, batch_first=True)
    handle = retrofit(holder, ratio=1.0)
    layer = handle.modules[0]
    x = torch.randn(2, 6, 32)
    for other in (torch.randn(2, 6, 32), x.clone()):
        with pytest.raises(ValueError, match="self-attention only: key must be the query"):
            layer(x, other, other)
    with torch.no_grad():
        y = layer(x, x, x)[0]
        padded = torch.cat([torch.randn(2, 2, 32), x], 1)
        kpm = torch.zeros(2, 8, dtype=torch.bool)
        kpm[:, :2] = True  # True = padding, torch's convention
        yp = layer(padded, padded, padded, key_padding_mask=kpm)[0]
        ya = layer(padded, padded, padded, attn_mask=None)[0]
        hidden = torch.zeros(8, 8, dtype=torch.bool)
        hidden[:, :2] = True  # the same padding as an attn_mask column, per batch * head
        ym = layer(padded, padded, padded, attn_mask=hidden.expand(2 * 4, 8, 8))[0]
    torch.testing.assert_close(yp[:, 2:], y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ym, yp)
    assert not torch.allclose(ya[:, 2:], y)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        layer(x, x, x, key_padding_mask=kpm)


def test_llama_layer_refuses_cross_attention_states():
    model = tiny("llama")
    handle = retrofit(model, ratio=0.5)
    layer = handle.modules[0]
    h = torch.randn(1, 3, 64)
    cos_sin = model.model.rotary_emb(h, torch.arange(3)[None])
    with pytest.raises(ValueError, match="cross_attention_states"):
        layer(h, cos_sin, cross_attention_states=torch.randn(1, 5, 64))


# -- 3./5. rotary conventions and Llama-style variants --------------------------------------------

ROTARY = ["llama", "qwen2", "gemma", "cohere", "glm", "stablelm", "olmo2", "qwen3"]


@pytest.mark.parametrize("family", ROTARY)
@torch.no_grad()
def test_rotary_shift_invariance(family):
    model = tiny(family)
    retrofit(model, ratio=1.0)
    x, pos = ids(1, 12, seed=0), torch.arange(12)[None]
    a = model(x, position_ids=pos, use_cache=False).logits
    b = model(x, position_ids=pos + 7, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _record(model: nn.Module, seen: list):
    """The family's module, its eager attention, and a wrapper recording the rotated q/k."""
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = module.eager_attention_forward

    def recording(attn, query, key, *args, **kwargs):
        seen.append((query, key))
        return original(attn, query, key, *args, **kwargs)

    return module, original, recording


@pytest.mark.parametrize("family", ROTARY)
@torch.no_grad()
def test_rotated_q_k_match_the_original_attention(family, monkeypatch):
    model = tiny(family, attn="eager")
    seen: list = []
    module, _, recording = _record(model, seen)
    monkeypatch.setattr(module, "eager_attention_forward", recording)
    x, pos = ids(2, 7, seed=4), torch.arange(7)[None] + 3
    model(x, position_ids=pos, use_cache=False)
    q_ref, k_ref = seen[0]
    handle = retrofit(model, ratio=1.0)
    layer, got = handle.modules[0], []
    mix = layer.mix
    layer.mix = lambda q, k, v, *a: got.append((q, k)) or mix(q, k, v, *a)
    model(x, position_ids=pos, use_cache=False)
    torch.testing.assert_close(got[0][0], q_ref)
    torch.testing.assert_close(got[0][1], k_ref)


@pytest.mark.parametrize("family", ["glm", "stablelm", "olmo2", "cohere"])
@torch.no_grad()
def test_variants_generate_like_recompute(family):
    model = tiny(family)
    retrofit(model, ratio=0.5)
    x = ids(2, 8, seed=5)
    out = greedy(model, x, torch.ones_like(x))
    seq = x
    for _ in range(4):
        logits = model(seq, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, x.shape[1] :])


def test_sub_modules_that_would_be_ignored_are_refused():
    model = tiny("stablelm", qk_layernorm=True)
    with pytest.raises(ValueError, match="q_layernorm"):
        retrofit(model, ratio=0.5)


# -- 4. decay precision and parameter dtype -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gamma_is_float32_after_a_cast(dtype):
    model = tiny("llama", num_attention_heads=16, num_key_value_heads=16, hidden_size=128)
    handle = retrofit(model, ratio=0.5)
    ref = handle.modules[0].gamma().double()
    model.to(dtype)
    gamma = handle.modules[0].gamma()
    assert gamma.dtype == torch.float32 and bool((gamma < 1).all())
    rel = ((1 - gamma.double()) / (1 - ref) - 1).abs().max().item()
    assert rel < (0.01 if dtype == torch.float16 else 0.05)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_new_parameters_take_the_attention_dtype(dtype):
    """The output norm follows the attention; the decay logit stays float32 (float64)."""
    model = tiny("llama").to(dtype)
    layer = retrofit(model, ratio=0.5).modules[0]
    assert layer.out_norm.dtype == dtype
    assert layer.decay_logit.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert layer.gamma().dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_nn_decay_stays_float32_after_a_cast():
    msr = MultiScaleRetention(128, 16, learnable_decay=True).half()
    assert msr.log_decay().dtype == torch.float32 and bool((msr.gamma < 1).all())


# -- 6. messages ---------------------------------------------------------------------------------


def test_argument_messages():
    with pytest.raises(ValueError, match="one per retention head: head_mix=0.5 makes 2 of the 4"):
        retrofit(tiny("llama"), head_mix=0.5, decay=[0.9, 0.95, 0.99, 0.999])
    with pytest.raises(ValueError, match="num_heads >= 2, got 1"):
        RTPBlock(32, 1, "hybrid")
    with pytest.raises(ValueError, match="float32 or float64"):
        MultiScaleRetention(32, 4)(torch.randn(1, 3, 32), state=torch.zeros(1, 4, 8, 16).half())
    with pytest.raises(ValueError, match="ratio"):
        RTPConfig(ratio=True)
    with pytest.raises(ValueError, match="norm_eps"):
        RTPConfig(norm_eps=-1.0)


@torch.no_grad()
def test_type_c_plain_prefill_uses_sdpas_causal_flag(monkeypatch):
    """A prefill without padding, window or cached prefix is causal attention: SDPA's is_causal
    (fused kernels, linear memory), not a [T, T] bool mask (the math path: 321 MB and 5x slower
    for one 2-head call at T = 8192). Same logits as the masked path."""
    import torch.nn.functional as F

    from rtpcompile.convert import layers

    model = tiny("llama")
    retrofit(model, ratio=1.0, head_mix=0.5)
    x = ids(2, 11, seed=4)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    fast = model(x, use_cache=False).logits
    assert seen and all(seen_no_mask and causal for seen_no_mask, causal in seen), seen
    # the masked path (a pad in row 1 sends the batch there) gives row 0 the same logits
    seen.clear()
    pads = torch.ones_like(x)
    pads[1, 0] = 0
    masked = model(x, attention_mask=pads, use_cache=False).logits
    assert seen and not any(no_mask for no_mask, _ in seen), seen
    torch.testing.assert_close(fast[0], masked[0], rtol=1e-5, atol=1e-5)
