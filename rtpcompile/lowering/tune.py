"""Candidates, the cost model and the benchmark loop of the planner (docs/autotune.md).

The cost model (``cost.estimate``, re-exported here) predicts each candidate's time when
nothing was measured; ``model_choice`` takes the cheapest candidate.

Autotuning benchmarks every candidate on random inputs of the call's real shape (never the
user's tensors, never the global RNG) by calling the implementation directly -- not the op,
which would recurse into the planner. A candidate that fails to compile or runs out of memory
scores infinity and is skipped; any other error re-raises with the shapes and strides needed
to reproduce it.

On the Triton backend a candidate is a form, a chunk size and a kernel block configuration
(``triton_configs``: V block, warps, stages, and for chunkwise in the "full" space whether its
passes run fused or split), pruned by a per-program register and shared memory estimate
(``why_not_fits``). Under the Triton interpreter (CPU) the search space is
"quick" -- warps and stages do nothing there -- unless ``RTP_TUNE_CONFIGS`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable

import torch

from . import plan as _plan
from .cost import (  # noqa: F401 - re-exported: the planner's and tests' entry points
    DEFAULT_SMS,
    INF,
    MACHINES,
    KernelCost,
    Machine,
    _parallel_bytes,
    _triton_kernels,
    _triton_passes,
    estimate,
    kernel_seconds,
    sm_count,
)
from .plan import DEFAULT_CHUNK, Plan, Problem

log = logging.getLogger("rtpcompile")

CHUNKS = (16, 32, 64, 128, 256)
# NOTE: the generated kernels clamp the chunk (BT) to <= 64 (see kernels/spec.py); larger
# candidates would re-measure C=64 under another name (seen on an H200).
TRITON_CHUNKS = (16, 32, 64)

# Triton block configurations searched by autotuning (docs/autotune.md). BV 0 means "the full V":
# the smallest power-of-two block covering V (up to the kernels' MAX_DIM).
TRITON_BV = (32, 64, 0)
TRITON_WARPS = (4, 8)
TRITON_STAGES = (1, 2, 3)
CONFIG_SPACES = ("auto", "full", "quick", "default")
# NOTE: resource rule. fp32 accumulator tiles live in registers: more than 128 values per thread
# (half the 255-register file, the rest for operands and addresses) spills. tl.dot operands are
# staged in shared memory once per pipeline stage; 96 KiB is what every recent NVIDIA GPU grants
# a block (the device's own opt-in limit is used on CUDA).
MAX_ACC_PER_THREAD = 128
DEFAULT_SHARED_MEMORY = 96 * 1024


def candidates(p: Problem, configs: bool = False) -> list[Plan]:
    """The lowerings worth comparing for ``p`` (a forced chunk size or form narrows the list).

    ``configs``: on the Triton backend, expand each one into its block configurations
    (``triton_configs``); the cost model cannot tell them apart, so it compares the bare forms.
    """
    sizes = TRITON_CHUNKS if p.backend == "triton" else CHUNKS
    if p.request == "chunkwise":
        found = [Plan("chunkwise", c, "model") for c in ((p.chunk,) if p.chunk else sizes)]
    else:
        found = [Plan("parallel", p.chunk or DEFAULT_CHUNK, "model")]
        chunks = (p.chunk,) if p.chunk else tuple(c for c in sizes if c < p.T)
        found += [Plan("chunkwise", c, "model") for c in chunks]
    if not configs or p.backend != "triton":
        return found
    expanded, seen = [], set()
    for c in found:
        for cfg in triton_configs(p, c.form, c.chunk_size):
            plan = dataclasses.replace(c, config=cfg)
            # NOTE: the kernels clamp the chunk (32 for fused passes at K = 256) and BV: two
            # candidates that launch the same kernels in every pass would be measured twice
            runs = _kernels_run(p, plan)
            if runs not in seen:
                seen.add(runs)
                expanded.append(plan)
    return expanded


def _kernels_run(p: Problem, plan: Plan) -> tuple:
    """What ``plan`` launches in each pass orientation: (form, split, BT, BV, warps, stages);
    BKC follows from K."""
    from ..kernels.spec import default_blocks, next_pow2, use_split

    cfg = dict(plan.config)
    runs = []
    for K, V in _orientations(p):
        split = use_split(
            plan.form, p.T, K, plan.chunk_size, cfg, V=V, BH=p.B * p.H, dtype=p.dtype, phase=p.phase
        )
        d = default_blocks(plan.form, K, V, plan.chunk_size, split, dtype=p.dtype)
        d.update({k: v for k, v in cfg.items() if k != "split"})
        bv = min(d["BV"], max(16, next_pow2(V)))
        runs.append((plan.form, split, d["BT"], bv, d["num_warps"], d["num_stages"]))
    return tuple(runs)


def _orientations(p: Problem) -> list[tuple[int, int]]:
    """(K, V) of the passes of one call: the backward's passes also run with K and V swapped."""
    return [(p.K, p.V)] + ([(p.V, p.K)] if p.phase == "bwd" and p.V != p.K else [])


