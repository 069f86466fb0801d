"""The GPU benchmark scripts' pure parts, on CPU: the kernel table and the call-overhead bench."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_table_shows_eager_and_graph_times_and_errors():
    bench = _script("bench_gpu_kernels")
    meta = {"device": "GPU", "date": "2026-11-23", "torch": "t", "triton": "tr", "fla": "f"}
    row = {"case": "parallel fwd", "B": 4, "H": 16, "T": 256, "K": 128, "V": 128,
           "ours_ms": 0.2, "ours_graph_ms": 0.02, "fla_ms": 0.25, "fla_graph_ms": 0.03,
           "ratio_vs_fla": 1.25, "graph_ratio_vs_fla": 1.5,
           "sdpa_graph_error": "capture"}  # fmt: skip
    decode = {"case": "decode bandwidth", "B": 64, "H": 16, "T": 1, "K": 128, "V": 128,
              "ours_ms": 0.1, "ours_GBps": 1340.0, "copy_ms": 0.05, "copy_GBps": 2680.0,
              "fraction_of_copy": 0.5, "ours_graph_ms": 0.05, "ours_graph_GBps": 2680.0,
              "copy_graph_ms": 0.045, "copy_graph_GBps": 2980.0,
              "graph_fraction_of_copy": 0.9}  # fmt: skip
    sweep = {"case": "decode sweep", "B": 64, "H": 16, "T": 1, "K": 128, "V": 128, "BV": 32,
             "num_warps": 2, "copy_graph_ms": 0.033, "kernels_graph_ms": 0.04,
             "graph_fraction_of_copy": 0.825}  # fmt: skip
    text = bench.markdown(meta, [row, decode, sweep])
    assert "| 64 | 16 | 128 | 32 | 2 | 0.0400 | 0.82 |" in text
    assert "decode sweep |" not in text  # not a row of the main table
    eager_then_graph = "| 0.200 | 0.250 | 1.25 | 0.020 | 0.030 | 1.50 |"
    assert "| parallel fwd | 4 | 16 | 256 | 128 " + eager_then_graph in text
    assert "| eager | 64 | 16 | 128 | 0.1000 | 1340 | 0.0500 | 2680 | 0.50 |" in text
    assert "| CUDA graph | 64 | 16 | 128 | 0.0500 | 2680 | 0.0450 | 2980 | 0.90 |" in text
    assert "sdpa_graph_error = capture" in text


def test_call_overhead_bench_runs(monkeypatch):
    bench = _script("call_overhead")
    monkeypatch.setattr(bench, "CASES", (("decode T=1", 1, 2, 1, 16, 24, True),))
    monkeypatch.setattr(bench.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(bench.torch, "set_flush_denormal", lambda on: None)
    from rtpcompile.kernels import launch

    monkeypatch.setattr(launch, "_launch", launch._launch)  # restored after the bench mocks it
    for name in ("TRITON_INTERPRET", "RTP_KERNELS"):
        monkeypatch.setenv(name, "0" if name == "TRITON_INTERPRET" else "auto")
    (row,) = bench.measure(calls=3)
    assert row["form"] == "recurrent"
    timed = ("op", "op_no_grad", "op_bwd", "plan", "kernels", "public_no_grad", "public_fwd_bwd")
    assert all(row[f"{k}_us"] > 0 and row.get(f"{k}_op_us", 1) > 0 for k in timed)
    # exact launch counts: a decode step is one kernel; its backward (with an initial state) three
    # passes and the state terms of d gamma
    assert (row["op_triton"], row["op_torch_ops"]) == (1, 0)
    assert row["op_bwd_triton"] == 3 and 0 < row["op_bwd_torch_ops"] <= 10
    assert "| decode T=1 (B=1, H=2, K=16, V=24) | recurrent |" in bench.markdown(
        {"date": "d", "machine": "m", "torch": "t", "python": "p", "calls": 3}, [row]
    )


def test_split6_mode_times_the_three_pass_backward():
    """The kernel bench's "split6" rows run the backward's six-kernel path; others keep the
    four-kernel one, and the switch is undone after each row."""
    bench = _script("bench_gpu_kernels")
    from rtpcompile.kernels import backward

    real = backward._split_passes
    with bench._backward_path("split6"):
        assert backward._split_passes("chunkwise") is None
    assert backward._split_passes is real
    with bench._backward_path("split"):
        assert backward._split_passes is real
    assert bench.CHUNK_MODES["split6"] == bench.CHUNK_MODES["split"] == {"split": 1}


def test_the_rule_is_not_timed_twice():
    bench = _script("bench_gpu_kernels")
    modes = tuple(bench.CHUNK_MODES)
    # T = 2048, B*H = 64, K = V = 128: 32 chunks, 128 programs: the rule runs the forward
    # fused and the backward split, so fwd+bwd is timed under the rule itself as well
    assert bench._chunk_labels(64, 2048, 128, modes) == [
        ("rule", {"fwd+bwd": "rule: fused fwd, split bwd"}),
        ("fused", {"fwd": "fused, the rule", "fwd+bwd": "fused"}),
        ("split", {"fwd": "split", "fwd+bwd": "split"}),
        ("split6", {"fwd+bwd": "split6"}),
    ]
    # K = 256: both phases split, so the rule is split's rows
    assert bench._chunk_labels(64, 2048, 256, modes)[1] == (
        "split",
        {"fwd": "split, the rule", "fwd+bwd": "split, the rule"},
    )
    assert bench._chunk_labels(64, 2048, 128, ("rule",)) == [
        ("rule", {"fwd": "rule", "fwd+bwd": "rule: fused fwd, split bwd"})
    ]


def test_chunk_cases_run_every_mode_on_the_kernels(monkeypatch, triton_on_cpu):
    """The chunkwise rows of the GPU bench end to end on CPU (the kernels under the interpreter,
    float32 inputs, FLA stubbed, nothing timed): each mode launches what it names; split6's
    backward runs six kernels where split's runs four."""
    import sys
    import types

    import torch

    from rtpcompile import ops
    from rtpcompile.kernels import launch

    bench = _script("bench_gpu_kernels")
    stub = types.ModuleType("fla.ops.retention")
    stub.chunk_retention = lambda q, k, v, scale: (v * (q * k).sum(-1, keepdim=True) * scale, None)
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.retention", stub)

    def inputs(B, T, H, K, V, grad=False):
        return tuple(torch.randn(B, T, H, d, requires_grad=grad) for d in (K, K, V))

    launched, rows = [], []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda spec, *a: launched.append(spec) or real(spec, *a))

    def stages(fn):
        launched.clear()
        out = fn()
        return out, [s.stage for s in launched]

    def row(rows, what, shape, ours, baselines, kernels_only):
        # the public op (what is timed as ours) launches what the kernels called directly do,
        # and computes the same: o, or the gradients of q, k, v ([B, T, H, D] leaves)
        (got, ran), (want, ran_direct) = stages(ours), stages(kernels_only)
        assert ran == ran_direct, what
        if "bwd" in what:
            want = [w.transpose(1, 2) for w in want[:3]]
        else:
            got, want = [got[0]], [want[0]]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert list(baselines) == ["fla"]
        baselines["fla"]()
        rows.append((what, ran))

    monkeypatch.setattr(bench, "_inputs", inputs)
    monkeypatch.setattr(bench, "_gamma", ops.retention_init_decay)
    monkeypatch.setattr(bench, "_row", row)
    bench.chunk_cases(1, 2, 40, 16, rows)
    fwd, split_fwd = ["fused"], ["states", "output"]
    split_bwd = ["states", "states", "output", "dqk"]
    assert rows == [
        ("chunkwise fwd (fused, the rule)", fwd),
        ("chunkwise fwd+bwd (fused, the rule)", fwd + ["fused"] * 3),
        ("chunkwise fwd (split)", split_fwd),
        ("chunkwise fwd+bwd (split)", split_fwd + split_bwd),
        ("chunkwise fwd+bwd (split6)", split_fwd + ["states", "output"] * 3),
    ]
    # past SPLIT_MIN_CHUNKS (1 here: 3 chunks of 64 at T = 130) the rule mixes the modes, and
    # its own fwd+bwd row runs the fused forward and the split backward
    from rtpcompile.kernels import blocks

    def half_inputs(B, T, H, K, V, grad=False):  # float32 always splits: 16-bit, as the bench
        return tuple(
            torch.randn(B, T, H, d, dtype=torch.float16).requires_grad_(grad) for d in (K, K, V)
        )

    monkeypatch.setattr(blocks, "SPLIT_MIN_CHUNKS", 1)
    monkeypatch.setattr(bench, "_inputs", half_inputs)
    rows.clear()
    bench.chunk_cases(1, 2, 130, 16, rows, modes=("rule", "fused"))
    assert rows == [
        ("chunkwise fwd+bwd (rule: fused fwd, split bwd)", fwd + split_bwd),
        ("chunkwise fwd (fused, the rule)", fwd),
        ("chunkwise fwd+bwd (fused)", fwd + ["fused"] * 3),
    ]


