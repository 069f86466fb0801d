"""Retrofit and distill inputs found wrong or unchecked (2026-11-25): RetNet decays for many
heads, a generic layer handed a mask, MultiheadAttention's extra key/value, placements that
convert nothing or everything, distill's arguments and teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rtpcompile.convert import distill, retrofit
from rtpcompile.convert.decay import resolve_decay, resolve_logit
from rtpcompile.convert.placement import select_layers

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face models need the transformers extra"
)


def _llama(heads: int = 4, kv: int = 2, hidden: int = 64, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


def _ids(n=1):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (2, 12), generator=gen) for _ in range(n)]


def test_retnet_decays_of_many_heads_have_finite_trainable_logits():
    """gamma_h = 1 - 2**(-5 - h) is 1.0 in float32 from h = 19 on: its logit was +inf (no
    gradient), now log(2**(5 + h) - 1) in closed form."""
    logit = resolve_logit("retnet", 32)
    assert torch.isfinite(logit).all()
    a = 5.0 + torch.arange(32, dtype=torch.float64)
    torch.testing.assert_close(torch.sigmoid(logit[:12]), 1 - 2.0 ** -a[:12], rtol=0, atol=1e-15)
    model = _llama(heads=32, kv=8, hidden=128)
    retrofit(model, ratio=1.0)
    layer = model.model.layers[0].self_attn
    assert torch.isfinite(layer.decay_logit).all()
    model(_ids()[0]).logits.square().mean().backward()
    assert (layer.decay_logit.grad[19:] != 0).all()  # NOTE: 0 when gamma is computed in float32


def test_a_decay_close_to_one_keeps_float64_precision():
    """A float32 cast made 1 - 1e-8 read 1.0 and refused it."""
    gamma = resolve_decay([0.9, 1 - 1e-8], 2)
    assert gamma.dtype == torch.float64 and gamma[1] < 1


@pytest.mark.parametrize("decay", [[0.9, float("nan")], lambda n: torch.full((n,), float("nan"))])
def test_a_nan_decay_is_refused_at_retrofit(decay):
    """NaN passed ``(g <= 0) | (g >= 1)``: the first forward failed deep in the op instead,
    with a message about a learnable decay."""
    with pytest.raises(ValueError, match=r"decay values must lie in \(0, 1\), got .*nan"):
        resolve_decay(decay, 2)


def test_layer_indices_from_numpy_or_torch_are_indices():
    """``np.int64(1)`` was "out of range for 4 attention layers (expected 0..3)"."""
    import numpy as np

    assert select_layers(4, 0.5, list(np.arange(4)[1::2])) == [1, 3]
    assert select_layers(4, 0.5, [torch.tensor(1), np.int32(-1)]) == [1, 3]
    assert select_layers(4, 0.5, np.arange(4)[1::2]) == select_layers(4, 0.5, torch.tensor([1, 3]))
    for bad in (1.0, True, torch.tensor(True), "1"):
        with pytest.raises(ValueError, match="layer indices must be integers"):
            select_layers(4, 0.5, [bad])
    with pytest.raises(ValueError, match="layer index 4 is out of range"):
        select_layers(4, 0.5, [np.int64(4)])


class Attention(nn.Module):
    """A plain attention the generic converter takes (picked with a predicate)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.num_heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, key_padding_mask=None):
        return self.o_proj(self.v_proj(x))  # NOTE: the body is replaced by the conversion


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x, mask=None):
        return self.attn(x, key_padding_mask=mask)


def test_a_generic_layer_refuses_a_mask_it_would_ignore():
    net = Net()
    retrofit(net, ratio=1.0, predicate=lambda name, m: isinstance(m, Attention))
    x = torch.randn(1, 5, 16)
    assert net(x).shape == (1, 5, 16)  # NOTE: None is fine
    with pytest.raises(ValueError, match="applies no mask.*key_padding_mask"):
        net(x, torch.zeros(1, 5, dtype=torch.bool))


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_multihead_attention_with_an_extra_key_value_is_refused(extra):
    """bias_k / bias_v dropped out of the state dict silently."""

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True, **extra)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    with pytest.raises(ValueError, match="add_bias_kv=True or add_zero_attn=True"):
        retrofit(WithMHA(), ratio=1.0)


def test_placements_that_convert_nothing_or_everything_say_so():
    with pytest.warns(UserWarning, match="rounds to 0 layers"):
        assert select_layers(4, 0.1, "front") == []
    with pytest.raises(ValueError, match="no group of 8 is complete"):
        select_layers(4, 0.5, "interleave:8")
    assert select_layers(5, 0.5, "interleave:2") == [0, 2, 4]  # NOTE: the last group, whole


