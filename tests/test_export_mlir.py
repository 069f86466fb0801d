"""MLIR export: retention decomposed into one form, then imported with torch-mlir.

The decomposition step needs only torch (always tested); the import step is skipped with a
reason when torch-mlir is not installed (CI installs it: ``pip install --no-deps torch-mlir``).
"""

from __future__ import annotations

import re

import pytest
import torch

from rtpcompile import ops
from rtpcompile.export import (
    decomposition_table,
    export_program,
    have_torch_mlir,
    quadratic_node_shapes,
    quadratic_tensor_types,
)
from rtpcompile.export.step import DecodeStep
from rtpcompile.nn import RTPHybridLM

needs_mlir = pytest.mark.skipif(
    not have_torch_mlir(), reason="torch-mlir is not installed (pip install --no-deps torch-mlir)"
)
T_LONG = 512


def _retention_lm(layers: int = 1) -> RTPHybridLM:
    torch.manual_seed(0)
    return RTPHybridLM(vocab_size=40, dim=24, num_layers=layers, num_heads=2, ratio=1.0).eval()


@pytest.mark.parametrize("form", ["chunkwise", "recurrent", "parallel"])
@pytest.mark.parametrize(
    "B,H,T,K,V,chunk,state",
    [(2, 3, 63, 5, 7, 16, True), (1, 2, 1, 4, 4, 8, False), (1, 1, 40, 8, 3, 64, True)],
    ids=["T63-K5-V7-state", "T1", "T40-chunk-gt-T"],
)
def test_decompositions_match_the_op(form, B, H, T, K, V, chunk, state):
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(B, H, T, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=g, dtype=torch.float64)
    gamma = torch.rand(H, generator=g, dtype=torch.float64) * 0.5 + 0.5
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64) if state else None
    expected = ops.retention_chunkwise(q, k, v, gamma, initial_state=s0, scale=0.3)
    fn = decomposition_table(form, chunk)[torch.ops.rtp.retention_fwd.default]
    o, s = fn(q, k, v, gamma, 0.3, s0, "auto", 0)
    torch.testing.assert_close(o, expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, expected[1], rtol=1e-10, atol=1e-10)
    # a call that returns no state: the op's own (empty) second result
    o2, s2 = fn(q, k, v, gamma, 0.3, s0, "auto", 0, False)
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    assert s2.shape == (0,) and s2.dtype == s.dtype


def test_bad_form_and_chunk_are_rejected():
    with pytest.raises(ValueError, match="form must be one of"):
        decomposition_table("blockwise")
    with pytest.raises(ValueError, match="chunk_size"):
        decomposition_table("chunkwise", 0)


def test_chunkwise_program_has_no_TxT_intermediate_and_matches_the_model():
    model = _retention_lm()
    ids = torch.randint(0, 40, (1, T_LONG))
    program = export_program(model, ids, form="chunkwise")
    assert quadratic_node_shapes(program, T_LONG) == []
    torch.testing.assert_close(program.module()(ids), model(ids), rtol=1e-4, atol=1e-4)
    # the checker does see the T x T scores of the parallel form
    parallel = export_program(model, ids[:, :100], form="parallel")
    assert quadratic_node_shapes(parallel, 100)


