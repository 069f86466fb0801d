"""Fixes of 2026-11-24 (round 10): exported programs, nn module checks, ``export --form recurrent``.

* The export decompositions broke causality for non-finite values: an inf in v at the last of 24
  positions reached rows 16-23 of the static chunkwise program (chunk 8) and every row of the
  dynamic-T chunkwise and the parallel programs (0 * inf = NaN in the causal mask's and the
  chunk-decay matrix's zeros), where the op gives row 23 only (docs/ops.md).
* The nn modules took values ``RTPConfig`` refuses (``rope_base`` <= 0: NaN outputs, a negative
  ``norm_eps``, ``learnable_decay="no"`` taken as true), a negative ``offset``;
  ``ops.retention_init_state`` refused batch 0 though the ops take B = 0; ``RTPConfig`` took
  ``head_dim_v=0`` when no layer is retention.
* ``rtpcompile export --form recurrent`` on a model with attention layers exited 1 after building
  the export; it is a usage error (exit 2) naming the flags.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from rtpcompile import cli, ops
from rtpcompile.export import decomposition_table, export_program
from rtpcompile.export.decompose import _matrix_states, _unrolled_states
from rtpcompile.nn import (
    CausalSelfAttention,
    MultiScaleRetention,
    RTPBlock,
    RTPConfig,
    RTPHybridLM,
)

B, H, T, K, V = 2, 2, 21, 3, 5
INF, NAN = float("inf"), float("nan")


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    # NOTE: a zero decay too (runs as MIN_GAMMA: 0 * inf cases in its powers)
    gamma = torch.tensor([0.9, 0.0], dtype=torch.float64)
    return q, k, v, s0, gamma


def _assert_same_as_the_op(got, want):
    """Non-finite in exactly the same entries, the finite ones equal (float64)."""
    for g, w in zip(got, want, strict=True):
        assert torch.equal(torch.isfinite(g), torch.isfinite(w)), (
            f"non-finite rows {sorted(set(torch.nonzero(~torch.isfinite(g))[:, 2].tolist()))}, "
            f"the op's {sorted(set(torch.nonzero(~torch.isfinite(w))[:, 2].tolist()))}"
        )
        ok = torch.isfinite(w)
        torch.testing.assert_close(g[ok], w[ok], rtol=1e-10, atol=1e-10)


# (which input, position, value): first, mid-chunk, a chunk's first and last, the last position
POISONS = list(itertools.product("qkv", (0, 4, 7, 10, T - 1), (INF, NAN)))


@pytest.mark.parametrize("form", ["chunkwise", "parallel", "recurrent"])
@pytest.mark.parametrize("state", [False, True], ids=["no-state", "state"])
def test_decompositions_keep_non_finite_values_causal(form, state):
    fn = decomposition_table(form, 4)[torch.ops.rtp.retention_fwd.default]
    for which, pos, value in POISONS:
        q, k, v, s0, gamma = _inputs(pos)
        dict(q=q, k=k, v=v)[which][1, 0, pos, 1] = value
        s0 = s0 if state else None
        want = ops.retention(q, k, v, gamma, scale=0.3, initial_state=s0, output_final_state=True)
        _assert_same_as_the_op(fn(q, k, v, gamma, 0.3, s0, "auto", 0), want)


class _OpModel(torch.nn.Module):
    def forward(self, q, k, v):
        return ops.retention(q, k, v, torch.tensor([0.9, 0.5], dtype=q.dtype))


@pytest.mark.parametrize(
    "form, dynamic",
    [("chunkwise", False), ("chunkwise", True), ("parallel", False), ("parallel", True)],
)
def test_exported_programs_keep_an_inf_out_of_earlier_rows(form, dynamic):
    """The tester's case: inf in v at the last of 24 positions, chunk 8 (dynamic T: the
    chunk-decay matrix)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 4, generator=g, dtype=torch.float64) for _ in range(3))
    Td = torch.export.Dim("T", min=2, max=256)
    shapes = ({2: Td},) * 3 if dynamic else None
    program = export_program(
        _OpModel(), q, k, v, form=form, chunk_size=8, dynamic_shapes=shapes
    ).module()
    for which, pos in (("v", 23), ("k", 23), ("v", 9), ("k", 16)):
        x = dict(q=q, k=k, v=v)[which]
        x2 = x.clone()
        x2[0, 1, pos, 0] = INF
        args = [x2 if name == which else y for name, y in zip("qkv", (q, k, v), strict=True)]
        _assert_same_as_the_op([program(*args)], [_OpModel()(*args)])
        rows = torch.nonzero(~torch.isfinite(program(*args)))[:, 2]
        assert rows.min().item() == pos
    if dynamic:  # another length through the same program, T below the chunk size
        x = v[:, :, :5].clone()
        x[0, 0, 4, 2] = NAN
        _assert_same_as_the_op(
            [program(q[:, :, :5], k[:, :, :5], x)], [_OpModel()(q[:, :, :5], k[:, :, :5], x)]
        )


