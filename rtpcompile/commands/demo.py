"""``rtpcompile demo``: the README's first command, on the built-in default type-B hybrid model.

1. explain: which retention regions the backend claims and how each would be lowered;
2. compile with backend "rtp" and check the output against eager;
3. time eager vs "inductor" vs "rtp" (or the --backends chosen) for prefill at several lengths
   and one training step;
4. decode with the hybrid cache vs a full-attention model of the same size with a KV cache;
5. write a plot when matplotlib is installed.
Every part that is missing (backend, explain, matplotlib) is skipped with a one-line note.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..bench import env as bench_env
from ..bench import models, optional, report
from ..bench.stats import interleaved, synchronizer
from ._common import (
    add_device_argument,
    add_threads_argument,
    check_output_file,
    int_list,
    names,
    positive_int,
    prepare,
)

TOLERANCE = 1e-3
PROJECTED_CONTEXT = 32768


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="explain, compile, check and time the default hybrid model",
        description=__doc__.split("\n\n")[0],
    )
    add_device_argument(p)
    p.add_argument("--tiny", action="store_true", help="a 3-layer toy model, short lengths (tests)")
    p.add_argument("--lengths", type=_ints, default=None, help="prefill lengths, e.g. 128,512")
    p.add_argument(
        "--train-length", type=positive_int, default=None, help="sequence length of the step"
    )
    p.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    p.add_argument("--decode-tokens", type=positive_int, default=None, help="tokens to decode")
    p.add_argument(
        "--prompt", type=positive_int, default=None, help="prompt length before decoding"
    )
    p.add_argument(
        "--backends",
        type=_names,
        default=list(models.BACKENDS),
        help=f"backends to compare, comma-separated (default: {','.join(models.BACKENDS)})",
    )
    p.add_argument(
        "--whole-model", action="store_true", help="compile the model as one graph, not per block"
    )
    p.add_argument("--reps", type=positive_int, default=3, help="timed repetitions per variant")
    p.add_argument(
        "--plot", type=Path, default=Path("rtpcompile_demo.png"), help="where to write the plot"
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    add_threads_argument(p)
    p.set_defaults(func=run)


_ints = int_list("128,512")


def _names(text: str) -> list[str]:
    chosen = names(text)
    bad = sorted(set(chosen) - set(models.BACKENDS))
    if bad or "eager" not in chosen:
        raise argparse.ArgumentTypeError(
            f"backends must include eager and come from {list(models.BACKENDS)}, got {text!r}"
        )
    return chosen


def _settings(args) -> dict:
    tiny = args.tiny
    return {
        "config": models.tiny_config() if tiny else None,
        "lengths": args.lengths or ([16, 48] if tiny else [128, 512, 2048]),
        "train_length": args.train_length or (32 if tiny else 256),
        "decode_tokens": args.decode_tokens or (8 if tiny else 64),
        "prompt": args.prompt or (16 if tiny else 256),
    }


def run(args) -> int:
    """Run the demo; 0 when the compiled model matched eager, 1 otherwise."""
    started = time.perf_counter()
    device = prepare(args)
    if not args.no_plot:  # NOTE: checked first: a bad path used to fail after the whole demo
        check_output_file(args.plot, "--plot")
    s = _settings(args)
    env = bench_env.describe(device)
    print(f"rtpcompile demo  ({bench_env.header_line(env)})")
    model = models.build_model(s["config"], device)
    cfg = model.config
    print(
        f"model: RTPHybridLM type {cfg.layout}, {cfg.num_layers} layers "
        f"[{' '.join(t[:3] for t in model.layer_types)}], dim {cfg.dim}, {cfg.num_heads} heads, "
        f"{models.num_params(model) / 1e6:.2f} M parameters"
    )
    ids = models.random_ids(cfg.vocab_size, s["lengths"][0], device)
    _section("explain (what the rtp backend claims; nothing is run)")
    _explain(model, ids)
    _section("compile and check")
    compiled = _compile_all(model, args.backends, args.whole_model)
    ok = _check(model, compiled, ids)
    _section(f"time: {' vs '.join(compiled)}")  # NOTE: the chosen backends that compiled
    timings = _time_prefill(model, compiled, s["lengths"], device, args.reps)
    if not args.no_train:
        _time_train(model, compiled, s["train_length"], device, args.reps)
    _section(f"decode {s['decode_tokens']} tokens after a {s['prompt']}-token prompt (eager)")
    decoded = _decode(model, s, device)
    if not args.no_plot:
        _plot(args.plot, timings, decoded, s)
    print(
        f"\ndone in {time.perf_counter() - started:.0f} s (everything above, compilation included)"
    )
    return 0 if ok else 1


def _section(title: str) -> None:
    print(f"\n== {title}")


def _explain(model, ids) -> None:
    explain, note = optional.explain_fn()
    if explain is None:
        print(f"  {note}")
        return
    try:
        rep = explain(model, ids)
    except Exception as exc:  # noqa: BLE001 - the demo goes on without the table
        print(f"  explain failed: {type(exc).__name__}: {exc}")
        return
    print(str(rep))
    claimed, declined = len(getattr(rep, "claimed", [])), len(getattr(rep, "declined", []))
    print(f"  regions claimed: {claimed}, declined: {declined}")
    if claimed:
        _kernels(rep)


def _kernels(rep) -> None:
    """The generated kernels the first claimed region would launch on a GPU (nothing runs)."""
    first = next(i for i, r in enumerate(rep.regions) if r.claimed)
    try:
        found = rep.kernels(first, backward=True)
    except Exception as exc:  # noqa: BLE001 - e.g. no Triton here; the demo goes on
        print(f"  kernels: not shown ({type(exc).__name__}: {exc})")
        return
    print(f"  region {first} on a GPU (bfloat16, Triton cost model), training step kernels:")
    for info in found:
        print(f"    {info}")


def _compile_all(model, backends: list[str], whole: bool) -> dict:
    how = "the whole model as one graph" if whole else "each block (regional; --whole-model)"
    print(f"  torch.compile(..., backend=B, dynamic=True) on {how}")
    compiled = {}
    for name in backends:
        fn, note = models.compile_for(model, name, whole)
        if fn is None:
            print(f"  {name}: {note}")
            continue
        compiled[name] = fn
    return compiled


def _check(model, compiled: dict, ids) -> bool:
    """Compare the compiled model(s) with eager; the first call also compiles (timed here)."""
    with torch.no_grad():
        ref = model(ids)
    target = "rtp" if "rtp" in compiled else next((n for n in compiled if n != "eager"), None)
    if target is None:
        print("  no compiled backend available: nothing to check")
        return True
    ok = True
    for name, fn in compiled.items():
        if name == "eager":
            continue
        start = time.perf_counter()
        try:
            with torch.no_grad():
                out = fn(ids)
        except Exception as exc:  # noqa: BLE001 - reported, the demo fails at the end
            print(f"  compiled ({name}) failed: {type(exc).__name__}: {exc}")
            ok = False
            continue
        diff = (out.float() - ref.float()).abs().max().item()
        verdict = "OK" if diff <= TOLERANCE else "MISMATCH"
        ok &= verdict == "OK"
        print(
            f"  compiled ({name}) vs eager: max abs diff {diff:.2e} (tolerance {TOLERANCE:.0e}) "
            f"{verdict}   [compiled in {time.perf_counter() - start:.1f} s]"
        )
    return ok


def _time_prefill(model, compiled: dict, lengths: list[int], device: str, reps: int) -> dict:
    print(f"  prefill (forward, no grad, batch 1), median of {reps}, ±: half the IQR")
    results: dict[str, dict[int, float]] = {name: {} for name in compiled}
    rows = []
    for T in lengths:
        ids = models.random_ids(model.config.vocab_size, T, device)
        fns = {name: models.prefill_fn(fn, ids) for name, fn in compiled.items()}
        stats, errors = interleaved(fns, reps, 1, synchronizer(device))
        for name, st in stats.items():
            results[name][T] = st.median
        rows.append([f"T={T}"] + _cells(stats, errors, list(compiled)))
    print(report.text_table(["prefill"] + _headers(compiled), rows))
    return results


def _time_train(model, compiled: dict, T: int, device: str, reps: int) -> None:
    ids = models.random_ids(model.config.vocab_size, T + 1, device)
    fns = {name: models.train_step_fn(fn, model, ids) for name, fn in compiled.items()}
    start = time.perf_counter()
    for name in [n for n in fns if n != "eager"]:  # compile the training graphs, untimed
        fns[name]()
    compile_s = time.perf_counter() - start
    stats, errors = interleaved(fns, reps, 1, synchronizer(device))
    row = [f"T={T}"] + _cells(stats, errors, list(fns))
    print(f"\n  training step (forward + loss + backward), compiled in {compile_s:.0f} s")
    print(report.text_table(["train step"] + _headers(fns), [row]))


def _headers(names) -> list[str]:
    return [n if n == "eager" else f"{n} (speed-up)" for n in names]


def _cells(stats: dict, errors: dict, names: list[str]) -> list[str]:
    base = stats.get("eager")
    cells = []
    for name in names:
        if name in errors:
            cells.append("error")
            continue
        st = stats[name]
        text = f"{report.fmt_seconds(st.median)} ±{50 * st.spread:.0f}%"
        if name != "eager" and base is not None:
            text += f" ({base.median / st.median:.2f}x)"
        cells.append(text)
    return cells


def _decode(model, s: dict, device: str) -> dict:
    twin = models.build_model(models.full_attention_twin(model.config), device)
    prompt = models.random_ids(model.config.vocab_size, s["prompt"], device)
    sync = synchronizer(device)
    rows, out = [], {}
    for label, m in (("hybrid (rtp, type B)", model), ("full attention", twin)):
        cache = m.new_cache(1)
        with torch.no_grad():
            first = m(prompt, cache=cache)[:, -1:].argmax(dim=-1)
        res = models.decode(m, cache, first, s["decode_tokens"], sync)
        seq = cache.seq_len
        projected = models.kv_bytes_at(res.cache, seq, PROJECTED_CONTEXT)
        out[label] = {"bytes": res.cache, "seq_len": seq}
        rows.append([
            label, f"{models.num_params(m) / 1e6:.2f} M", f"{res.tokens_per_s:.1f}",
            report.fmt_bytes(res.cache["state"]), report.fmt_bytes(res.cache["kv"]),
            report.fmt_bytes(res.cache["total"]), report.fmt_bytes(projected),
        ])  # fmt: skip
    headers = ["model", "params", "tokens/s", "state", "K/V", f"cache @ {seq}", "@ 32k (proj.)"]
    print(report.text_table(headers, rows))
    return out


def _plot(path: Path, timings: dict, decoded: dict, s: dict) -> None:
    plt = optional.pyplot()
    if plt is None:
        print("\nplot: matplotlib not installed (pip install 'rtpcompile[bench]')")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, series in timings.items():
        if series:
            ax1.plot(list(series), [1e3 * t for t in series.values()], marker="o", label=name)
    ax1.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="ms", title="prefill time")
    ax1.legend()
    contexts = [2**i for i in range(8, 18)]
    for label, d in decoded.items():
        sizes = [models.kv_bytes_at(d["bytes"], d["seq_len"], c) / 2**20 for c in contexts]
        ax2.plot(contexts, sizes, marker=".", label=label)
    ax2.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB")
    ax2.set_title("decoding cache size (projected)")
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nplot written to {path}")
