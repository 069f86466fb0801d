"""Behaviours of export, explain, options and the CLI that no other test checked.

Found by mutation testing (2026-11-24): each test here fails for a plausible one-line bug in
rtpcompile/export, explain.py, options.py, backend.py's option handling, cli.py or commands/
that the rest of the suite let through.
"""

from __future__ import annotations

import pytest
import torch
from test_cli_errors import _usage_error

from rtpcompile import ops, options
from rtpcompile.export import export_program, quadratic_node_shapes

# --- options ---------------------------------------------------------------------------------


def test_an_empty_boolean_variable_is_false():
    """A boolean RTP_* variable set to nothing (RTP_STRICT=) is unset (its default, False), not
    an error."""
    found = options.from_env({"RTP_STRICT": "", "RTP_VERIFY": " ", "RTP_AUTOTUNE": ""})
    assert found == {}
    assert not any(options.resolve(found).__dict__[n] for n in ("strict", "verify", "autotune"))


def test_an_empty_chunk_size_variable_leaves_the_chunk_to_the_planner():
    """RTP_CHUNK_SIZE= (empty) is no chunk size, not a bad one."""
    assert options.from_env({"RTP_CHUNK_SIZE": ""}) == {}  # NOTE: unset: the planner's
    assert options.resolve({"chunk_size": ""}).chunk_size is None


def test_a_proof_budget_of_zero_gib_is_refused():
    """RTP_PROOF_MAX_GB must be a positive number: 0 would make every mask proof fail."""
    with pytest.raises(ValueError, match="RTP_PROOF_MAX_GB must be a positive number of GiB"):
        options.check_variables({"RTP_PROOF_MAX_GB": "0"})
    options.check_variables({"RTP_PROOF_MAX_GB": "0.5"})


def test_an_empty_tune_configs_variable_means_auto():
    """RTP_TUNE_CONFIGS= (empty or blank) is the default config space, not an error."""
    options.check_variables({"RTP_TUNE_CONFIGS": ""})
    options.check_variables({"RTP_TUNE_CONFIGS": "  "})
    with pytest.raises(ValueError, match="RTP_TUNE_CONFIGS must be one of"):
        options.check_variables({"RTP_TUNE_CONFIGS": "fastest"})


# --- verify ----------------------------------------------------------------------------------


def test_verify_tolerance_is_relative_to_the_largest_value_and_tight():
    """verify passes 2e-3 of the largest |value| in float32 (1 at values of 1000) and no more."""
    from rtpcompile import backend
    from rtpcompile.detect.region import Region

    region = Region(written="parallel", where="model.py:3", output="o")
    big = torch.full((2, 3), 1000.0)
    backend._compare(region, "o", big, big + 1.9)  # 1.9e-3 relative: within
    with pytest.raises(RuntimeError, match=r"max abs error 2.1 > 2"):
        backend._compare(region, "o", big, big + 2.1)
    small = torch.ones(2, 3)
    backend._compare(region, "o", small, small + 1.9e-3)
    with pytest.raises(RuntimeError, match=r"differs from the original subgraph"):
        backend._compare(region, "o", small, small + 1e-2)  # 1%: a wrong result in float32
    half = small.half()
    backend._compare(region, "o", half, half + 2e-2)  # 16-bit: 3e-2
    with pytest.raises(RuntimeError, match=r"differs from the original subgraph"):
        backend._compare(region, "o", half, half + 5e-2)


class _NativeOp(torch.nn.Module):
    def forward(self, q, k, v):
        return ops.retention(q, k, v, torch.tensor([0.9, 0.5])) * 2


def test_verify_leaves_an_op_call_already_in_the_graph_alone(aten_env, caplog, monkeypatch):
    """An rtp op call in the model is its own reference: verify runs and reports no check."""
    import logging

    import torch._inductor.compile_fx as cfx

    monkeypatch.setattr(cfx, "compile_fx", lambda gm, example_inputs, **kw: gm.forward)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(_NativeOp(), backend="rtp", options={"verify": True, "log": "info"})
    with caplog.at_level(logging.INFO, logger="rtpcompile"):
        out = compiled(q, k, v)
    torch.testing.assert_close(out, _NativeOp()(q, k, v))
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 region(s) claimed" in m for m in messages)
    assert not any("rtp verify" in m for m in messages)