def config_space(p: Problem) -> str:
    """``RTP_TUNE_CONFIGS``: "full", "quick" (BV only), "default" (no block search) or "auto".

    "auto" (the default) is "quick" under the Triton interpreter on CPU, where warps and stages
    have no effect and every candidate is slow, and "full" otherwise.
    """
    raw = os.environ.get("RTP_TUNE_CONFIGS", "auto").strip().lower() or "auto"
    if raw not in CONFIG_SPACES:
        raise ValueError(
            f"environment variable RTP_TUNE_CONFIGS must be one of {list(CONFIG_SPACES)}, "
            f"got {raw!r}"
        )
    if raw != "auto":
        return raw
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return "quick" if interpreting and torch.device(p.device).type == "cpu" else "full"


def triton_configs(p: Problem, form: str, chunk: int) -> list[tuple[tuple[str, int], ...]]:
    """Block configurations of one Triton candidate, the kernels' defaults first.

    full: BV in TRITON_BV x num_warps in TRITON_WARPS x num_stages in TRITON_STAGES, plus for
    chunkwise each BV at the default warps and stages with the passes split the other way from
    ``spec.use_split``'s rule; quick: BV only (warps and stages at their defaults); each pruned
    by ``why_not_fits``.
    """
    from ..kernels.spec import MAX_DIM, default_blocks, next_pow2, use_split

    split = use_split(form, p.T, p.K, chunk, V=p.V, BH=p.B * p.H, dtype=p.dtype, phase=p.phase)
    d = default_blocks(form, p.K, p.V, chunk, split, dtype=p.dtype)
    cover = min(max(16, next_pow2(p.V)), MAX_DIM)
    space = config_space(p)
    bvs = [d["BV"]] + [min(b or cover, cover) for b in TRITON_BV]
    warps = [d["num_warps"]] + (list(TRITON_WARPS) if space == "full" else [])
    stages = [d["num_stages"]] + (list(TRITON_STAGES) if space == "full" else [])
    if space == "default":
        bvs = bvs[:1]
    found: list[tuple[tuple[str, int], ...]] = []
    for bv, w, st in itertools.product(bvs, warps, stages):
        cfg = (("BV", bv), ("num_stages", st), ("num_warps", w))
        if cfg in found:
            continue
        reason = why_not_fits(p, form, chunk, dict(cfg)) if found else None  # keep the default
        if reason is None:
            found.append(cfg)
        else:
            log.debug("rtpcompile autotune: %s %s pruned (%s)", form, cfg, reason)
    if form == "chunkwise" and space == "full":
        found += _split_variants(p, chunk, found)
    return found


def _split_variants(p: Problem, chunk: int, found: list) -> list:
    """The kept BVs at default warps and stages, with the passes split the other way than the
    rule would (both ways when the rule differs between the backward's orientations), pruned
    like the rest (the split's output stage holds the fused kernel's tiles less the state)."""
    from ..kernels.spec import default_blocks, use_split

    rule = {
        int(use_split("chunkwise", p.T, K, chunk, V=V, BH=p.B * p.H, dtype=p.dtype, phase=p.phase))
        for K, V in _orientations(p)
    }
    other = (0, 1) if len(rule) > 1 else (1 - rule.pop(),)
    if p.T <= default_blocks("chunkwise", p.K, p.V, chunk, True, dtype=p.dtype)["BT"]:
        other = tuple(s for s in other if s == 0)  # one split chunk: nothing to parallelise
    bvs = dict.fromkeys(dict(c)["BV"] for c in found)
    variants = []
    for split in other:
        d = default_blocks("chunkwise", p.K, p.V, chunk, bool(split), dtype=p.dtype)
        stages, warps = d["num_stages"], d["num_warps"]
        variants += [
            (("BV", bv), ("num_stages", stages), ("num_warps", warps), ("split", split))
            for bv in bvs
        ]
    return [c for c in variants if why_not_fits(p, "chunkwise", chunk, dict(c)) is None]


