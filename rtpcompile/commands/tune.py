"""``rtpcompile tune``: warm the autotune cache ahead of deployment.

    rtpcompile tune --shape 1,8,2048,64 --shape 4,8,512,64,128 --dtype bfloat16 --device cuda
    rtpcompile tune --shape 1,8,4096,64 --phase both --state --force
    rtpcompile tune --shape 1,8,4096,64 --phase both --form chunkwise

Each ``--shape`` is ``B,H,T,K[,V]`` (V defaults to K). Every shape is benchmarked once per
phase (forward, backward or both) unless its bucket is already cached (``--force`` re-runs),
and the winner is stored where the planner reads it at run time, whatever ``RTP_AUTOTUNE`` is.
On the Triton backend (CUDA, or ``RTP_KERNELS=triton``) the winner includes its kernel block
configuration (BV, num_warps, num_stages, split), printed after the form and stored in the entry.
CPU entries are keyed by torch's thread count: tune with ``--threads N`` when the model will run
with ``torch.set_num_threads(N)`` (or ``rtpcompile demo/bench --threads N``).

The cache key includes the form a call asks for: ``ops.retention`` and compiled regions ask for
``auto`` (the default here); ``ops.retention_chunkwise(q, k, v, gamma)`` and
``options={"form": "chunkwise"}`` without a chunk size ask for ``chunkwise`` (the planner still
picks the chunk size) and read only entries tuned with ``--form chunkwise``. A forced
``parallel`` or ``recurrent`` form is used as given: nothing to tune. A forced chunk size
(``RTP_CHUNK_SIZE``, ``options={"chunk_size": N}``) is part of the key too: the planner still
chooses between the parallel form and chunkwise at that size (and, on Triton, the blocks), so
``--chunk-size N`` tunes those entries; it defaults to ``RTP_CHUNK_SIZE`` when that is set.

Tuning stores its winners, so it needs a cache it can write: with ``RTP_CACHE=off`` or
``readonly``, or a cache directory that cannot be written, it fails (exit code 1) before
benchmarking anything, and a winner that could not be stored fails it too.
"""

from __future__ import annotations

import argparse
import sys

from .. import options
from ..kernels import cache
from . import _common

PHASES = {"fwd": ("fwd",), "bwd": ("bwd",), "both": ("fwd", "bwd")}
FORMS = ("auto", "parallel", "chunkwise", "recurrent")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="benchmark retention lowerings for given shapes and store the winners",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shape", action="append", required=True, type=parse_shape, metavar="B,H,T,K[,V]"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--device", type=_common.device, default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)"
    )
    parser.add_argument("--phase", default="fwd", choices=sorted(PHASES))
    parser.add_argument("--state", action="store_true", help="an initial state comes in")
    parser.add_argument(
        "--form",
        choices=list(FORMS),
        default="auto",
        help="the form the calls ask for: auto (ops.retention, compiled regions; default) or "
        "chunkwise (ops.retention_chunkwise, options={'form': 'chunkwise'}) are tuned and "
        "cached apart; parallel and recurrent are used as given (nothing to tune)",
    )
    parser.add_argument(
        "--final-state",
        choices=["auto", "yes", "no"],
        default="auto",
        help="whether the forward returns its final state: Triton forwards are planned for each "
        "apart (ops.retention and compiled regions without a state return none, "
        "ops.retention_chunkwise one); auto tunes both",
    )
    parser.add_argument(
        "--chunk-size",
        type=_common.positive_int,
        default=None,
        help="the chunk size the calls force (RTP_CHUNK_SIZE, options={'chunk_size': N}); "
        "default: RTP_CHUNK_SIZE when set, else free (the planner picks it)",
    )
    parser.add_argument("--force", action="store_true", help="re-benchmark cached buckets")
    parser.add_argument(
        "--threads",
        type=_common.positive_int,
        default=None,
        help="torch CPU threads to tune for: CPU entries are keyed by the thread count, so use "
        "the count the model will run with (default: torch's choice)",
    )
    parser.set_defaults(func=run)


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    try:
        dims = [int(x) for x in text.replace("x", ",").split(",")]
    except ValueError:
        dims = []
    if len(dims) not in (4, 5) or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"expected B,H,T,K or B,H,T,K,V with positive integers, got {text!r}"
        )
    B, H, T, K = dims[:4]
    return B, H, T, K, dims[4] if len(dims) == 5 else K


