"""distill, memory_report and the bench report: inputs and numbers found wrong (2026-11-25)."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

from rtpcompile.bench.report import Record, fmt_bytes, fmt_rate, notes
from rtpcompile.commands._common import int_list
from rtpcompile.convert import distill, memory_report, retrofit

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face models need the transformers extra"
)


def _llama(dtype=torch.float32, layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


def _ids():
    return [torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))]


# ----------------------------------------------------------------- distill


def test_distill_refuses_float16_parameters_before_any_step():
    """Adam in float16 (eps = 1e-8 is 0 there) wrote inf into the norm weights at step 1, and
    into the projections the original model shares, until 2026-11-25."""
    model = _llama(torch.float16)
    teacher = copy.deepcopy(model)
    retrofit(model, ratio=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="float16 parameters .* Distill in float32 or bfloat16"):
        distill(model, teacher, _ids(), stage1_steps=1, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("steps", [{"stage1_steps": -5}, {"stage2_steps": -1}])
def test_distill_refuses_negative_steps(steps):
    model = _llama()
    teacher = copy.deepcopy(model)
    retrofit(model, ratio=0.5)
    with pytest.raises(ValueError, match="must be an int >= 0"):
        distill(model, teacher, _ids(), progress=False, **steps)


def test_stage2_restores_eval_mode_when_a_step_raises():
    model = _llama()
    teacher = copy.deepcopy(model)
    retrofit(model, ratio=0.5)
    teacher.lm_head.weight.data[0, 0] = float("nan")  # NOTE: a non-finite loss at step 1
    with pytest.raises(FloatingPointError):
        distill(model, teacher, _ids(), stage1_steps=0, stage2_steps=1, progress=False)
    assert not model.training


def test_a_bfloat16_model_whose_first_parameter_is_a_decay_is_bfloat16():
    """A converted layer's float32 ``decay_logit`` listed first made the model "float32":
    distill refused a bfloat16 teacher, memory_report doubled the K/V bytes."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
            return x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]

    model = nn.Sequential(Block(), Block()).to(torch.bfloat16)
    before = [r.kv_bytes_per_token for r in memory_report(model, seq_len=10).layers]
    retrofit(model, ratio=0.5)
    assert next(model.parameters()).dtype == torch.float32  # the decay, listed first
    rows = memory_report(model, seq_len=10).layers
    assert [r.original_kv_bytes_per_token for r in rows] == before == [128, 128]


# ----------------------------------------------------------------- memory_report


def test_falcon_new_architecture_caches_every_heads_kv():
    """Falcon's new decoder architecture broadcasts its K/V groups to all query heads before
    caching: counted as the groups until 2026-11-25 (half the real cache here)."""
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        new_decoder_architecture=True, num_kv_heads=2,
    )  # fmt: skip
    model = transformers.FalconForCausalLM(cfg).eval()
    report = memory_report(model, seq_len=100)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 100)), past_key_values=cache, use_cache=True)
    real = [2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers]
    assert [r.original_total for r in report.layers] == real == [51_200, 51_200]


def test_attention_kept_as_not_convertible_is_named_not_silently_left_out():
    model = _llama(layers=4)
    model.model.layers[3].self_attn = model.model.layers[2].self_attn  # NOTE: shared: kept
    report = memory_report(model, seq_len=100)
    assert [r.index for r in report.layers] == [0, 1]
    assert any("not counted" in w and "layers.2.self_attn" in w for w in report.warnings)


def test_a_state_larger_than_its_windows_kv_is_warned_at_the_window():
    """seq_len = 1000 is past break-even (8 tokens), but a 4-token window keeps 3: the layer
    costs 2.7x its K/V and was not warned about until 2026-11-25."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, sliding_window=4,
    )  # fmt: skip
    model = transformers.MistralForCausalLM(cfg).eval()
    retrofit(model, ratio=0.5)
    report = memory_report(model, seq_len=1000)
    row = report.layers[0]
    assert row.total > row.original_total and row.break_even < 1000
    assert any("sliding window's 3 tokens" in w for w in report.warnings), report.warnings


# ----------------------------------------------------------------- bench report


def test_notes_keep_a_later_error_after_an_earlier_note():
    """Notes were keyed by (bench, variant): a memory note on a timed length hid the error that
    failed a later one."""
    records = [
        Record("op-fwd", "v", 16, note="memory worker timed out"),
        Record("op-fwd", "v", 32, status="error", note="RuntimeError: the real reason"),
        Record("op-fwd", "v", 64, status="error", note="RuntimeError: again"),
    ]
    assert notes(records) == [
        "op-fwd / v / T=16: memory worker timed out",
        "op-fwd / v / T=32: RuntimeError: the real reason",
    ]


def test_numbers_are_never_in_scientific_notation():
    assert fmt_bytes(1000 * 2**10) == "1000 KiB" and fmt_bytes(1023.5 * 2**10) == "1024 KiB"
    assert fmt_bytes(99.5 * 2**20) == "99.5 MiB" and fmt_bytes(512) == "512 B"
    assert fmt_rate(1823.4) == "1823" and fmt_rate(57.25) == "57.2"


def test_a_repeated_length_is_measured_once():
    """``--prefill-lengths 8,8,16`` divided by log(8 / 8) = 0 (a traceback, nothing written)."""
    assert int_list("8,16")("8,8,16") == [8, 16]
    with pytest.raises(argparse.ArgumentTypeError):
        int_list("8,16")("8,0")


def test_memory_report_refuses_a_dtype_that_is_not_a_floating_torch_dtype():
    """Found 2026-11-26: "float16" was a TypeError from torch.empty, int64 gave bytes."""
    from rtpcompile.nn import default_model

    model = default_model()
    for bad in ("float16", torch.int64):
        with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
            memory_report(model, dtype=bad)