@pytest.mark.parametrize("N", [2, 5])
def test_chunk_decay_matrix_keeps_a_non_finite_chunk_state_out_of_earlier_chunks(N):
    g = torch.Generator().manual_seed(N)
    state = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    chunk_kv = torch.randn(2, 3, N, 4, 5, generator=g, dtype=torch.float64)
    chunk_kv[1, 2, N - 2, 3, 1] = INF
    chunk_kv[0, 0, N - 1, 0, 0] = NAN  # the last chunk's is never read
    lg = torch.log(torch.tensor([0.5, 0.9, 0.999], dtype=torch.float64))
    want = _unrolled_states(state, chunk_kv, lg, 6, N)
    got = _matrix_states(state, chunk_kv, lg, 6, N)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.isfinite(got[:, :, : N - 1]).all()
    ok = torch.isfinite(want)
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-12, atol=1e-12)


# -- nn constructor checks shared with RTPConfig ------------------------------------------------

BAD_OPTIONS = [
    ("rope_base", 0.0, "rope_base must be a finite number > 0, got 0.0"),
    ("rope_base", -1.0, "rope_base must be a finite number > 0, got -1.0"),
    ("rope_base", "x", "rope_base must be a finite number > 0, got 'x'"),
    ("rope_base", float("inf"), "rope_base must be a finite number > 0, got inf"),
    ("norm_eps", -1.0, "norm_eps must be a finite number > 0, got -1.0"),
    ("learnable_decay", "no", "learnable_decay must be True or False, got 'no'"),
    ("rotary", 1, "rotary must be True or False, got 1"),
    ("gate", None, "gate must be True or False, got None"),
]