def _retrofitted():
    model = _llama()
    teacher = copy.deepcopy(model)
    retrofit(model, ratio=0.5)
    return model, teacher


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0}, "temperature must be a positive number"),
        ({"temperature": -1.0}, "temperature must be a positive number"),
        ({"log_every": 0}, "log_every must be a positive int"),
        ({"stage1_steps": 2.5}, "stage1_steps must be an int"),
    ],
)
def test_distill_refuses_bad_arguments_before_training(kwargs, match):
    """temperature=0 made every parameter NaN; log_every=0 a ZeroDivisionError."""
    model, teacher = _retrofitted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        distill(model, teacher, _ids(), stage2_steps=1, progress=False, **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_distill_refuses_a_converted_a_mismatched_or_a_foreign_teacher():
    model, teacher = _retrofitted()
    with pytest.raises(ValueError, match="is converted too"):
        distill(model, copy.deepcopy(model), _ids(), progress=False)
    with pytest.raises(ValueError, match="bfloat16 and the model's torch.float32"):
        distill(model, copy.deepcopy(teacher).to(torch.bfloat16), _ids(), progress=False)
    with pytest.raises(ValueError, match="has no module at 'model.layers.0.self_attn'"):
        distill(model, nn.Linear(2, 2), _ids(), progress=False)
    with pytest.raises(ValueError, match=r"\[B, T\] tensor of token ids"):
        distill(model, teacher, [torch.randint(0, 97, (8,))], progress=False)


def test_distill_trains_the_module_inside_a_compile_wrapper():
    model, teacher = _retrofitted()
    result = distill(torch.compile(model), teacher, _ids(), stage1_steps=2, progress=False)
    assert len(result.stage1) == 2


def test_distill_stops_at_a_non_finite_loss_before_updating(monkeypatch):
    import sys

    module = sys.modules["rtpcompile.convert.distill"]  # NOTE: the package's name is the function

    model, teacher = _retrofitted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(module, "_layer_loss", lambda *a: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="stage 1 loss is nan at step 1"):
        distill(model, teacher, _ids(), stage1_steps=3, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class LlamaShaped(nn.Module):
    """q/k/v/o_proj and head_dim: the llama family, found without a predicate."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, attn_mask=None):
        return self.o_proj(self.v_proj(x)), None


class VisionAttention(LlamaShaped):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return self.o_proj(self.v_proj(hidden_states)), None


def _skipped(model):
    from rtpcompile.convert.find import survey

    sites, skipped = survey(model)
    return [s.name for s in sites], {s.name: s.reason for s in skipped}


def test_a_llama_shaped_module_with_arguments_it_would_lose_is_kept():
    """``forward(x, attn_mask)``: converted with Hugging Face's signature, ``attn_mask=`` was
    dropped silently and a positional mask taken for the rotary (cos, sin), found 2026-11-25."""
    sites, skipped = _skipped(nn.ModuleDict({"a": LlamaShaped()}))
    assert sites == [] and "its forward takes attn_mask" in skipped["a"]


def test_a_vision_towers_attention_is_kept():
    """Mllama's and Llama 4's vision attention have no ``is_causal``: converted to causal
    retention until 2026-11-25 (any image forward then failed). A vision-language model's text
    attention (Granite 4 Vision's ``...VisionTextAttention``) is not a vision tower."""
    text = type("MyVisionTextAttention", (VisionAttention,), {})
    sites, skipped = _skipped(nn.ModuleDict({"v": VisionAttention(), "t": text()}))
    assert sites == ["t"] and "vision tower" in skipped["v"]


def test_a_picked_llama_shaped_module_with_its_own_arguments_is_generic():
    """The refusal above advises ``predicate=``: the module then goes to the generic converter,
    which refuses the mask it would ignore instead of dropping it."""
    model = nn.ModuleDict({"a": LlamaShaped()})
    handle = retrofit(model, ratio=1.0, predicate=lambda name, module: name == "a")
    assert handle.sites[0].family == "generic"
    x = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="attn_mask"):
        model["a"](x, attn_mask=torch.ones(1, 5, dtype=torch.bool))


def test_a_positional_mask_is_not_taken_for_the_rotary():
    """``forward(x, attention_mask)`` passes the name check; called positionally, the mask
    reached the converted layer as ``position_embeddings``."""
    plain = type("PlainAttention", (VisionAttention,), {})  # forward(hidden_states, mask)
    model = nn.ModuleDict({"a": plain()})
    retrofit(model, ratio=1.0)
    with pytest.raises(ValueError, match=r"position_embeddings must be the rotary \(cos, sin\)"):
        model["a"](torch.randn(1, 5, 16), torch.ones(1, 1, 5, 5, dtype=torch.bool))


def test_an_attention_shared_by_two_parents_is_kept():
    """``named_modules()`` lists a shared module once: retrofit swapped it in its first parent
    only and reported every layer converted."""
    shared = nn.MultiheadAttention(16, 2, batch_first=True)
    model = nn.ModuleList([nn.ModuleDict({"attn": shared}), nn.ModuleDict({"attn": shared})])
    sites, skipped = _skipped(model)
    assert sites == [] and "reachable at 2 module paths" in skipped["0.attn"]
    with pytest.raises(ValueError, match="reachable at 2 module paths"):
        retrofit(model, ratio=1.0)


def _mllama():
    from transformers.models.mllama import configuration_mllama as cm

    torch.manual_seed(0)
    text = cm.MllamaTextConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=[1],
        max_position_embeddings=64,
        pad_token_id=0,
    )
    vision = cm.MllamaVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = cm.MllamaConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    return transformers.MllamaForConditionalGeneration(config).eval()


def test_mllama_text_layers_decode_with_a_new_cache():
    """Mllama's text model asks every cache layer ``is_initialized and keys.numel()`` (its
    cross-attention check): a retention slot held ``keys = None`` and the first cached call
    raised ``AttributeError`` until 2026-11-25. Token-by-token decode now equals the full
    forward; the slot's K/V stay empty (type A holds no K/V)."""
    model = _mllama()
    handle = retrofit(model, ratio=1.0)
    assert len(handle.converted) == 3  # the three causal self-attention layers of the text model
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = handle.new_cache()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        steps = [model(input_ids=ids[:, :5], cache=cache).logits]
        steps += [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    slot = cache.layers[0]
    assert slot.keys.numel() == 0 and slot.state is not None and cache.get_seq_length() == 9
    cache.reset()
    assert slot.keys.numel() == 0 and slot.state is None
