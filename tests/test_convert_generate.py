"""Generation edge cases of retrofitted models: static caches, autocast, undo, batch changes.

- ``generate(cache_implementation="static")`` and an explicit ``StaticCache``: the converted
  layers read the new tokens' mask columns at their cache positions, kept attention layers keep
  their static slots, and the tokens and scores equal the dynamic cache's (float64).
- ``torch.autocast`` on a float32 model: every family's converted layer hands the ops one dtype
  (autocast's) and stays close to the float32 run.
- ``handle.new_cache()`` after ``undo()`` and a cache reused with another batch size raise a
  ``ValueError`` that says what to do.
Tiny random models, CPU.
"""

from __future__ import annotations

import pytest
import torch
from models import MHAModel
from torch import nn

from rtpcompile.convert import retrofit
from rtpcompile.convert.cache import RetentionCacheLayer, key_valid

transformers = pytest.importorskip(
    "transformers", reason="retrofit of Hugging Face models needs the transformers extra"
)

from test_convert_families import COMMON, VARIANTS, VOCAB  # noqa: E402 - after the importorskip

# family -> (config class, model class, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_key_value_heads=2, sliding_window=6),
    ),
    # NOTE: the fused families as the family tests build them (Falcon: its grouped layout)
    **{name: VARIANTS[name][:3] for name in ("phi3", "neox", "phi")},
    "falcon": VARIANTS["falcon-grouped"][:3],
}


def tiny(family: str, dtype: torch.dtype = torch.float64, attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, pad_token_id=0
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        config_cls, model_cls, extra = FAMILIES[family]
        cfg = getattr(transformers, config_cls)(**COMMON, **extra)
        model = getattr(transformers, model_cls)(cfg)
    model.config._attn_implementation = attn
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # never stop early
    return model


def ids(batch: int = 1, length: int = 9, seed: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second with 4 pads in front."""
    x = ids(2)
    mask = torch.ones_like(x)
    x[1, :4], mask[1, :4] = 0, 0
    return x, mask


# -- static caches -------------------------------------------------------------------------------


def test_key_valid_reads_the_new_tokens_at_their_cache_positions():
    # a static cache's mask: 8 columns (cache slots), 3 tokens seen, 2 new; slot 0 is padding
    visible = torch.ones(1, 1, 2, 8, dtype=torch.bool)
    visible[..., 0] = False
    visible[..., 5:] = False  # empty slots after the new tokens
    visible[0, 0, 0, 4] = False  # causal: the first new token does not see the second
    assert key_valid(visible, 1, 2, seen=3).tolist() == [[True, True]]
    assert key_valid(visible, 1, 2).tolist() == [[False, False]]  # the last columns: empty slots
    assert key_valid(visible[..., :5], 1, 2, seen=3).tolist() == [[True, True]]  # dynamic
    pad = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert key_valid(pad[:, None, None, :].expand(1, 1, 1, 8), 1, 1, seen=0).tolist() == [[False]]
    # a sliding window mask that no longer has room for [seen, seen + T): the last columns
    assert key_valid(torch.ones(1, 1, 1, 4, dtype=torch.bool), 1, 1, seen=10).tolist() == [[True]]


CASES = [
    ("llama", "sdpa", 0.5, None),
    ("llama", "eager", 1.0, None),
    ("mistral", "sdpa", 0.5, 0.5),
    ("gpt2", "sdpa", 0.5, None),
]


@pytest.mark.parametrize("family, attn, ratio, head_mix", CASES, ids=lambda p: str(p))
def test_generate_with_static_cache_equals_dynamic(family, attn, ratio, head_mix):
    model = tiny(family, attn=attn)
    retrofit(model, ratio=ratio, head_mix=head_mix)
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    for x, mask in [(ids(), None), left_padded()]:
        dynamic = model.generate(x, attention_mask=mask, **kw)
        static = model.generate(x, attention_mask=mask, cache_implementation="static", **kw)
        assert torch.equal(static.sequences, dynamic.sequences)
        diff = (torch.stack(static.scores) - torch.stack(dynamic.scores)).abs().max()
        assert diff < 1e-10


def test_explicit_static_cache_keeps_static_attention_slots():
    model = tiny("llama")
    handle = retrofit(model, ratio=0.5)
    x = ids(length=10)
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :7], past_key_values=cache).logits
        rest = [model(x[:, t : t + 1], past_key_values=cache).logits for t in range(7, 10)]
    got = torch.cat([first, *rest], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9)
    kept = [cache.layers[i] for i in range(2) if i not in handle.retention_cache_layers()]
    assert [type(layer).__name__ for layer in kept] == ["StaticLayer"]
    slot = cache.layers[handle.retention_cache_layers()[0]]
    assert isinstance(slot, RetentionCacheLayer) and slot.seen == 10
    assert slot.get_mask_sizes(1) == (16, 0) and slot.get_max_length() == 16
    assert cache.is_compileable  # else the model skips the decode mask of the static layers


# -- autocast --------------------------------------------------------------------------------------


class GenericAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)


def _plain_model(kind: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    if kind == "mha":
        return MHAModel(layers=2), {}
    pick = {"predicate": lambda name, m: isinstance(m, GenericAttention)}
    return nn.Sequential(GenericAttention(), nn.GELU(), GenericAttention()), pick


@pytest.mark.parametrize("family", [*FAMILIES, "gpt2"])
def test_autocast_bfloat16_on_a_float32_model(family):
    model = tiny(family, dtype=torch.float32)
    handle = retrofit(model, ratio=0.5)
    x = ids(2)
    with torch.no_grad():
        want = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(x).logits.float()
            cache = handle.new_cache()
            first = model(x[:, :6], past_key_values=cache).logits.float()
            last = model(x[:, 6:], past_key_values=cache).logits.float()
    scale = want.abs().max()
    for got in (plain, torch.cat([first, last], dim=1)):
        assert (got - want).abs().max() < 0.05 * scale


@pytest.mark.parametrize("kind", ["mha", "generic"])
def test_autocast_bfloat16_plain_modules(kind):
    model, kw = _plain_model(kind)
    retrofit(model, ratio=1.0, **kw)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


# -- undo and reuse -----------------------------------------------------------------------------


def test_new_cache_after_undo_is_refused():
    model = tiny("llama")
    handle = retrofit(model, ratio=0.5)
    assert handle.retention_cache_layers() == [0]
    handle.undo()
    assert handle.retention_cache_layers() == []
    with pytest.raises(ValueError, match=r"after handle.undo\(\).*DynamicCache"):
        handle.new_cache()
    again = retrofit(model, ratio=0.5)  # a new retrofit gives a usable cache again
    assert isinstance(again.new_cache().layers[0], RetentionCacheLayer)


def test_each_handle_builds_the_cache_of_the_layers_retention_now():
    """Two retrofits, the first undone: the second's cache kept a retention slot for layer 0,
    attention again, whose keys nothing counted (prefill + decode off by 0.35). And the first
    handle's cache, before that, lacked the second's layer 1."""
    model = tiny("llama")
    first = retrofit(model, placement=[0])
    second = retrofit(model, placement=[1])
    assert first.retention_cache_layers() == second.retention_cache_layers() == [0, 1]
    first.undo()
    assert first.retention_cache_layers() == second.retention_cache_layers() == [1]
    x = ids(2, length=12)
    with torch.no_grad():
        full = model(x).logits
        cache = second.new_cache()
        steps = [model(x[:, :8], past_key_values=cache).logits]
        steps += [model(x[:, t : t + 1], past_key_values=cache).logits for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("placement", ["front", "back"])
def test_cache_reused_with_another_batch_size_names_both(placement):
    """With the kept attention layers first (``back``) their ``torch.cat`` failed first, with
    torch's size message, until 2026-11-25."""
    model = tiny("llama", dtype=torch.float32)
    handle = retrofit(model, ratio=0.5, placement=placement)
    cache = handle.new_cache()
    with torch.no_grad():
        model(ids(2), past_key_values=cache)
        with pytest.raises(ValueError, match="cache holds batch 2 but the input has batch 1"):
            model(ids(1, length=1), past_key_values=cache)


# -- mixed sliding/full attention, crop, reload ---------------------------------------------------


def _mixed_gemma3() -> nn.Module:
    torch.manual_seed(0)
    layer_types = ["sliding_attention", "full_attention"] * 2
    cfg = transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 4}, head_dim=16, num_key_value_heads=2,
        sliding_window=16, layer_types=layer_types,
    )  # fmt: skip
    model = transformers.Gemma3ForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    model = model.double().eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("placement", [[0], [0, 2], [1]])