def _progress(done: int, total: int, label: str) -> None:
    if not sys.stderr.isatty():
        return
    width = 24
    filled = width * done // max(total, 1)
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(f"\r[{bar}] {done}/{total} {label[:60]:<60}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run(args) -> int:
    import torch

    from ..lowering import dispatch, plan

    threads = getattr(args, "threads", None)  # NOTE: getattr: see --final-state below
    if threads:
        torch.set_num_threads(threads)
    try:  # NOTE: the parser checked it already; a Namespace built in code may not have been
        device = torch.device(_common.device(str(args.device)))
    except argparse.ArgumentTypeError as exc:
        raise _common.UsageError(f"--device: {exc}") from None
    try:
        # NOTE: every RTP_* value up front (``current`` checks them as an op call does): a bad
        # one is a usage error here, not a traceback from the first benchmark
        current = options.current()
        unusable = cache.why_not_writable()
        backend = "triton" if dispatch.use_triton(torch.empty(0, device=device)) else "aten"
    except (ValueError, RuntimeError) as exc:
        # NOTE: RuntimeError: RTP_KERNELS=triton on CPU without the interpreter (and a device
        # that cannot start, also a matter of the command's arguments or environment)
        raise _common.UsageError(str(exc)) from None
    if unusable:
        print(f"rtpcompile tune: cannot store tuned plans: {unusable}", file=sys.stderr)
        return 1
    # NOTE: getattr: a Namespace built by a caller before --final-state existed runs as "auto"
    choice = getattr(args, "final_state", "auto")
    finals = {"auto": (False, True), "yes": (True,), "no": (False,)}[choice]
    form = getattr(args, "form", "auto")  # NOTE: getattr: as --final-state
    if form not in FORMS:
        raise _common.UsageError(f"--form: expected one of {', '.join(FORMS)}, got {form!r}")
    # NOTE: getattr: as --final-state; the environment's chunk size keys a deployment's calls
    chunk = getattr(args, "chunk_size", None) or current.chunk_size or 0
    call = (args.dtype, str(device), backend, args.state)
    problems = {
        plan.Problem(B, H, T, K, V, *call, phase, form, chunk=chunk, state_out=final): None
        for B, H, T, K, V in args.shape
        for phase in PHASES[args.phase]
        for final in finals
    }  # NOTE: a dict: problems that normalise to one (aten, the backward) run once, in order
    return _tune_all(list(problems), args, backend)


def _tune_all(jobs: list, args, backend: str) -> int:
    """Tune ``jobs`` in order, one line each; 1 when a winner could not be stored."""
    from ..lowering import plan

    before = plan.counters["benchmarks"]
    lost = 0
    for done, problem in enumerate(jobs):
        label = plan.shape_text(problem)
        label += f", form {problem.request}" if problem.request != "auto" else ""
        _progress(done, len(jobs), label)
        if problem.request in ("parallel", "recurrent"):
            result = f"{problem.request} (forced, nothing to tune)"
        elif problem.request == "chunkwise" and problem.chunk:
            # NOTE: a forced form and chunk run as given: the planner reads no entry for them
            # (tune stored one at another chunk, which the cache then refused, until 2026-11-25)
            result = f"chunkwise(C={problem.chunk}) (forced, nothing to tune)"
        elif problem.request == "auto" and (
            problem.T == 1 or (problem.has_state and problem.T <= plan.RECURRENT_MAX_T)
        ):
            result = "recurrent (rule: decoding, nothing to tune)"
        else:
            failures = cache.write_failures
            chosen = plan.plan_for(problem, tune=True, force=args.force)
            result = plan.describe(chosen)
            if backend == "triton" and not chosen.config:
                result += ", kernel config: defaults"
            # NOTE: the directory can still fail after the check in run (a full disk)
            if chosen.source == "tuned" and cache.write_failures > failures:
                result += ", NOT STORED"
                lost += 1
        _progress(done + 1, len(jobs), label)
        print(f"{label}: {result}")
    ran = plan.counters["benchmarks"] - before
    print(f"{ran} benchmark run(s) on the {backend} backend; cache: {plan.cache_location()}")
    if lost:
        print(
            f"rtpcompile tune: {lost} tuned plan(s) could not be stored in {cache.directory()}",
            file=sys.stderr,
        )
        return 1
    return 0