def test_decode_sweep_launches_each_config(monkeypatch, triton_on_cpu):
    """The decode sweep on CPU (the kernel under the interpreter, nothing timed): one row per
    DECODE_SWEEP config with BV <= V, each launching the recurrent kernel with that BV and warps,
    all computing the same output and state."""
    import torch

    from rtpcompile import ops
    from rtpcompile.kernels import launch

    bench = _script("bench_gpu_kernels")
    launched, outputs = [], []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda spec, *a: launched.append(spec) or real(spec, *a))

    def inputs(B, T, H, K, V, grad=False):
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randn(B, T, H, d, generator=g) for d in (K, K, V))

    def graph(fn):
        outputs.append(fn())
        return 2.0

    monkeypatch.setattr(bench, "_inputs", inputs)
    monkeypatch.setattr(bench, "_gamma", ops.retention_init_decay)
    monkeypatch.setattr(bench, "_bench_graph", graph)
    rows = []
    bench.decode_sweep_case(2, 2, 32, rows)
    want = [(bv, w) for bv in (16, 32) for w in bench.DECODE_SWEEP["num_warps"]]
    assert [(r["BV"], r["num_warps"]) for r in rows] == want
    assert [(s.BV, s.num_warps, s.form) for s in launched] == [(*c, "recurrent") for c in want]
    assert all(r["graph_fraction_of_copy"] == 1.0 for r in rows)
    o, state = outputs[1]  # outputs[0] is the copy
    for got_o, got_state in outputs[2:]:
        torch.testing.assert_close(got_o, o)
        torch.testing.assert_close(got_state, state)


