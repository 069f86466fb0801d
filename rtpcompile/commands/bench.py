"""``rtpcompile bench``: op-level and model-level benchmarks, written as JSON, markdown and PNG.

    rtpcompile bench                      # full sweep on this machine's default device
    rtpcompile bench --quick              # a few minutes at most on a 2-core CPU
    rtpcompile bench --device cuda --out $OUT
Results go to ``benchmarks/results/<device>/`` (``<device>-quick`` with --quick) under the current
folder unless --out. Without --out and --quick, an existing result file there (a recorded sweep)
is not replaced unless --force is given: the run stops before measuring anything.
Exit codes: 0 results written; 1 every measurement of a suite failed (its files are still
written, the errors are in their Notes); 2 a usage error (nothing run).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from ..bench import env as bench_env
from ..bench import model_suite, models, op_suite, writers
from ..bench import variants as op_variants
from ..bench.models import BACKENDS
from ._common import (
    UsageError,
    add_device_argument,
    add_threads_argument,
    check_output_folder,
    int_list,
    names,
    positive_float,
    positive_int,
    prepare,
)

SUITES = ("op", "model")
DTYPES = ("float32", "float16", "bfloat16", "float64")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="op- and model-level benchmarks (JSON, markdown, plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short lengths and few repetitions")
    add_device_argument(p)
    p.add_argument("--suite", type=_choices(SUITES), default=list(SUITES), help="op,model")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results/<device>, or <device>-quick with --quick)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing result files in the default (non-quick) output folder",
    )
    p.add_argument("--lengths", type=_ints, default=None, help="op-level T values, e.g. 512,4096")
    p.add_argument(
        "--modes",
        type=_choices(op_suite.MODES),
        default=list(op_suite.MODES),
        help="op level: fwd (no grad) and/or fwdbwd (gradients of q, k, v); default both",
    )
    p.add_argument(
        "--variants", type=_variant_names, default=None, help="op variants to run (default: all)"
    )
    p.add_argument(
        "--backends",
        type=_choices(BACKENDS),
        default=list(BACKENDS),
        help=f"model level: torch.compile backends (default: {','.join(BACKENDS)})",
    )
    p.add_argument(
        "--reps",
        type=positive_int,
        default=None,
        help="timed repetitions (op level 5, model level 3; --quick: 3 and 2)",
    )
    p.add_argument(
        "--max-call-s", type=positive_float, default=None, help="skip calls predicted slower"
    )
    p.add_argument(
        "--max-mem-gb", type=positive_float, default=None, help="skip T x T buffers larger"
    )
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument(
        "--memory-lengths", type=_ints, default=None, help="measure memory only at these T"
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default=None, help="op-level dtype (float32 CPU, bfloat16 GPU)"
    )
    p.add_argument("--batch", type=positive_int, default=1, help="op-level batch size (1)")
    p.add_argument(
        "--heads", type=positive_int, default=None, help="op-level heads (8 CPU, 16 GPU)"
    )
    p.add_argument(
        "--head-dim", type=positive_int, default=None, help="op-level K = V (64 CPU, 128 GPU)"
    )
    p.add_argument("--whole-model", action="store_true", help="compile models as one graph")
    p.add_argument(
        "--model",
        choices=models.MODELS,
        default="default",
        help="model level: the demo's default model, or retnet (12 x d=1024, all retention)",
    )
    p.add_argument("--prefill-lengths", type=_ints, default=None, help="model-level prefill T")
    p.add_argument("--train-lengths", type=_ints, default=None, help="model-level training T")
    p.add_argument("--no-decode", action="store_true", help="model level: skip the decode part")
    p.add_argument("--no-plot", action="store_true", help="do not write PNG plots")
    add_threads_argument(p)
    defaults = {flag: p.get_default(flag) for flags in _SUITE_FLAGS.values() for flag in flags}
    p.set_defaults(func=run, suite_flag_defaults=defaults)


_ints = int_list("512,4096")


def _choices(valid: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        chosen = names(text)
        bad = sorted(set(chosen) - set(valid))
        if bad or not chosen:
            raise argparse.ArgumentTypeError(f"expected some of {list(valid)}, got {text!r}")
        return chosen

    return parse


def _variant_names(text: str) -> list[str]:
    chosen = names(text)
    if not chosen:  # NOTE: "" would otherwise mean every variant (a full sweep)
        raise argparse.ArgumentTypeError(
            f"expected variant names like chunkwise,auto, got {text!r}"
        )
    return chosen


def op_config(args, device: str) -> op_suite.OpConfig:
    cuda = device.startswith("cuda")
    quick = args.quick
    lengths = args.lengths or (op_suite.QUICK_LENGTHS if quick else op_suite.FULL_LENGTHS)
    return op_suite.OpConfig(
        device=device,
        dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        batch=args.batch,
        heads=args.heads or (16 if cuda else 8),
        k_dim=args.head_dim or (128 if cuda else 64),
        v_dim=args.head_dim or (128 if cuda else 64),
        lengths=tuple(lengths),
        modes=tuple(args.modes),
        reps=args.reps or (3 if quick else 5),
        max_call_s=args.max_call_s or (2.0 if quick else 20.0),
        max_mem_gb=args.max_mem_gb or (100.0 if cuda else 8.0),
        memory=not args.no_memory,
        memory_lengths=tuple(args.memory_lengths or ((max(lengths),) if quick else ())) or None,
        variants=tuple(args.variants) if args.variants else None,
    )


def model_config(args, device: str) -> model_suite.ModelConfig:
    cfg = _model_defaults(args, device)
    cfg.base = models.model_preset(args.model)
    if args.prefill_lengths is not None:
        cfg.prefill_lengths = tuple(args.prefill_lengths)
    if args.train_lengths is not None:
        cfg.train_lengths = tuple(args.train_lengths)
    if args.no_decode:
        cfg.contexts = ()
    return cfg


def _model_defaults(args, device: str) -> model_suite.ModelConfig:
    cuda = device.startswith("cuda")
    if args.quick:
        return model_suite.ModelConfig(
            device=device, backends=tuple(args.backends), prefill_lengths=(128, 512),
            train_lengths=(), contexts=(256, 4096), decode_tokens=8,
            hybrids=model_suite.QUICK_HYBRIDS, reps=args.reps or 2,
            max_call_s=args.max_call_s or 20.0, whole_model=args.whole_model,
        )  # fmt: skip
    return model_suite.ModelConfig(
        device=device, backends=tuple(args.backends),
        prefill_lengths=(512, 2048, 8192, 16384) if cuda else (256, 1024, 4096),
        train_lengths=(512, 2048, 8192) if cuda else (256, 1024),
        contexts=(1024, 8192, 65536) if cuda else (256, 2048, 16384),
        decode_tokens=32 if cuda else 16, reps=args.reps or 3,
        max_call_s=args.max_call_s or 20.0, whole_model=args.whole_model,
    )  # fmt: skip


# NOTE: flags that only one suite reads (a flag left at its parser default is fine)
_SUITE_FLAGS = {
    "op": ("lengths", "variants", "modes", "dtype", "heads", "head_dim", "max_mem_gb",
           "no_memory", "memory_lengths", "batch"),
    "model": ("model", "backends", "prefill_lengths", "train_lengths", "no_decode",
              "whole_model"),
}  # fmt: skip


def _check_suite_flags(args) -> None:
    """A flag of a suite that does not run is a usage error, not silently ignored."""
    for suite, flags in _SUITE_FLAGS.items():
        if suite in args.suite:
            continue
        for flag in flags:
            if getattr(args, flag) != args.suite_flag_defaults[flag]:
                name = "--" + flag.replace("_", "-")
                raise UsageError(f"{name} applies to the {suite} suite only (add --suite {suite})")


def _check_memory_lengths(args) -> None:
    """--memory-lengths must pick some of the op lengths, and memory must be measured."""
    if args.memory_lengths is None:
        return
    if args.no_memory:
        raise UsageError("--memory-lengths does nothing with --no-memory")
    lengths = args.lengths or (op_suite.QUICK_LENGTHS if args.quick else op_suite.FULL_LENGTHS)
    missing = sorted(set(args.memory_lengths) - set(lengths))
    if missing:
        raise UsageError(
            f"--memory-lengths {','.join(map(str, missing))} not among the op lengths "
            f"{','.join(map(str, lengths))} (memory is read at lengths that are timed)"
        )


def _output_folder(args, device: str) -> Path:
    """Where the files go, checked before anything runs (a bad --out used to fail at the end,
    losing the results): a folder that exists or can be made, and in the default folder of a
    non-quick run (where the recorded sweeps live) no existing result file of a chosen suite
    unless --force: a partial run must not silently replace a recorded full sweep."""
    if args.out is not None:
        check_output_folder(args.out, "--out")
        return args.out
    out = Path("benchmarks/results") / (torch.device(device).type + ("-quick" * args.quick))
    check_output_folder(out, "--out")
    existing = [out / f"{s}.json" for s in args.suite if (out / f"{s}.json").exists()]
    if existing and not (args.force or args.quick):
        raise UsageError(
            f"{existing[0]} exists (a recorded result); give --out FOLDER to write elsewhere, "
            "or --force to replace it"
        )
    return out


def reproduce_command(settings: dict[str, str], argv: list[str]) -> str:
    """The command line a result file records: the settings as shell assignments (the value
    quoted, not the whole word: a quoted ``'A=b c'`` is a command name to a shell), then the
    bench command with its arguments."""
    assigns = [f"{name}={shlex.quote(value)}" for name, value in settings.items()]
    return " ".join([*assigns, "rtpcompile bench", shlex.join(argv)]).strip()


def _all_failed(records) -> bool:
    """Every measured cell errored (skips aside): nothing in the files is a measurement."""
    return any(r.status == "error" for r in records) and not any(r.status == "ok" for r in records)


def _report_failures(suite: str, records) -> None:
    """One stderr line per variant that failed wherever it ran (its error, once)."""
    for variant in dict.fromkeys(r.variant for r in records):
        own = [r for r in records if r.variant == variant and r.status != "skipped"]
        if own and all(r.status == "error" for r in own):
            print(f"warning: {suite} / {variant} failed at every length: {own[0].note}",
                  file=sys.stderr)  # fmt: skip


def run(args) -> int:
    """Run the chosen suites and write their files; 1 when every measurement of a suite failed."""
    device = prepare(args)
    _check_suite_flags(args)
    if args.variants:
        try:
            op_variants.build(device, list(args.variants))
        except ValueError as exc:  # NOTE: which variants exist depends on the device
            raise UsageError(f"--variants: {exc}") from None
    if "op" in args.suite:
        _check_memory_lengths(args)
    out = _output_folder(args, device)
    argv = sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv else []
    env = bench_env.describe(device)
    # NOTE: the RTP_* settings are part of what ran: the reproduce line sets them too
    command = reproduce_command(env["rtp_env"], argv)
    print(f"rtpcompile bench  ({bench_env.header_line(env)}) -> {out}")
    written = []
    failed = []
    if "op" in args.suite:
        cfg = op_config(args, device)
        start = time.perf_counter()
        print(f"op level: B={cfg.batch} H={cfg.heads} K=V={cfg.k_dim} {cfg.dtype}, T={cfg.lengths}")
        before = bench_env.plan_counters()
        records, notes = op_suite.run(cfg)
        suite_env = {
            **env,
            "plan_sources": bench_env.plan_sources(before, bench_env.plan_counters()),
        }
        config = {k: v for k, v in vars(cfg).items() if k != "device"}
        written += writers.write_suite(
            out, "op", suite_env, config, records, notes, command,
            op_suite.descriptions(device), plot=not args.no_plot,
        )  # fmt: skip
        _report_failures("op", records)
        failed += ["op"] * _all_failed(records)
        print(f"op level done in {time.perf_counter() - start:.0f} s (measuring and writing)")
    if "model" in args.suite:
        cfg = model_config(args, device)
        start = time.perf_counter()
        print(f"model level: {args.model} model, backends {list(cfg.backends)}")
        before = bench_env.plan_counters()
        records = model_suite.run(cfg)
        suite_env = {
            **env,
            "plan_sources": bench_env.plan_sources(before, bench_env.plan_counters()),
        }
        config = {k: v for k, v in vars(cfg).items() if k not in ("device", "base")}
        written += writers.write_suite(
            out, "model", suite_env, config, records, [], command, plot=not args.no_plot
        )
        _report_failures("model", records)
        failed += ["model"] * _all_failed(records)
        print(f"model level done in {time.perf_counter() - start:.0f} s (measuring and writing)")
    print("wrote " + ", ".join(str(p) for p in written))
    if failed:
        print(f"error: every measurement of the {' and '.join(failed)} suite failed "
              "(see the Notes in its .md)", file=sys.stderr)  # fmt: skip
        return 1
    return 0
