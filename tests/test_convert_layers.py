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


def _softmax_heads_only(attn: str) -> tuple[nn.Module, nn.Module]:
    """A 1-layer Mistral with a 4-token window whose output reads only the heads ``head_mix=0.5``
    keeps as softmax (the first two heads' output-projection columns are zero): the converted
    model must then equal the original exactly, window included."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        **{**COMMON, "num_hidden_layers": 1, "sliding_window": 4, "head_dim": 16}
    )
    model = transformers.MistralForCausalLM(cfg).eval()
    model.config._attn_implementation = attn
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, :32] = 0
    original = copy.deepcopy(model)
    retrofit(model, ratio=1.0, head_mix=0.5)
    return original, model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_type_c_softmax_heads_keep_the_sliding_window(attn):
    original, model = _softmax_heads_only(attn)
    x = ids(2, 11, seed=4)
    want = original(x, use_cache=False).logits
    torch.testing.assert_close(model(x, use_cache=False).logits, want)
    out = model(x[:, :5], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(5, 11):
        out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), want)
    # the softmax heads' cache holds the last window - 1 K/V, as Hugging Face's sliding layer does
    assert cache.layers[0].keys.shape[-2] == 3


@torch.no_grad()
def test_type_c_sliding_window_with_left_padding():
    original, model = _softmax_heads_only("sdpa")
    x = ids(2, 10, seed=5)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    want = original(x[1:, 3:], use_cache=False).logits
    got = model(x, attention_mask=mask, position_ids=pos, use_cache=False).logits[1:, 3:]
    torch.testing.assert_close(got, want)


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