def test_a_converted_sliding_layer_generates_as_recompute(placement):
    """A dynamic sliding layer's window was taken for a static cache length (until 2026-11-24):
    the converted slot then sized the full-attention mask to it and batched generate failed."""
    model = _mixed_gemma3()
    handle = retrofit(model, placement=placement)
    with torch.no_grad():
        for layer in handle.modules.values():
            layer.out_norm.mul_(1.5)  # not the identity at the start
    x, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    cached = model.generate(x, past_key_values=handle.new_cache(), **kw)
    torch.testing.assert_close(cached, model.generate(x, use_cache=False, **kw), rtol=0, atol=0)
    slot = handle.new_cache().layers[placement[0]]
    assert isinstance(slot, RetentionCacheLayer) and slot.get_max_length() < 0  # dynamic


def test_crop_is_refused_before_any_layer_is_cut():
    model = tiny("llama")
    handle = retrofit(model, ratio=0.5, placement="back")  # attention 0, retention 1
    cache = handle.new_cache()
    with torch.no_grad():
        model(ids(1, 8), past_key_values=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-3)
    assert [layer.get_seq_length() for layer in cache.layers] == [8, 8]


def test_reloading_a_retrofitted_model_by_retrofit_then_load_state_dict():
    """docs/retrofit.md's recipe: from_pretrained drops the new parameters, so build, retrofit
    with the same arguments, then load the saved state dict."""
    model = tiny("llama")
    handle = retrofit(model, ratio=0.5)
    with torch.no_grad():
        for layer in handle.modules.values():
            layer.out_norm.mul_(1.5)
            layer.decay_logit.add_(0.25)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = tiny("llama")
    retrofit(fresh, ratio=0.5)
    fresh.load_state_dict(saved)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids()).logits, model(ids()).logits, rtol=0, atol=0)


# -- attention dropout of a type-C layer's softmax heads -----------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_type_c_softmax_heads_apply_the_models_attention_dropout_while_training(family):
    """Found 2026-11-26: the softmax heads of a ``head_mix`` layer never dropped attention
    weights, where the attention they replace drops them with the model's probability."""
    model = tiny(family, dtype=torch.float32)
    for module in model.modules():  # NOTE: only the attention weights' dropout stays
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if family == "gpt2":
        for block in model.transformer.h:
            block.attn.attn_dropout.p = 0.5
    else:
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.5
    retrofit(model, ratio=1.0, head_mix=0.5)
    x = ids(2, 9)
    model.train()
    torch.manual_seed(0)
    a = model(x, use_cache=False).logits
    b = model(x, use_cache=False).logits
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(x, use_cache=False).logits, model(x, use_cache=False).logits)