def _no_fla(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fla", None)  # what an import of a missing package sees
    return _script("bench_gpu_kernels")


def test_kernel_bench_runs_without_fla(monkeypatch, triton_on_cpu):
    """Without flash-linear-attention the GPU bench still times ours and SDPA (FLA was imported
    unconditionally, so main() raised before any row): meta "fla" is None, and no case asks
    for an FLA baseline."""
    import torch

    from rtpcompile import ops

    bench = _no_fla(monkeypatch)
    meta = bench.metadata("GPU")
    assert meta["fla"] is None and "ModuleNotFoundError" in meta["fla_error"]
    assert "fla not installed" in bench.markdown(meta, [])

    def inputs(B, T, H, K, V, grad=False):
        return tuple(torch.randn(B, T, H, d, requires_grad=grad) for d in (K, K, V))

    rows = []

    def row(rows, what, shape, ours, baselines, kernels_only):
        ours()
        rows.append((what, sorted(baselines)))

    monkeypatch.setattr(bench, "_inputs", inputs)
    monkeypatch.setattr(bench, "_gamma", ops.retention_init_decay)
    monkeypatch.setattr(bench, "_row", row)
    randn = torch.randn  # the recurrent case's state is made on "cuda": here on the CPU
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **k: randn(*a, **k))
    bench.chunk_cases(1, 2, 20, 8, rows, ("fused",))
    bench.parallel_cases(1, 2, 20, 8, rows)
    bench.recurrent_cases(1, 2, 8, rows)
    assert rows == [
        ("chunkwise fwd (fused)", []),
        ("chunkwise fwd+bwd (fused)", []),
        ("parallel fwd", ["sdpa"]),
        ("recurrent decode T=1", []),
    ]


def test_kernel_bench_writes_every_row_as_it_comes(tmp_path):
    """The JSON and the table are rewritten after each row, so a run stopped by the session's
    timeout keeps what it measured; meta "finished" (and the table) say whether it ended."""
    import json

    bench = _script("bench_gpu_kernels")
    meta = {"device": "GPU", "date": "d", "torch": "t", "triton": "tr", "fla": None}
    rows = bench.Results(tmp_path / "out", "kernels_GPU_d", meta)
    path, md = tmp_path / "out" / "kernels_GPU_d.json", tmp_path / "out" / "kernels_GPU_d.md"
    assert json.loads(path.read_text()) == {"meta": {**meta, "finished": False}, "rows": []}
    row = {"case": "parallel fwd", "B": 4, "H": 16, "T": 256, "K": 128, "V": 128,
           "ours_ms": 0.2, "kernels_ms": 0.1, "sdpa_ms": 0.05}  # fmt: skip
    rows.append(row)
    assert json.loads(path.read_text())["rows"] == [row]
    text = md.read_text()
    assert "Incomplete" in text and "| parallel fwd | 4 | 16 | 256 | 128 | 0.200 |" in text
    assert text.endswith("| 0.050 | - | - | 0.100 | - | - |\n")  # sdpa, kernels-only ms, peaks
    rows.finish()
    assert json.loads(path.read_text())["meta"]["finished"] is True
    assert "Incomplete" not in md.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, md.name]  # no .tmp left