def why_not_fits(p: Problem, form: str, chunk: int, cfg: dict[str, int]) -> str | None:
    """None when ``cfg`` plausibly fits one program's registers and shared memory, else why.

    Per program, with BT, BK from the kernels' defaults and BV clamped to the pass's V:
      registers: fp32 accumulators / (32 * num_warps) <= MAX_ACC_PER_THREAD, the accumulators
        being the state [BK, BV] (chunkwise), the scores [BT, BT] and the output rows [BT, BV];
      shared memory: num_stages * (tiles loaded per loop step: q, k [BT, BK] and v [BT, BV])
        * element size <= the device limit.
    A parallel pass that starts from a state (an initial state, or the backward's final-state
    gradient, which its dk and dv passes start from) stages, after its loop, the [BK, BV] state
    loaded in the accumulator dtype and its q rows [BT, BK] for the state's tl.dot: that too must
    fit (its loop's buffers are free by then: the larger of the two counts).
    A split chunkwise pass (``spec.use_split``, by the config's ``split`` or the rule) is two
    kernels walking K in BKC blocks: the states kernel holds a [BKC, BV] state slice and
    pipelines k [BT, BKC] and v loads; the output kernel holds the scores, the rows and the
    state's contribution ([BT, BT] + 2 [BT, BV]) and pipelines q, k [BT, BKC] and the entering
    state [BKC, BV] over its K loop. The larger of the two must fit.
    The backward's passes swap K and V, so a "bwd" config must fit both orientations; when both
    split, its dq/dk kernel (``chunk_dqk``, blocks of its own but the config's warps and stages)
    holds the scores and two [BT, BKC] row blocks and pipelines do, v [BT, BV] and two [BV, BKC]
    states over its V loop, then loads q and k.
    """
    from ..kernels.spec import default_blocks, dqk_blocks, next_pow2, use_split

    size = torch.finfo(getattr(torch, p.dtype)).bits // 8
    stages, warps = cfg["num_stages"], cfg["num_warps"]
    limit = _shared_memory(p.device)

    # NOTE: the backward's Problem always has state_out (one plan serves the calls with and
    # without a final-state gradient), so its parallel passes are counted with the state
    state_in = form == "parallel" and (p.has_state or p.phase == "bwd")
    acc_size = 8 if p.dtype == "float64" else 4

    def problem(acc: int, tiles: int, after: int = 0) -> str | None:
        per_thread = acc / (32 * warps)
        if per_thread > MAX_ACC_PER_THREAD:
            return f"{per_thread:.0f} fp32 accumulators per thread > {MAX_ACC_PER_THREAD}"
        need = max(tiles * size, after)
        if need > limit:
            return f"{need} bytes of shared memory > {limit}"
        return None

    splits = []
    for K, V in _orientations(p):
        split = use_split(form, p.T, K, chunk, cfg, V=V, BH=p.B * p.H, dtype=p.dtype, phase=p.phase)
        splits.append(split)
        d = default_blocks(form, K, V, chunk, split, dtype=p.dtype)
        BT, BK, BV = d["BT"], d["BK"], min(cfg["BV"], max(16, next_pow2(V)))
        if split:
            BKC = d["BKC"]
            acc = max(BKC * BV, BT * BT + 2 * BT * BV)
            tiles = max(stages * (BT * BKC + BT * BV), stages * (2 * BT * BKC + BKC * BV) + BT * BV)
        else:
            acc = BT * BT + BT * BV + (BK * BV if form == "chunkwise" else 0)
            tiles = stages * ((2 if form == "chunkwise" else 1) * BT * BK + BT * BV)
        # NOTE: measured for sm_90 (ptxas): bfloat16, K = V = 192, BV = 256, 3 stages uses 34,816
        # bytes without a state and 262,144 with one, above an H200's 232,448
        after = BK * BV * acc_size + BT * BK * size if state_in else 0
        why = problem(acc, tiles, after)
        if why:
            return why
    if p.phase == "bwd" and all(splits):
        d = dqk_blocks(default_blocks(form, p.K, p.V, chunk, True, dtype=p.dtype), p.V)
        BT, BKC, BV = d["BT"], d["BKC"], d["BV"]
        why = problem(BT * BT + 2 * BT * BKC, stages * 2 * (BT * BV + BV * BKC) + 2 * BT * BKC)
        return None if why is None else f"dq/dk kernel: {why}"
    return None


