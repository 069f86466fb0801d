"""Behaviours of the modules, retrofit caches and distillation that no other test pinned down.

Each test checks one user-visible behaviour against an independent computation (float64) or an
exact value: RetNet's per-head decays, cache and argument checks, the dtype and size of a fresh
cache's states, rounding of widths and layer plans, beam-search reordering and batch expansion
of a retrofitted model's cache, padding with soft-capped or masked softmax heads, the head split
of ``head_mix``, the decay range, OLMo's clip_qkv, and the losses ``distill`` reports and the
state it leaves the model in. Tiny random models, CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import TINY_GQA
from torch import nn

from rtpcompile.convert import distill, retrofit
from rtpcompile.convert.decay import resolve_decay
from rtpcompile.nn import MultiScaleRetention, RTPConfig, RTPHybridLM, retnet_decay
from rtpcompile.nn.block import FeedForward

F64 = torch.float64


# -- rtpcompile.nn --------------------------------------------------------------------------------


def test_msr_decays_are_retnets_per_head_values_in_head_order():
    """Head h decays by gamma_h = 1 - 2^(-5 - h): the first head forgets fastest."""
    want = torch.tensor([1 - 2.0**-5, 1 - 2.0**-6, 1 - 2.0**-7, 1 - 2.0**-8], dtype=F64)
    torch.testing.assert_close(retnet_decay(4), want, rtol=0, atol=0)
    torch.testing.assert_close(MultiScaleRetention(32, 4).gamma.double(), want, rtol=1e-7, atol=0)
    learned = MultiScaleRetention(32, 4, learnable_decay=True).gamma.double()
    torch.testing.assert_close(learned, want, rtol=1e-7, atol=0)


def test_a_cache_of_another_depth_and_a_negative_length_are_refused():
    """A cache built for another number of layers, or max_new_tokens < 0, raises ValueError."""
    torch.manual_seed(0)
    model = RTPHybridLM(10, 16, 3, 2)
    ids = torch.zeros(1, 3, dtype=torch.long)
    for other in (RTPHybridLM(10, 16, 2, 2), RTPHybridLM(10, 16, 4, 2)):
        with pytest.raises(ValueError, match=f"cache has {len(other.blocks)} layers, expected 3"):
            model(ids, cache=other.new_cache(1))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        model.generate_greedy(ids, -1)


def test_new_cache_of_a_float64_model_holds_float64_states():
    """A float64 model's fresh cache allocates float64 states; nbytes sums every layer."""
    torch.manual_seed(0)
    model = RTPHybridLM(40, 32, 3, 4, layout="C", ratio=0.5).to(F64)
    cache = model.new_cache(2)
    for layer in cache.layers:
        assert layer.state.dtype == F64 and layer.state.shape == (2, 2, 8, 16)
    assert cache.nbytes()["state"] == 3 * 2 * 2 * 8 * 16 * 8
    model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    sizes = cache.nbytes()
    assert sizes["kv"] == 3 * 2 * (2 * 2 * 5 * 8 * 8)  # keys and values of 2 softmax heads
    assert sizes["total"] == sizes["state"] + sizes["kv"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_init_state_of_a_16_bit_model_is_float32_and_accepted(dtype):
    """``init_state`` for a 16-bit model gives a float32 state the module then accepts."""
    m = MultiScaleRetention(16, 2).to(dtype)
    state = m.init_state(1, dtype=dtype)
    assert state.dtype == torch.float32
    y, new = m(torch.randn(1, 1, 16, dtype=dtype), state=state, offset=0)
    assert y.dtype == dtype and new.dtype == torch.float32


def test_ffn_hidden_width_rounds_up_to_a_multiple_of_8():
    """ffn_mult * dim is rounded up to a multiple of 8: 8/3 * 256 = 682.7 -> 688."""
    assert FeedForward(256).hidden == 688
    assert FeedForward(30, ffn_mult=1.0).hidden == 32


def test_layer_plan_rounds_half_up():
    """Half a layer (or head) rounds up: 0.5 of 5 layers is 3, 0.625 of 4 heads is 3."""
    plan = RTPConfig(num_layers=5, ratio=0.5).layer_plan()
    assert [kind for kind, _ in plan] == ["retention"] * 3 + ["attention"] * 2
    plan = RTPConfig(dim=32, num_layers=1, num_heads=4, layout="C", ratio=0.625).layer_plan()
    assert plan == [("hybrid", 3)]


# -- retrofit caches ------------------------------------------------------------------------------

transformers = pytest.importorskip(
    "transformers", reason="retrofit of Hugging Face models needs the transformers extra"
)


def _llama(heads: int = 4, kv_heads: int = 2, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).to(F64).eval()
    model.config._attn_implementation = "sdpa"
    return model


def test_retrofit_keeps_an_eval_model_in_eval_mode():
    """Every converted module of an eval-mode model is in eval mode too."""
    model = _llama()
    handle = retrofit(model, ratio=1.0)
    assert handle.modules and not any(m.training for m in model.modules())


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _prefill(model, handle, x, mask):
    cache = handle.new_cache()
    with torch.no_grad():
        model(x, attention_mask=mask, past_key_values=cache, use_cache=True)
    return cache


def _step(model, cache, token, mask):
    with torch.no_grad():
        return model(token, attention_mask=mask, past_key_values=cache, use_cache=True).logits


def test_reorder_cache_moves_states_keys_and_padding_with_the_beams():
    """After ``reorder_cache`` a type-C cache decodes as if prefilled in the new row order."""
    model = _llama()
    handle = retrofit(model, ratio=0.5, head_mix=0.5)
    x, mask = _ids(2, 7, seed=1), torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # the second row is left-padded
    order = torch.tensor([1, 0])
    moved = _prefill(model, handle, x, mask)
    moved.reorder_cache(order)
    fresh = _prefill(model, handle, x[order], mask[order])
    token = _ids(2, 1, seed=2)
    step_mask = torch.cat([mask[order], torch.ones(2, 1, dtype=torch.long)], dim=1)
    got = _step(model, moved, token, step_mask)
    want = _step(model, fresh, token, step_mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_batch_repeat_interleave_repeats_each_row_next_to_itself():
    """``batch_repeat_interleave(2)`` turns rows [a, b] into [a, a, b, b] (states and K/V)."""
    model = _llama()
    handle = retrofit(model, ratio=0.5, head_mix=0.5)
    x, mask = _ids(2, 6, seed=3), torch.ones(2, 6, dtype=torch.long)
    repeated = _prefill(model, handle, x, mask)
    repeated.batch_repeat_interleave(2)
    fresh = _prefill(model, handle, x.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
    token = _ids(4, 1, seed=4)
    step_mask = torch.ones(4, 7, dtype=torch.long)
    got = _step(model, repeated, token, step_mask)
    torch.testing.assert_close(got, _step(model, fresh, token, step_mask), rtol=1e-10, atol=1e-10)


def test_head_mix_rounds_half_a_kv_group_up():
    """head_mix=0.375 of 4 K/V groups converts round_half_up(1.5) = 2 groups (4 of 8 heads)."""
    model = _llama(heads=8, kv_heads=4, layers=1)
    handle = retrofit(model, ratio=1.0, head_mix=0.375)
    (layer,) = handle.modules.values()
    assert (layer.retention_kv_heads, layer.retention_heads) == (2, 4)


@torch.no_grad()
def test_soft_capped_type_c_heads_keep_a_left_padded_batch_finite():
    """Gemma2's soft-capped softmax heads: a left-padded row equals its unpadded run, no NaN."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        **TINY_GQA,
        num_hidden_layers=2,
        head_dim=16,
        sliding_window=16,
        query_pre_attn_scalar=16,
        final_logit_softcapping=None,
        attn_logit_softcapping=50.0,
        pad_token_id=0,
    )
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    retrofit(model, ratio=0.5, head_mix=0.5)
    x, mask = _ids(2, 7, seed=1), torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(x, attention_mask=mask, position_ids=pos, use_cache=False).logits
    solo = model(x[1:, 3:], use_cache=False).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1, 3:], solo[0], rtol=1e-5, atol=1e-5)


def test_olmo_clip_qkv_clamps_the_converted_projections():
    """A converted OLMo layer clamps q, k and v to +-clip_qkv, as OLMo's attention does."""
    torch.manual_seed(0)
    cfg = transformers.OlmoConfig(
        **TINY_GQA,
        num_hidden_layers=1,
        clip_qkv=0.05,
    )
    model = transformers.OlmoForCausalLM(cfg).to(F64).eval()
    layer = retrofit(model, ratio=1.0).modules[0]
    x = torch.randn(1, 5, 64, dtype=F64)
    with torch.no_grad():
        q, k, v = layer._project(x)
        want = [
            proj(x).clamp(-0.05, 0.05).view(1, 5, -1, 16).transpose(1, 2)
            for proj in (layer.q_proj, layer.k_proj, layer.v_proj)
        ]
    for got, ref in zip((q, k, v), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert q.abs().max() == 0.05


@torch.no_grad()
def test_type_c_sliding_layer_without_a_mask_keeps_its_window():
    """Called without a mask, a type-C sliding layer's softmax heads still see only the window."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        **TINY_GQA,
        num_hidden_layers=1,
        head_dim=16,
        sliding_window=4,
    )
    model = transformers.MistralForCausalLM(cfg).to(F64).eval()
    layer = retrofit(model, ratio=1.0, head_mix=0.5).modules[0]
    x = torch.randn(2, 9, 64, dtype=F64)
    pos = torch.arange(9)[None].expand(2, 9)
    rope = model.model.rotary_emb(x, pos)
    unmasked = layer(x, position_embeddings=rope, attention_mask=None)[0]
    everything_real = torch.ones(2, 9, dtype=torch.bool)
    masked = layer(x, position_embeddings=rope, attention_mask=everything_real)[0]
    torch.testing.assert_close(unmasked, masked, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay", [1.0, 0.0, [0.5, 1.0]], ids=str)
def test_a_decay_of_zero_or_one_is_refused(decay):
    """A decay of exactly 0 or 1 lies outside (0, 1) and is refused."""
    with pytest.raises(ValueError, match=r"decay values must lie in \(0, 1\)"):
        resolve_decay(decay, 2)


def test_multihead_retention_applies_key_padding_together_with_a_causal_mask():
    """key_padding_mask still zeroes the pads when a causal attn_mask comes with it."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(32, 4, batch_first=True).to(F64)
    layer = retrofit(holder, ratio=1.0).modules[0]
    x = torch.randn(2, 6, 32, dtype=F64)
    padded = torch.cat([torch.randn(2, 2, 32, dtype=F64), x], 1)
    pads = torch.zeros(2, 8, dtype=torch.bool)
    pads[:, :2] = True  # True = padding, torch's convention
    causal = torch.ones(8, 8, dtype=torch.bool).triu(1)  # True = masked out
    with torch.no_grad():
        want = layer(x, x, x)[0]
        got = layer(padded, padded, padded, key_padding_mask=pads, attn_mask=causal)[0]
    torch.testing.assert_close(got[:, 2:], want, rtol=1e-10, atol=1e-10)


def test_a_cache_filled_before_retrofit_is_refused():
    """A cache holding K/V for a layer that retrofit then converted raises, naming the layer."""
    model = _llama()
    x = _ids(1, 5, seed=6)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(x, past_key_values=cache, use_cache=True)
    retrofit(model, ratio=0.5)
    with pytest.raises(ValueError, match="cache layer 0 already holds attention keys/values"):
        with torch.no_grad():
            model(x[:, -1:], past_key_values=cache, use_cache=True)


# -- distill --------------------------------------------------------------------------------------


def _distill_setup():
    model = _llama()
    teacher = copy.deepcopy(model)
    handle = retrofit(model, ratio=1.0)
    return model, teacher, handle, [_ids(2, 8, seed=5)]


def test_stage1_reports_the_mean_over_layers_of_the_layer_mse():
    """The first stage-1 loss is the mean over converted layers of MSE(layer, attention)."""
    model, teacher, handle, data = _distill_setup()
    seen = {}
    names = [n for n, m in model.named_modules() if m in handle.modules.values()]
    hooks = [
        teacher.get_submodule(n).register_forward_hook(
            lambda mod, args, kwargs, out, n=n: seen.__setitem__(n, (args, kwargs, out[0])),
            with_kwargs=True,
        )
        for n in names
    ]
    with torch.no_grad():
        teacher(data[0], use_cache=False)
        for h in hooks:
            h.remove()
        mses = []
        for n in names:
            args, kwargs, target = seen[n]
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
            out = model.get_submodule(n)(*args, **kwargs)[0]
            mses.append(F.mse_loss(out, target).item())
    assert len(mses) == 2 and abs(mses[0] - mses[1]) > 1e-3 * max(mses)
    result = distill(model, teacher, data, stage1_steps=1, progress=False)
    assert result.stage1[0] == pytest.approx(sum(mses) / 2, rel=1e-5)


def test_stage2_reports_the_tempered_kl_from_teacher_to_student():
    """The first stage-2 loss is T^2 * KL(teacher_T || student_T) per token, before any step."""
    model, teacher, _, data = _distill_setup()
    T = 2.0
    with torch.no_grad():
        p = F.log_softmax(teacher(data[0]).logits / T, -1).flatten(0, -2)
        q = F.log_softmax(model(data[0]).logits / T, -1).flatten(0, -2)
        want = (p.exp() * (p - q)).sum(-1).mean().item() * T * T
    result = distill(
        model, teacher, data, stage1_steps=0, stage2_steps=1, temperature=T, progress=False
    )
    assert result.stage2[0] == pytest.approx(want, rel=1e-4)


def test_stage1_layer_params_trains_the_converted_projections_only():
    """``stage1_params="layer"`` updates the converted layers' projections, nothing else."""
    model, teacher, handle, data = _distill_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    distill(model, teacher, data, stage1_steps=2, stage1_params="layer", progress=False)
    layer_params = {id(p) for m in handle.modules.values() for p in m.parameters()}
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (id(p) in layer_params), name


def test_distill_leaves_the_model_in_the_mode_it_found():
    """An eval-mode student is back in eval mode after end-to-end fine-tuning."""
    model, teacher, _, data = _distill_setup()
    distill(model, teacher, data, stage1_steps=0, stage2_steps=1, progress=False)
    assert not model.training
    assert not any(m.training for m in model.modules())