# --- export decompositions -------------------------------------------------------------------


class _ChunkedOp(torch.nn.Module):
    """An ops.retention_chunkwise call with its own chunk size of 4."""

    def forward(self, q, k, v, gamma):
        return ops.retention_chunkwise(q, k, v, gamma, chunk_size=4, output_final_state=True)


def test_an_op_calls_own_chunk_size_is_kept_by_the_chunkwise_export():
    """The op's explicit chunk size (4) wins over export_program's (64): no T x T tensor at T=16."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 3, generator=g, dtype=torch.float64) for _ in range(3))
    gamma = torch.tensor([0.9, 0.6], dtype=torch.float64)
    program = export_program(_ChunkedOp(), q, k, v, gamma, form="chunkwise")
    assert quadratic_node_shapes(program, 16) == []
    o, final = program.module()(q, k, v, gamma)
    want_o, want_final = ops.retention(q, k, v, gamma, output_final_state=True)
    torch.testing.assert_close(o, want_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, want_final, rtol=1e-10, atol=1e-10)


class _WithState(torch.nn.Module):
    def forward(self, q, k, v, gamma, state):
        return ops.retention(q, k, v, gamma, initial_state=state, output_final_state=True)


@pytest.mark.parametrize("form", ["chunkwise", "parallel", "recurrent"])
def test_an_empty_sequence_exports_the_initial_state_as_the_final_one(form):
    """T=0 tokens: the exported program returns an empty output and the incoming state."""
    g = torch.Generator().manual_seed(1)
    empty = torch.randn(1, 2, 0, 3, generator=g)
    state = torch.randn(1, 2, 3, 3, generator=g)
    gamma = torch.tensor([0.9, 0.6])
    program = export_program(_WithState(), empty, empty, empty, gamma, state, form=form)
    o, final = program.module()(empty, empty, empty, gamma, state)
    assert o.shape == (1, 2, 0, 3)
    torch.testing.assert_close(final, state, rtol=0, atol=0)


class _StateOut(torch.nn.Module):
    """A reference MultiScaleRetention asked for its final state without giving one."""

    def __init__(self) -> None:
        super().__init__()
        from rtpcompile.nn.retention import MultiScaleRetention

        self.msr = MultiScaleRetention(8, 2)

    def forward(self, x):
        return self.msr(x, return_state=True)


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_a_reference_module_exports_the_state_it_is_asked_to_return(form):
    """return_state=True with no incoming state: the program returns (output, final state)."""
    torch.manual_seed(0)
    model = _StateOut().double().eval()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    want = model(x)
    got = export_program(model, x, form=form).module()(x)
    assert len(got) == 2 and got[1] is not None and got[1].shape == (1, 2, 4, 8)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_a_decode_step_at_position_zero_is_refused():
    """DecodeStep's position counts the tokens already seen (>= 1): 0 and True are ValueErrors."""
    from rtpcompile.export.step import DecodeStep
    from rtpcompile.nn import RTPHybridLM

    model = RTPHybridLM(32, 16, 1, 2, ratio=1.0).eval()
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match=r"position must be an int >= 1"):
            DecodeStep(model, bad)
    assert DecodeStep(model, 1).position == 1


def test_a_reference_model_is_not_detected_unless_asked(recwarn):
    """detect=None skips detection when the model has reference retention modules (a subclass
    with its own forward then keeps its code): a dynamic-T export of one works as written."""
    from rtpcompile.nn.retention import MultiScaleRetention

    class Scaled(MultiScaleRetention):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = Scaled(8, 2).eval()
    T = torch.export.Dim("T", min=2, max=64)
    x = torch.randn(1, 10, 8)
    program = export_program(model, x, form="chunkwise", dynamic_shapes=({1: T},))
    longer = torch.randn(1, 13, 8)
    torch.testing.assert_close(program.module()(longer), model(longer), rtol=1e-5, atol=1e-5)