def _shared_memory(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return int(getattr(props, "shared_memory_per_block_optin", DEFAULT_SHARED_MEMORY))
    return DEFAULT_SHARED_MEMORY


# ----------------------------------------------------------------------------- cost model


def model_choice(p: Problem) -> Plan:
    """The candidate with the lowest estimate (ties go to the earlier, simpler candidate)."""
    return min(candidates(p), key=lambda c: estimate(p, c))


# ----------------------------------------------------------------------------- benchmarking


def _is_resource_error(exc: BaseException) -> bool:
    """Compile errors and out-of-memory/resources: the candidate is skipped, not fatal."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    names = {c.__name__ for c in type(exc).__mro__}  # triton's errors, and their subclasses
    if names & {"CompilationError", "OutOfResources", "PTXASError"}:
        return True
    text = str(exc).lower()
    return "out of memory" in text or "out of resources" in text


def _inputs(p: Problem) -> dict[str, torch.Tensor | None]:
    dev, dtype = torch.device(p.device), getattr(torch, p.dtype)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=dev).to(dtype)

    B, H, T, K, V = p.B, p.H, p.T, p.K, p.V
    gamma = 1.0 - torch.pow(2.0, -5.0 - torch.arange(H, dtype=torch.float32, device=dev))
    state = rand(B, H, K, V).float() if p.has_state else None
    x = {"q": rand(B, H, T, K), "k": rand(B, H, T, K), "v": rand(B, H, T, V),
         "gamma": gamma, "state": state, "do": rand(B, H, T, V)}  # fmt: skip
    # NOTE: the final state's gradient, float32 like the final state autograd hands it for: one
    # backward plan serves calls with and without it (``Problem.state_out``), and with it the
    # dk and dv passes start from a state (more work, a larger parallel kernel), so the winner
    # is measured in the heavier case
    x["dsf"] = rand(B, H, K, V).float() if p.phase == "bwd" else None
    return x


def _runner(p: Problem, plan: Plan, x: dict) -> Callable[[], object]:
    from . import dispatch

    scale = p.K**-0.5
    args = (x["q"], x["k"], x["v"], x["gamma"], scale, x["state"])
    form, chunk, cfg = plan.form, plan.chunk_size, plan.config
    if p.phase == "fwd":
        return lambda: dispatch.forward(form, *args, chunk, cfg, state_out=p.state_out)
    _, final = dispatch.forward(form, *args, chunk, cfg)
    return lambda: dispatch.backward(form, x["do"], x["dsf"], *args, final, chunk, cfg)


def _time(fn: Callable[[], object], device: torch.device, budget: float = 0.25) -> float:
    """Best-of-N milliseconds after one warm-up run (N <= 10, within ``budget`` seconds)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best, spent, runs = INF, 0.0, 0
    while runs < 2 or (spent < budget and runs < 10):
        start = time.perf_counter()
        fn()
        sync()
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best * 1e3


def _reproduce(p: Problem, plan: Plan, x: dict) -> str:
    parts = [
        f"{name}: shape {tuple(t.shape)} stride {t.stride()} {t.dtype} {t.device}"
        for name, t in x.items()
        if t is not None
    ]
    return f"rtpcompile autotune: {p.phase} candidate {plan.label} failed; " + "; ".join(parts)


def benchmark(p: Problem, plans: list[Plan]) -> dict[Plan, float]:
    """Milliseconds per candidate; inf for one that fails to compile or runs out of memory."""
    x = _inputs(p)
    machine = MACHINES.get(p.backend, MACHINES["aten"])
    timings: dict[Plan, float] = {}
    with torch.no_grad():
        for plan in plans:
            _plan.counters["benchmarks"] += 1
            if plan.form == "parallel" and p.backend == "aten":
                if _parallel_bytes(p) > machine.memory:  # would thrash or be OOM-killed
                    timings[plan] = INF
                    continue
            try:
                timings[plan] = _time(_runner(p, plan, x), torch.device(p.device))
            except Exception as exc:
                if not _is_resource_error(exc):
                    note = _reproduce(p, plan, x)
                    if hasattr(exc, "add_note"):
                        exc.add_note(note)
                        raise
                    raise RuntimeError(f"{note}: {exc}") from exc
                log.info("rtpcompile autotune: %s skipped (%s)", plan.label, exc)
                timings[plan] = INF
                if torch.device(p.device).type == "cuda":
                    torch.cuda.empty_cache()
    return timings


def autotune(p: Problem, key: dict, inputs=None) -> Plan | None:
    """Benchmark the candidates of ``p``, store the winner under ``key``; None if all failed
    or ``p`` is empty."""
    from ..kernels import cache

    if _plan.is_empty(p):  # NOTE: nothing runs: the timings would be noise stored for a real bucket
        log.info("rtpcompile autotune: nothing to tune for %s", _plan.shape_text(p))
        return None
    plans = candidates(p, configs=True)
    timings = benchmark(p, plans)
    _plan.counters["tunings"] += 1
    best = min(plans, key=lambda c: timings[c])
    if timings[best] == INF:
        log.warning("rtpcompile autotune: every candidate failed for %s", _plan.shape_text(p))
        return None
    value = {
        "form": best.form,
        "chunk_size": best.chunk_size,
        "config": dict(best.config),
        "time_ms": timings[best],
        "timings": {c.label: (None if t == INF else t) for c, t in timings.items()},
    }
    stored = cache.store(key, value)
    log.info(
        "rtpcompile autotune: %s wins for %s (%.3f ms; %s)",
        best.label, _plan.shape_text(p), timings[best], "stored" if stored else "not persisted",
    )  # fmt: skip
    return dataclasses.replace(best, source="tuned")