@pytest.mark.parametrize("name, value, message", BAD_OPTIONS)
@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: MultiScaleRetention(8, 2, **kw),
        lambda **kw: RTPBlock(8, 2, **kw),
        lambda **kw: RTPBlock(8, 2, "hybrid", **kw),
        lambda **kw: RTPHybridLM(16, 8, 1, 2, **kw),
    ],
    ids=["MultiScaleRetention", "RTPBlock", "RTPBlock-hybrid", "RTPHybridLM"],
)
def test_modules_refuse_what_the_config_refuses(build, name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(**{name: value})


@pytest.mark.parametrize("name, value", [("rope_base", 0.0), ("rope_base", -1.0), ("bias", "y")])
def test_attention_refuses_bad_options(name, value):
    with pytest.raises(ValueError, match=name):
        CausalSelfAttention(8, 2, **{name: value})


def test_attention_and_block_option_errors():
    with pytest.raises(ValueError, match="ffn_mult must be a finite number > 0, got inf"):
        RTPBlock(8, 2, ffn_mult=float("inf"))
    with pytest.raises(ValueError, match="out_proj must be True or False"):
        MultiScaleRetention(8, 2, out_proj="no")
    # what the config accepts still builds: ints for the numbers
    MultiScaleRetention(8, 2, rope_base=500, norm_eps=1)
    RTPBlock(8, 2, "attention", rope_base=10, norm_eps=1e-3)


def test_negative_offsets_are_refused():
    x = torch.randn(2, 1, 8)
    msr = MultiScaleRetention(8, 2)
    with pytest.raises(ValueError, match="offset .* must be an int >= 0, got -5"):
        msr(x, state=msr.init_state(2), offset=-5)
    with pytest.raises(ValueError, match="got 1.5"):
        msr(x, offset=1.5)
    with pytest.raises(ValueError, match="got -1"):
        CausalSelfAttention(8, 2)(x, offset=-1)
    y, _ = msr(x, state=msr.init_state(2), offset=3)  # a valid continuation still runs
    assert y.shape == x.shape


def test_head_dim_v_is_checked_without_retention_layers():
    with pytest.raises(ValueError, match="head_dim_v must be a positive int, got 0"):
        RTPHybridLM(8, 8, 2, 2, ratio=0, head_dim_v=0)
    with pytest.raises(ValueError, match="head_dim_v must be a positive int, got 2.0"):
        RTPConfig(ratio=0.0, head_dim_v=2.0)
    assert RTPHybridLM(8, 8, 2, 2, ratio=0, head_dim_v=4).layer_types == ["attention"] * 2


def test_init_state_takes_batch_and_heads_zero_as_the_ops_do():
    s = ops.retention_init_state(0, 2, 4, 3)
    assert s.shape == (0, 2, 4, 3) and s.dtype == torch.float32
    q = torch.randn(0, 2, 5, 4)
    o, final = ops.retention(
        q, q, torch.randn(0, 2, 5, 3), torch.tensor([0.9, 0.5]), initial_state=s,
        output_final_state=True,
    )  # fmt: skip
    assert o.shape == (0, 2, 5, 3) and final.shape == (0, 2, 4, 3)
    assert ops.retention_init_state(2, 0, 4, 3).shape == (2, 0, 4, 3)
    for args, message in (
        ((-1, 2, 4, 3), "batch must be an int >= 0, got -1"),
        ((1, 2, 0, 3), "k_dim must be a positive int, got 0"),
        ((1, 2, 4, 0), "v_dim must be a positive int, got 0"),
        ((1.0, 2, 4, 3), "batch must be an int >= 0, got 1.0"),
    ):
        with pytest.raises(ValueError, match=message):
            ops.retention_init_state(*args)


# -- export --form recurrent of a model with attention layers --------------------------------


@pytest.fixture
def no_export(monkeypatch):
    """Fail if the command gets as far as exporting."""
    from rtpcompile import export

    def refuse(*args, **kwargs):
        raise AssertionError("the export ran")

    monkeypatch.setattr(export, "export_program", refuse)
    monkeypatch.setattr(export, "export_mlir", refuse)


def test_recurrent_export_of_a_hybrid_is_a_usage_error(capsys, no_export):
    assert cli.main(["export", "--form", "recurrent", "--ratio", "0.5", "--program"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rtpcompile export: error: --form recurrent")
    assert "--ratio 0.5 (of --layers 2) gives attention layers" in err[0]
    assert "--ratio 1" in err[0] and "--form chunkwise" in err[0]


def test_recurrent_export_of_a_hybrid_checkpoint_is_a_usage_error(capsys, no_export, tmp_path):
    path = tmp_path / "hybrid.pt"
    torch.save(RTPHybridLM(32, 16, 2, 2, ratio=0.5), path)
    assert cli.main(["export", "--form", "recurrent", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint" in err[0] and "has attention layers" in err[0]
    assert "['retention', 'attention']" in err[0]


def test_recurrent_export_of_a_retention_model_still_runs(capsys):
    assert cli.main(["export", "--form", "recurrent", "--ratio", "0.8", "--program"]) == 0
    assert "T x T tensors (T=1): 0 []" in capsys.readouterr().err