def test_kernel_bench_times_are_medians(monkeypatch):
    """triton.testing.do_bench returns the mean unless asked: the tables say medians."""
    import torch
    import triton.testing

    bench = _script("bench_gpu_kernels")
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda: 0)
    seen = {}

    def do_bench(fn, **kwargs):
        seen.update(kwargs)
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    assert bench._bench(lambda: None) == (1.5, 0)
    assert seen["return_mode"] == "median"


def test_cpu_backend_bench_reports_what_the_calls_allocate(tmp_path):
    """The CPU backend bench reports the peak RSS of the timed calls apart from the warm-up
    (compilation): a compiled model that built a T x T mask on every call hid in the
    compile-inclusive figure."""
    import json
    import sys

    bench = _script("bench_backend_cpu")
    args = ["--T", "32", "--models", "stack", "--variants", "eager,chunkwise", "--reps", "1"]
    bench.main([*args, "--compile-layers", "0", "--threads", "1", "--out-dir", str(tmp_path)])
    (record,) = tmp_path.glob("backend_*.json")
    row = json.loads(record.read_text())["runs"]["stack"]["32"]
    for variant in ("eager", "chunkwise"):
        assert row[variant]["median_s"] > 0
        if sys.platform == "linux":
            assert 0 <= row[variant]["run_extra_mb"] < 100
    assert "(calls +" in next(tmp_path.glob("backend_*.md")).read_text()


def test_cpu_decode_bench_writes_its_table(tmp_path):
    bench = _script("cpu_decode")
    bench.main(["--layouts", "A", "--backends", "eager", "--steps", "3", "--rounds", "1",
                "--out", str(tmp_path)])  # fmt: skip
    (table,) = tmp_path.glob("decode_*.md")
    text = table.read_text()
    assert "| model | eager |" in text and "| A | " in text and " ms |" in text


def test_cpu_checkpoint_training_bench_writes_its_table(tmp_path):
    """A tiny run of the checkpointed-training bench: each variant in its own worker; the
    table holds a time and a memory reading per variant, or the worker's error."""
    bench = _script("cpu_checkpoint_training")
    bench.main(["--T", "16", "--variants", "eager,rtp", "--reps", "1",
                "--threads", "1", "--out-dir", str(tmp_path)])  # fmt: skip
    (table,) = tmp_path.glob("checkpoint_training_*.md")
    text = table.read_text()
    assert "| 16 | eager | " in text and "| 16 | rtp | " in text
    assert "exit " not in text  # NOTE: no worker failed


def test_cpu_checkpoint_training_bench_with_learnable_decays(tmp_path):
    bench = _script("cpu_checkpoint_training")
    bench.main(["--T", "16", "--variants", "rtp", "--reps", "1", "--learnable",
                "--threads", "1", "--out-dir", str(tmp_path)])  # fmt: skip
    (table,) = tmp_path.glob("checkpoint_training_learnable_*.md")
    text = table.read_text()
    assert "trainable decays" in text and "| 16 | rtp | " in text and "exit " not in text


def test_triton_launch_cost_bench_runs(monkeypatch):
    """Triton's per-launch steps, timed for an sm_90 target without a GPU: the generated kernels
    read no constexpr global, the templates' module constants would be checked at each launch."""
    bench = _script("triton_launch_cost")
    monkeypatch.setattr(bench, "CASES", (("decode T=1", 1, 2, 1, 16, 24, True),))
    monkeypatch.setattr(bench.torch, "set_num_threads", lambda n: None)
    for name, value in (("TRITON_INTERPRET", "1"), ("RTP_KERNELS", "auto")):
        monkeypatch.setenv(name, value)
    rows = bench.measure(calls=3)
    assert len(rows) == 4  # a decode step's kernel and its backward's three
    assert all(r["inlined_globals"] == 0 < r["module_globals"] for r in rows)
    # only what each spec reads is declared (kernels/arguments.py): 27 of 38 for a decode step
    assert all(20 <= r["arguments"] < 38 and r["inlined_binder_us"] > 0 for r in rows)
    meta = {"date": "d", "machine": "m", "triton": "t", "python": "p", "calls": 3}
    text = bench.markdown(meta, rows)
    assert "| decode T=1 | 4 |" in text