# --- explain ---------------------------------------------------------------------------------


def _explained_lowering(monkeypatch, form: str | None) -> str:
    from test_explain import TwoLayers, _inputs

    from rtpcompile.explain import explain

    if form is not None:
        monkeypatch.setenv("RTP_FORM", form)
    rows = [row for row in explain(TwoLayers(), *_inputs()).rows() if row[1] == "claimed"]
    assert len(rows) == 1
    return rows[0][-1]


def test_explain_says_a_lowering_is_forced_by_rtp_form_only_when_it_is(aten_env, monkeypatch):
    """The planner's own choice reads plainly; RTP_FORM's is marked 'forced by RTP_FORM'."""
    assert _explained_lowering(monkeypatch, None) == "parallel at T=19"
    assert _explained_lowering(monkeypatch, "chunkwise").endswith(" at T=19, forced by RTP_FORM")


def test_kernels_of_a_batch_of_zero_sequences_is_an_error():
    """Report.kernels(batch=0) would list kernels that never launch: a ValueError instead."""
    from test_explain import TwoLayers, _inputs

    from rtpcompile.explain import explain

    report = explain(TwoLayers(), *_inputs())
    index = report.regions.index(report.claimed[0])
    for bad in (0, -2, True):
        with pytest.raises(ValueError, match=r"batch must be a positive integer"):
            report.kernels(index, batch=bad)


def test_a_graph_break_reason_keeps_dynamos_explanation():
    """explain's graph-break line: Dynamo's first line, then its 'Explanation:' in brackets."""
    from rtpcompile.explain import _first_line

    reason = "Call to graph_break()\n  Explanation: User-inserted graph break.\n  Hint: x"
    assert _first_line(reason) == "Call to graph_break() (User-inserted graph break.)"
    assert _first_line("\n\n") == "unknown reason"


# --- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "--lengths", "512,0"], "expected positive integers like 512,4096, got '512,0'"),
        (["demo", "--lengths", "-128"], "expected positive integers like 128,512, got '-128'"),
        (["tune", "--shape", "1,2,0,16"], "with positive integers, got '1,2,0,16'"),
        (["tune", "--shape", "1,2,8,16,0"], "with positive integers, got '1,2,8,16,0'"),
    ],
)
def test_a_length_or_shape_of_zero_or_less_is_a_usage_error(capsys, argv, expected):
    """Comma-separated lengths and tune shapes take positive integers only (exit code 2)."""
    assert expected in _usage_error(capsys, argv)


@pytest.fixture
def cli_cache(tmp_path, monkeypatch):
    """An empty autotune cache of this test's own, RTP_CACHE unset, a fresh planner."""
    from rtpcompile.kernels import cache
    from rtpcompile.lowering import plan

    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RTP_CACHE", raising=False)
    cache._reported.clear()
    plan.reset()
    yield cache
    plan.reset()


def _store_entry(cache, K: int, capability: str = "x/2t") -> str:
    """Store one aten forward entry for head dims K x K; returns its id."""
    key = {
        "version": cache.FORMAT_VERSION, "source": "s", "device": "cpu0", "capability": capability,
        "spec": {"op": "retention", "phase": "fwd", "backend": "aten", "K": K, "V": K,
                 "state_in": False, "state_out": True, "request": "auto", "chunk": 0},
        "torch": "2.13", "triton": "3.9", "dtype": "float32", "bucket": {"T": 64, "BH": 2},
    }  # fmt: skip
    value = {"form": "chunkwise", "chunk_size": 16, "config": {}, "time_ms": 1.0, "timings": {}}
    assert cache.store(key, value)
    return cache.key_id(key)


