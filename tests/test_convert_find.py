"""retrofit discovery: what may become retention, geometry, re-retrofit, memory, distill data.

Retention is causal self-attention: cross-attention and bidirectional attention are kept (or
refused when picked), converted layers are never converted again, the generic family reads its
GQA geometry or refuses, the memory report matches the cache bytes (sliding windows from the
config, float64 states), and distill's data errors say what went wrong. Tiny models, CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_hf, token_ids
from torch import nn

from rtpcompile.convert import distill, find_attention, memory_report, retrofit
from rtpcompile.convert.layers import RetrofitRetention

transformers = pytest.importorskip(
    "transformers", reason="retrofit of Hugging Face models needs the transformers extra"
)


def _llama_like(config: str, model: str, **extra):
    torch.manual_seed(0)
    kw = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    kw.update(extra)
    return getattr(transformers, model)(getattr(transformers, config)(**kw)).eval()


# -- cross-attention and bidirectional attention ---------------------------------------------------


def test_torch_decoder_keeps_cross_attention():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    dec = nn.TransformerDecoder(layer, 2).eval()
    handle = retrofit(dec, ratio=1.0)
    assert [s.name for s in handle.sites] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert [s.name for s in handle.skipped] == [
        "layers.0.multihead_attn",
        "layers.1.multihead_attn",
    ]
    assert "cross-attention" in handle.skipped[0].reason and "not convertible" in repr(handle)
    assert isinstance(dec.layers[0].multihead_attn, nn.MultiheadAttention)
    tgt, mem = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    with torch.no_grad():
        assert not torch.allclose(dec(tgt, mem), dec(tgt, mem + 5.0))  # still reads the memory
        assert dec(tgt, torch.randn(2, 4, 32)).shape == (2, 6, 32)
    with pytest.raises(ValueError, match=r"'layers.0.multihead_attn'.*cross-attention"):
        retrofit(dec, predicate=lambda name, m: name.endswith("multihead_attn"))


def test_torch_encoder_is_refused():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 2).eval()
    with pytest.raises(ValueError, match=r"none can become retention.*layers.0.self_attn.*causal"):
        retrofit(enc, ratio=1.0)
    with pytest.raises(ValueError, match=r"predicate picked 'layers.1.self_attn'.*Encoder"):
        retrofit(enc, predicate=lambda name, m: name == "layers.1.self_attn")
    assert isinstance(enc.layers[0].self_attn, nn.MultiheadAttention)


class _Bidirectional(nn.Module):
    """Llama-shaped attention that declares itself non-causal (an encoder / vision tower)."""

    is_causal = False

    def __init__(self):
        super().__init__()
        self.head_dim = 8
        self.q_proj, self.k_proj = nn.Linear(32, 32), nn.Linear(32, 32)
        self.v_proj, self.o_proj = nn.Linear(32, 32), nn.Linear(32, 32)


def test_non_causal_attention_is_skipped_or_refused():
    model = nn.ModuleDict({"enc": _Bidirectional(), "other": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match=r"enc \(_Bidirectional\): is_causal=False"):
        retrofit(model)
    with pytest.raises(ValueError, match=r"predicate picked 'enc'.*is_causal=False"):
        retrofit(model, predicate=lambda name, m: name == "enc")
    assert find_attention(model) == []


@pytest.mark.skipif(not hasattr(transformers, "MllamaForCausalLM"), reason="no Mllama")
def test_mllama_cross_attention_layer_is_kept():
    torch.manual_seed(0)
    cfg = transformers.MllamaTextConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=[1],
        max_position_embeddings=128,
        pad_token_id=0,
    )
    model = transformers.MllamaForCausalLM(cfg).eval()
    handle = retrofit(model, ratio=1.0)
    names = [s.name for s in handle.sites]
    assert names == [
        "model.layers.0.self_attn",
        "model.layers.2.self_attn",
        "model.layers.3.self_attn",
    ]
    assert [s.cache_index for s in handle.sites] == [0, 2, 3]
    assert [s.name for s in handle.skipped] == ["model.layers.1.cross_attn"]
    assert not isinstance(model.model.layers[1].cross_attn, RetrofitRetention)
    with pytest.raises(ValueError, match="cross-attention"):
        retrofit(model, predicate=lambda name, m: name.endswith("cross_attn"))


@pytest.mark.skipif(not hasattr(transformers, "PixtralVisionModel"), reason="no Pixtral")
def test_pixtral_vision_encoder_is_refused():
    cfg = transformers.PixtralVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        head_dim=16,
    )
    model = transformers.PixtralVisionModel(cfg).eval()
    with pytest.raises(ValueError, match=r"transformer.layers.0.attention.*is_causal=False"):
        retrofit(model, ratio=1.0)


# -- a second retrofit --------------------------------------------------------------------------


def test_retrofit_twice_keeps_converted_layers():
    model = tiny_hf("llama")
    first = retrofit(model, ratio=0.5)
    layer0 = first.modules[0]
    with torch.no_grad():
        layer0.out_norm.mul_(3.0)
        layer0.decay_logit.add_(1.0)
    trained = (layer0.out_norm.clone(), layer0.decay_logit.clone())
    second = retrofit(model, placement=[0, 2])
    assert model.model.layers[0].self_attn is layer0
    assert torch.equal(layer0.out_norm, trained[0]) and torch.equal(layer0.decay_logit, trained[1])
    assert [s.converted for s in second.sites] == [True, True, False, False]
    assert second.earlier == [0, 1] and second.converted == [2]
    assert second.retention_cache_layers() == [0, 1, 2]
    text = repr(second)
    assert text.count("converted earlier, left as is") == 2 and "[3]" in text
    rep = memory_report(model, seq_len=10)
    assert [r.kind for r in rep.layers] == ["retention"] * 3 + ["attention"]
    assert retrofit(model, ratio=1.0).converted == [3]  # only the layer still attention
    second.undo()
    assert model.model.layers[0].self_attn is layer0
    assert not isinstance(model.model.layers[2].self_attn, RetrofitRetention)


# -- generic geometry -----------------------------------------------------------------------------


class _FusedGQA(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = 4, 2, 16
        self.qkv = nn.Linear(64, (4 + 2 * 2) * 16)
        self.o_proj = nn.Linear(64, 64)


class _SplitGQA(nn.Module):
    def __init__(self, kv_width=32):
        super().__init__()
        self.num_heads = 4
        self.q_proj, self.k_proj = nn.Linear(64, 64), nn.Linear(64, kv_width)
        self.v_proj, self.o_proj = nn.Linear(64, kv_width), nn.Linear(64, 64)


def _pick(cls):
    return lambda name, m: isinstance(m, cls)


def test_generic_fused_gqa_is_refused_with_geometry():
    model = nn.Sequential(_FusedGQA())
    with pytest.raises(ValueError, match=r"'0' \(_FusedGQA\).*4 query heads, 2 K/V heads"):
        retrofit(model, ratio=1.0, predicate=_pick(_FusedGQA))


def test_generic_separate_gqa_geometry_and_forward():
    torch.manual_seed(0)
    model = nn.Sequential(_SplitGQA(), _SplitGQA())
    handle = retrofit(model, ratio=1.0, predicate=_pick(_SplitGQA))
    geometry = [(s.num_heads, s.num_kv_heads, s.head_dim) for s in handle.sites]
    assert geometry == [(4, 2, 16), (4, 2, 16)]
    assert model(torch.randn(1, 5, 64)).shape == (1, 5, 64)


def test_generic_inconsistent_geometry_is_refused():
    model = nn.Sequential(_SplitGQA(kv_width=24))
    with pytest.raises(ValueError, match=r"cannot determine the head geometry of '0'.*k_proj"):
        retrofit(model, ratio=1.0, predicate=_pick(_SplitGQA))


# -- head_mix that would convert every head -------------------------------------------------------


def test_head_mix_on_mqa_is_refused():
    model = _llama_like("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"head_mix=0.5 cannot split layer 0.*single K/V head"):
        retrofit(model, head_mix=0.5)
    assert not any(isinstance(m, RetrofitRetention) for m in model.modules())
    with pytest.raises(ValueError, match=r"2 K/V heads.*head_mix < 0.75"):
        retrofit(tiny_hf("llama"), head_mix=0.75)
    assert retrofit(model, head_mix=1.0).modules[0].retention_heads == 4


# -- memory report against the cache --------------------------------------------------------------


def _decode_and_report(model, handle, seq_len=12):
    cache = handle.new_cache()
    with torch.no_grad():
        model(token_ids(2, seq_len - 3), past_key_values=cache, use_cache=True)
        for step in range(3):
            model(token_ids(2, 1, seed=step), past_key_values=cache, use_cache=True)
    return memory_report(model, seq_len=seq_len, batch=2), cache.nbytes()["total"]


def test_memory_report_reads_sliding_window_from_config():
    model = _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=4)
    assert not isinstance(getattr(model.model.layers[0].self_attn, "sliding_window", None), int)
    assert [r.window for r in memory_report(model, seq_len=100).layers] == [4] * 4
    handle = retrofit(model, placement="back")
    report, cache_bytes = _decode_and_report(model, handle)
    assert report.total == cache_bytes


def test_memory_report_per_layer_types():
    model = _llama_like(
        "Qwen2Config",
        "Qwen2ForCausalLM",
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    if getattr(model.config, "layer_types", None) is None:
        pytest.skip("this transformers has no per-layer layer_types")
    assert [s.sliding_window for s in find_attention(model)] == [None, None, 4, 4]
    handle = retrofit(model, ratio=0.25)
    report, cache_bytes = _decode_and_report(model, handle)
    assert [r.window for r in report.layers] == [None, None, 4, 4]
    assert report.total == cache_bytes


def test_memory_report_float64_state():
    model = tiny_hf("llama")
    handle = retrofit(model)
    model.to(torch.float64)
    report, cache_bytes = _decode_and_report(model, handle)
    assert report.layers[0].state_bytes == 4 * 16 * 16 * 8
    assert report.total == cache_bytes


# -- distill data errors --------------------------------------------------------------------------


def _student_teacher():
    model = tiny_hf("llama", layers=2)
    teacher = copy.deepcopy(model)
    retrofit(model)
    return model, teacher


def test_distill_short_generator_says_how_many():
    model, teacher = _student_teacher()
    data = [token_ids(2, 8, seed=s) for s in range(3)]
    with pytest.raises(ValueError, match=r"ran out after 3 batches but the steps need 5"):
        distill(model, teacher, (d for d in data), stage1_steps=5, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        distill(model, teacher, iter([]), stage1_steps=1, progress=False)
    res = distill(model, teacher, (d for d in data), stage1_steps=3, progress=False)
    assert len(res.stage1) == 3
    assert len(distill(model, teacher, data, stage1_steps=5, progress=False).stage1) == 5


def test_distill_refuses_a_single_tensor_or_dict():
    model, teacher = _student_teacher()
    ids = token_ids(4, 8)
    with pytest.raises(ValueError, match=r"single tensor of shape \(4, 8\).*\[ids\]"):
        distill(model, teacher, ids, stage1_steps=1, progress=False)
    with pytest.raises(ValueError, match="got a dict"):
        distill(model, teacher, {"input_ids": ids}, stage1_steps=1, progress=False)


# -- projections wider than the head geometry, predicate messages --------------------------------


def test_gated_q_proj_is_refused_with_its_width():
    torch.manual_seed(0)
    cfg = transformers.Qwen3NextConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=["full_attention"],
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    )
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match=r"q_proj gives 128 features but o_proj takes 64"):
        retrofit(model, ratio=1.0)


class _RotaryFused(nn.Module):
    """A fused-qkv module that takes a rotary embedding the generic converter cannot apply."""

    num_heads = 4

    def __init__(self):
        super().__init__()
        self.qkv, self.o_proj = nn.Linear(64, 192), nn.Linear(64, 64)

    def forward(self, x, position_embeddings=None):
        return self.o_proj(self.qkv(x)[..., :64])


def test_predicate_messages_name_what_is_missing():
    with pytest.raises(ValueError, match=r"takes position_embeddings .* generic converter"):
        retrofit(nn.Sequential(_RotaryFused()), ratio=1.0, predicate=_pick(_RotaryFused))
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
    )
    phi3 = transformers.Phi3ForCausalLM(cfg).eval()  # picked: found as its own family
    handle = retrofit(phi3, ratio=1.0, predicate=lambda name, m: name.endswith("self_attn"))
    assert handle.sites[0].family == "phi3" and handle.converted == [0]
    headless = _SplitGQA()
    del headless.num_heads
    with pytest.raises(ValueError, match=r"not recognised \(no head count attribute.*qkv_proj"):
        retrofit(nn.Sequential(headless), ratio=1.0, predicate=_pick(_SplitGQA))