class _OpsModel(torch.nn.Module):
    """Retention written with rtpcompile.ops directly (the op appears in the export)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 3 * 8)
        self.register_buffer("gamma", ops.retention_init_decay(2))

    def forward(self, x, state):
        B, T, _ = x.shape
        q, k, v = self.proj(x).view(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4)
        o, s = ops.retention(q, k, v, self.gamma, initial_state=state, output_final_state=True)
        return o.transpose(1, 2).reshape(B, T, 8), s


@pytest.mark.parametrize("form,T", [("chunkwise", 70), ("recurrent", 1), ("recurrent", 3)])
def test_ops_model_program_matches_eager(form, T):
    model = _OpsModel().eval()
    x, state = torch.randn(2, T, 8), torch.randn(2, 2, 4, 4)
    program = export_program(model, x, state, form=form, chunk_size=16)
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any(name.startswith("rtp.") for name in names)
    for got, want in zip(program.module()(x, state), model(x, state), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_step_program_takes_and_returns_the_states():
    model = _retention_lm(layers=2)
    prompt = torch.randint(0, 40, (1, 5))
    cache = model.new_cache(1)
    model(prompt, cache=cache)
    nxt = torch.randint(0, 40, (1, 1))
    step = DecodeStep(model, position=5)
    states = [layer.state.clone() for layer in cache.layers]
    program = export_program(step, nxt, *states, form="recurrent")
    logits, *new_states = program.module()(nxt, *states)
    want = model(nxt, cache=cache)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    for got, layer in zip(new_states, cache.layers, strict=True):
        torch.testing.assert_close(got, layer.state, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="all retention"):
        DecodeStep(RTPHybridLM(40, 24, 2, 2, ratio=0.5))


def test_quadratic_tensor_types_parser():
    text = "%0 = x : tensor<1x2x512x512xf32>, !torch.vtensor<[2,512,512],f32> tensor<512x64xf32>"
    assert quadratic_tensor_types(text, 512) == [
        "tensor<1x2x512x512xf32>",
        "vtensor<[2,512,512]",
    ]
    assert quadratic_tensor_types(text, 64) == []


def _signature(text: str) -> str:
    return re.search(r"func\.func @main\(.*?\) -> .*? \{", text).group(0)


@needs_mlir
def test_chunkwise_mlir_verifies_with_no_TxT_type():
    from rtpcompile import export_mlir

    model = _retention_lm()
    module = export_mlir(model, torch.randint(0, 40, (1, T_LONG)), form="chunkwise")
    module.operation.verify()
    text = str(module)
    assert _signature(text) == (
        f"func.func @main(%arg0: tensor<1x{T_LONG}xi64>) -> tensor<1x{T_LONG}x40xf32> {{"
    )
    assert quadratic_tensor_types(text, T_LONG) == []
    assert "rtp." not in text
    assert "linalg." in text and "torch.aten" not in text


@needs_mlir
def test_recurrent_step_mlir_takes_and_returns_the_state():
    from rtpcompile import export_mlir

    model = _retention_lm(layers=1)
    step = DecodeStep(model, position=3)
    (state,) = step.initial_states(1)
    module = export_mlir(step, torch.zeros(1, 1, dtype=torch.long), state, dialect="torch",
                         form="recurrent")  # fmt: skip
    st = "!torch.vtensor<[1,2,12,24],f32>"
    assert _signature(str(module)) == (
        f"func.func @main(%arg0: !torch.vtensor<[1,1],si64>, %arg1: {st}) -> "
        f"(!torch.vtensor<[1,1,40],f32>, {st}) {{"
    )


@needs_mlir
def test_cli_export(tmp_path, capsys):
    from rtpcompile.cli import main

    out = tmp_path / "m.mlir"
    argv = ["export", "--seq-len", "64", "--dim", "16", "--heads", "2", "--layers", "1"]
    assert main([*argv, "--chunk-size", "16", "-o", str(out)]) == 0
    assert "func.func @main" in out.read_text()
    assert "T x T tensors (T=64): 0" in capsys.readouterr().err


def test_cli_export_program_without_mlir(capsys):
    from rtpcompile.cli import main

    argv = ["export", "--program", "--seq-len", "40", "--dim", "16", "--heads", "2"]
    assert main([*argv, "--layers", "1", "--chunk-size", "8"]) == 0
    captured = capsys.readouterr()
    assert "def forward" in captured.out
    assert "T x T tensors (T=40): 0" in captured.err
    with pytest.raises(SystemExit) as info:  # NOTE: argparse's own positive-integer check
        main(["export", "--seq-len", "0"])
    assert info.value.code == 2


class _ParallelForm(torch.nn.Module):
    """Retention written as ((Q K^T) * scale * D) V with the decay mask built in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.register_buffer("log_gamma", torch.log(1 - 2.0 ** (-5 - torch.arange(2.0))))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.proj(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
        i = torch.arange(T)
        diff = i[:, None] - i[None, :]
        decay = torch.exp(self.log_gamma[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        y = ((q @ k.transpose(-1, -2)) * 8**-0.5 * decay) @ v
        return y.transpose(1, 2).reshape(B, T, 16)


def test_parallel_form_model_is_rewritten_by_the_backend_then_decomposed():
    pytest.importorskip("rtpcompile.backend", reason="the rtp backend is not available")
    model = _ParallelForm().eval()
    x = torch.randn(1, 100, 8 * 2)
    program = export_program(model, x, form="chunkwise", chunk_size=16)
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    # the score matrix is gone: only the decay mask the rewrite reads gamma from stays T x T
    shapes = quadratic_node_shapes(program, 100)
    assert not any(s.startswith("matmul") or s.startswith("bmm") for s in shapes), shapes


def test_missing_torch_mlir_is_an_import_error_naming_the_install(monkeypatch):
    import sys

    from rtpcompile.export import mlir

    mlir.torch_mlir_fx.cache_clear()
    monkeypatch.setitem(sys.modules, "torch_mlir", None)
    try:
        with pytest.raises(ImportError, match="pip install --no-deps torch-mlir"):
            mlir.torch_mlir_fx()
        assert not mlir.have_torch_mlir()
    finally:
        mlir.torch_mlir_fx.cache_clear()
    with pytest.raises(ValueError, match="dialect must be one of"):
        mlir.import_program(None, "llvm")


def test_quadratic_tensor_types_flags_dynamic_square_types():
    """In MLIR text a dynamic dim is only '?': a dynamic-T module's T x T tensors were never
    listed (the check could not fail); now a type with two dynamic dims is listed, marked."""
    text = "%0 = x : tensor<1x2x?x?xf32>\n%1 = y : tensor<?x8xf32>\n%2 : !torch.vtensor<[?,-1],f32>"
    found = quadratic_tensor_types(text, 40)
    assert found == [
        "tensor<1x2x?x?xf32> (dynamic: may be T x T)",
        "vtensor<[?,-1] (dynamic: may be T x T)",
    ]
    assert quadratic_tensor_types("tensor<1x40x40xf32> tensor<40x8xf32>", 40) == [
        "tensor<1x40x40xf32>"
    ]