def test_cache_show_refuses_a_prefix_that_matches_several_entries(cli_cache, capsys):
    """`cache show PREFIX` shows one entry only when the prefix picks exactly one (exit 1 else)."""
    import os

    from rtpcompile import cli

    ids = [_store_entry(cli_cache, K) for K in (8, 16)]
    shared = os.path.commonprefix(ids)
    assert cli.main(["cache", "show", shared]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and f"2 entries match {shared!r}" in captured.err
    assert cli.main(["cache", "show", ids[1]]) == 0
    assert f'"id": "{ids[1]}"' in capsys.readouterr().out


def test_cache_list_marks_an_entry_stored_under_another_name_as_stale(cli_cache, capsys):
    """An entry file renamed away from its key's id is never read: list says so."""
    from rtpcompile import cli

    entry_id = _store_entry(cli_cache, 8)
    path = cli_cache.directory() / f"{entry_id}.json"
    path.rename(path.with_name("renamed.json"))
    assert cli.main(["cache", "list"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("renamed  ") and "file name is not its key's id)" in line


def test_cache_export_counts_the_stale_entries_it_ships(cli_cache, capsys, tmp_path):
    """`cache export` says how many of the exported entries this installation never reads."""
    from rtpcompile import cli

    _store_entry(cli_cache, 8)  # NOTE: its source hash "s" is not this installation's: stale
    _store_entry(cli_cache, 16)
    target = tmp_path / "entries.json"
    assert cli.main(["cache", "export", str(target)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (
        f"exported 2 entries to {target} (2 stale: never read by this installation's planner, "
        "see cache list)"
    )


def test_cache_list_names_the_capability_that_tells_two_entries_apart(cli_cache, capsys):
    """Entries differing only in the device capability are tagged '[capability NAME]'."""
    from rtpcompile import cli

    for capability in ("sm_80", "sm_90"):
        _store_entry(cli_cache, 8, capability)
    assert cli.main(["cache", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split(" [", 1)[1].split("]")[0] for line in lines) == [
        "capability sm_80",
        "capability sm_90",
    ]


def test_cache_show_of_an_invalid_entry_fails(cli_cache, capsys):
    """`cache show` of a file that is not a valid entry says so and exits 1."""
    from rtpcompile import cli

    cli_cache.directory().mkdir(parents=True, exist_ok=True)
    (cli_cache.directory() / "broken.json").write_text("{not json")
    assert cli.main(["cache", "show", "broken"]) == 1
    assert "is not a valid entry (ignored by the planner)" in capsys.readouterr().err


def test_export_notes_a_sequence_of_one_chunk_and_a_batch_equal_to_t(capsys, tmp_path):
    """The export summary explains T x T hits from T == --chunk-size and from T == --batch."""
    from rtpcompile import cli

    small = ["--dim", "16", "--heads", "2", "--layers", "1", "--vocab", "32", "--program"]
    out = str(tmp_path / "p.txt")
    argv = ["export", *small, "--seq-len", "12", "--chunk-size", "12", "-o", out]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "note: T=12 <= --chunk-size 12: one chunk of C = T tokens" in err
    assert "equals a model width" not in err
    argv = ["export", *small, "--seq-len", "12", "--chunk-size", "4", "--batch", "12", "-o", out]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    note = "note: T=12 equals a model width (a weight size, a head count or head dim) or the batch"
    assert note in err
    assert "one chunk of C = T tokens" not in err


def test_export_of_a_recurrent_step_accepts_a_sequence_length_of_one(capsys, tmp_path):
    """`export --form recurrent --seq-len 1` is the one-token step it exports anyway (exit 0)."""
    from rtpcompile import cli

    small = ["--dim", "16", "--heads", "2", "--layers", "1", "--vocab", "32", "--program"]
    argv = ["export", "--form", "recurrent", "--seq-len", "1", *small, "-o", str(tmp_path / "p")]
    assert cli.main(argv) == 0
    assert "T x T tensors (T=1): 0 []" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "x"])
def test_a_positive_number_argument_refuses_zero_and_non_finite_values(text):
    """``--max-call-s 0`` and the like are usage errors, never a run without a time limit."""
    import argparse

    from rtpcompile.commands._common import positive_float

    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive number"):
        positive_float(text)
    assert positive_float("0.5") == 0.5
