"""The planner's cost model: predicted seconds of one call of a candidate lowering.

On the aten path (CPU), per forward,

    time = FLOPs / machine.flops + bytes / machine.bandwidth + launches * machine.launch

with FLOPs, bytes of temporaries and op launches counted per form from aten_impl; its constants
were fitted on the 2-core CI machine (docs/autotune.md lists the measurements), and a "bwd"
estimate is three forwards. On the Triton backend it sums, over the kernels the call launches
(``_triton_kernels``: the grids, blocks and fused/split choice of kernels/launch.py, the
backward's three passes one by one, or its four split kernels),

    max(FLOPs / (dtype rate * min(programs, SMs) / 132), bytes / bandwidth)
        + chain steps * step latency + launch latency

from vendor peaks times assumed fractions, not fitted (``kernel_seconds``). Autotuning
(tune.py) replaces the model with measurements (docs/autotune.md#cost-model).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .plan import Plan, Problem

INF = math.inf


@dataclasses.dataclass(frozen=True)
class Machine:
    """Throughputs of one backend. ``memory``: bytes the T x T temporaries may occupy.

    The last four fields are the Triton model's only (docs/autotune.md#cost-model).
    """

    flops: float  # FLOP/s sustained by the matmuls (Triton: bf16/fp16 tensor-core tl.dot)
    bandwidth: float  # bytes/s through element-wise temporaries (Triton: HBM, whole GPU)
    fresh_bandwidth: float  # extra bytes/s cost of temporaries larger than ``cache``
    cache: float  # bytes: temporaries up to this size are recycled warm by the allocator
    launch: float  # seconds per op launch (aten) or per kernel launch (Triton)
    memory: float
    fma_flops: float = 0.0  # FLOP/s of float32 "ieee" dots and element-wise products
    fp64_flops: float = 0.0  # FLOP/s of float64 dots
    step: float = 0.0  # seconds per dependent step on one program's sequential chain
    sms: int = 0  # streaming multiprocessors when the device does not say (not CUDA)


# NOTE: the Triton constants are vendor peaks of an H100/H200 SXM times an ASSUMED sustained
# fraction; none is fitted to measurements (the one GPU table we have,
# benchmarks/results/h200, is only a sanity check: docs/autotune.md#cost-model).
# Dense bf16/fp16 tensor-core peak 989 TFLOP/s; Triton's 64-row tl.dot tiles (no warp
# specialisation, decay element-wise work between dots) are assumed to sustain 35%.
TENSOR_FLOPS = 989e12 * 0.35
# float32 dots at input_precision "ieee" (torch's default "highest"; spec.float32_precision):
# FMA units, 67 TFLOP/s peak; a tl.dot lowered to FMA loops with operand shuffles is assumed to
# sustain 25%. At "tf32" (after set_float32_matmul_precision("high")) they count as tensor-core
# dots at TENSOR_FLOPS (TF32 peaks at half the bf16 rate; the tile efficiency dominates).
FMA_FLOPS = 67e12 * 0.25
# float64: 34 TFLOP/s FP64 (non-tensor) peak, assumed 25% like float32.
FP64_FLOPS = 34e12 * 0.25
# HBM: 3.35 TB/s on an H100 SXM (4.8 on the H200), assumed 60% sustained by streaming tiles.
HBM_BANDWIDTH = 3.35e12 * 0.6
# One dependent step of a program's loop (wait for its tile, one tl.dot, the element-wise work
# around it): a guess of ~1000 cycles at ~1.8 GHz, the order of a DRAM round trip that the
# 2-stage pipeline only partly hides. The fused kernel's measured 3.6 us per 4-dot chunk step
# at 128 programs (bandwidth-bound) bounds it from above.
STEP_LATENCY = 0.5e-6
# CUDA's kernel launch latency (~3-5 us); Triton's Python launcher costs more on the CPU side,
# but that overlaps with queued GPU work in a model's forward.
KERNEL_LAUNCH = 5e-6
# H100 and H200 SXM both have 132 SMs; a CUDA device's own multi_processor_count wins.
DEFAULT_SMS = 132

# NOTE: aten numbers are fitted on the CI CPU (2 cores, AVX512, float32); Triton numbers are
# vendor figures (above). Autotuning replaces both with measurements.
MACHINES = {
    "aten": Machine(85e9, 9.4e9, 1.1e9, cache=2**21, launch=4.5e-6, memory=2**31),
    "triton": Machine(
        TENSOR_FLOPS,
        HBM_BANDWIDTH,
        INF,
        cache=INF,
        launch=KERNEL_LAUNCH,
        memory=2**34,
        fma_flops=FMA_FLOPS,
        fp64_flops=FP64_FLOPS,
        step=STEP_LATENCY,
        sms=DEFAULT_SMS,
    ),
}


def _aten_costs(p: Problem, plan: Plan) -> tuple[float, list[float], float]:
    """(FLOPs, bytes of each temporary tensor, op launches) of one aten forward."""
    n, T, K, V, H = p.B * p.H, p.T, p.K, p.V, p.H
    if plan.form == "parallel":
        # Q K^T and (.) V over the full T x T matrix; the decay matrix is built per head from
        # int64 position differences
        flops = 2.0 * n * T * T * (K + V)
        temps = [4.0 * n * T * T] * 2 + [4.0 * H * T * T] * 3 + [8.0 * T * T] * 2
        return flops, temps + [4.0 * n * T * V] * 3, 20
    if plan.form == "recurrent":
        return 6.0 * n * T * K * V, [4.0 * n * K * V] * (4 * T), 8 * T
    C = plan.chunk_size
    N = math.ceil(T / C)
    Tp = N * C
    flops = 2.0 * n * Tp * C * (K + V) + 4.0 * n * Tp * K * V
    # padded copies, intra-chunk scores and mask, per-chunk states, inter-chunk products
    temps = [4.0 * n * Tp * (2 * K + V)] + [4.0 * n * Tp * C] * 2 + [4.0 * n * Tp * V] * 4
    temps += [4.0 * n * Tp * K] * 2 + [4.0 * n * N * K * V] * 3 + [4.0 * n * K * V] * (2 * N)
    return flops, temps, 30 + 3 * N


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """One kernel launch of the Triton model: its grid's work and its longest sequential chain."""

    name: str  # "parallel", "fused", "state-only", "states", "output" or "recurrent"
    programs: int  # the launch grid's size (kernels/launch.py)
    flops: float  # FLOPs of the whole grid at the tiles' padded sizes
    bytes: float  # HBM traffic, each tensor read or written once (re-reads are left to L2)
    steps: int  # dependent steps of one program: tl.dot calls in sequence (recurrent: tokens)
    dots: bool = True  # the FLOPs are tl.dot (tensor cores in bf16/fp16), else element-wise


def _triton_passes(p: Problem) -> list[tuple[int, int, bool]]:
    """(K, V, writes the final state) of each pass of one call (kernels/backward.py): the
    forward is one pass (writing the state unless the call returns none); the backward's dq and
    dk passes swap K and V, its dv pass does not (and writes the state that the initial state's
    gradient needs)."""
    if p.phase == "fwd":
        return [(p.K, p.V, p.state_out)]
    return [(p.V, p.K, False), (p.V, p.K, False), (p.K, p.V, p.has_state)]


def _triton_kernels(p: Problem, plan: Plan) -> list[KernelCost]:
    """The kernels one call of ``plan`` launches, with the blocks and the fused/split choice
    that kernels/launch.py makes (``spec.default_blocks``, ``spec.use_split``, ``plan.config``;
    V as launch passes it, without an extra value column)."""
    from ..kernels.spec import use_split

    def split(K: int, V: int) -> bool:
        c, cfg, BH = plan.chunk_size, plan.config, p.B * p.H
        return use_split("chunkwise", p.T, K, c, cfg, V=V, BH=BH, dtype=p.dtype, phase=p.phase)

    passes = _triton_passes(p)
    if p.phase == "bwd" and plan.form == "chunkwise" and all(split(K, V) for K, V, _ in passes):
        # backward.py's split path: the dq pass's states, the whole dv pass, one dq/dk kernel
        return [_split_kernels(p, p.V, p.K, plan)[0], *_split_kernels(p, p.K, p.V, plan),
                _dqk_kernel(p, plan)]  # fmt: skip
    found: list[KernelCost] = []
    for K, V, state_out in passes:
        if plan.form == "recurrent":
            found.append(_recurrent_kernel(p, K, V, plan))
        elif plan.form == "parallel":
            found.append(_parallel_kernel(p, K, V, plan))
            if state_out:  # launch.run: the state comes from a state-only chunkwise pass
                found.append(_fused_kernel(p, K, V, plan, store_o=False))
        elif split(K, V):
            found += _split_kernels(p, K, V, plan)
        else:
            found.append(_fused_kernel(p, K, V, plan, store_o=True))
    return found


def _blocks(p: Problem, form: str, K: int, V: int, plan: Plan, split: bool = False) -> dict:
    """``spec.choose``'s blocks for one pass (BV from the config, clamped to V), with NV, the
    number of V blocks, and the element size of the inputs."""
    from ..kernels.spec import default_blocks, next_pow2

    d = default_blocks(form, K, V, plan.chunk_size, split, dtype=p.dtype)
    d["BV"] = min(dict(plan.config).get("BV", d["BV"]), max(16, next_pow2(V)))
    d["NV"] = -(-V // d["BV"])
    d["e"] = torch.finfo(getattr(torch, p.dtype)).bits // 8
    return d


def _fused_kernel(p: Problem, K: int, V: int, plan: Plan, store_o: bool) -> KernelCost:
    """NV x B*H programs; each program walks every chunk: per chunk four dots in sequence (scores,
    scores @ v, q @ state, the state update), or only the update in a state-only pass."""
    d = _blocks(p, "chunkwise", K, V, plan)
    BT, BK, BV, NV, e = d["BT"], d["BK"], d["BV"], d["NV"], d["e"]
    n, N = p.B * p.H, -(-p.T // BT)
    per_row = 2 * BK * BV + (2 * BT * (BK + BV) + 2 * BK * BV if store_o else 0)
    io = n * p.T * (K + V) * e * (2 if store_o else 1)  # k, v (and q, o)
    name = "fused" if store_o else "state-only"
    return KernelCost(name, NV * n, n * NV * N * BT * per_row, io, N * (4 if store_o else 1))


def _split_kernels(p: Problem, K: int, V: int, plan: Plan) -> list[KernelCost]:
    """NV x K blocks x B*H programs: the states kernel walks the chunks, one dot per chunk, writing
    the [B*H, chunks, K, V] buffer in the input dtype; NV x chunks x B*H: the output kernel
    reads it back, every chunk at once (two dots per K block, then scores @ v)."""
    d = _blocks(p, "chunkwise", K, V, plan, split=True)
    BT, BKC, BV, NV, e = d["BT"], d["BKC"], d["BV"], d["NV"], d["e"]
    n, N, NK = p.B * p.H, -(-p.T // BT), -(-K // BKC)
    rows, h = n * N * BT, n * N * K * V * e
    states = KernelCost("states", NK * NV * n, rows * NV * NK * 2 * BKC * BV,
                        n * p.T * (K + V) * e + h, N)  # fmt: skip
    per_row = NK * 2 * BKC * (BT + BV) + 2 * BT * BV
    output = KernelCost("output", NV * N * n, rows * NV * per_row,
                        n * p.T * 2 * (K + V) * e + h, 2 * NK + 1)  # fmt: skip
    return [states, output]


def _dqk_kernel(p: Problem, plan: Plan) -> KernelCost:
    """K blocks x chunks x B*H programs: over V in steps, the shared scores do v^T and both
    states' terms (three dots a step), then (ds * D) k and (ds * D)^T q; reads q, k and both
    chunk-state buffers once, v and do once per K block, and writes dq and dk."""
    from ..kernels.spec import dqk_blocks

    d = dqk_blocks(_blocks(p, "chunkwise", p.K, p.V, plan, split=True), p.V)
    BT, BKC, BV, e = d["BT"], d["BKC"], d["BV"], d["e"]
    n, N, NK = p.B * p.H, -(-p.T // BT), -(-p.K // BKC)
    per_program = 2 * BT * BT * p.V + 4 * BT * p.V * BKC + 4 * BT * BT * BKC
    io = n * p.T * (4 * p.K + 2 * p.V * NK) * e + 2 * n * N * p.K * p.V * e
    return KernelCost("dqk", NK * N * n, NK * N * n * per_program, io, -(-p.V // BV) + 2)


def _parallel_kernel(p: Problem, K: int, V: int, plan: Plan) -> KernelCost:
    """NV x query blocks x B*H programs; query block i walks key blocks 0..i, two dots each."""
    d = _blocks(p, "parallel", K, V, plan)
    BT, BK, BV, NV, e = d["BT"], d["BK"], d["BV"], d["NV"], d["e"]
    n, N = p.B * p.H, -(-p.T // BT)
    pairs = N * (N + 1) // 2  # causal (query block, key block) pairs
    flops = n * NV * pairs * 2 * BT * BT * (BK + BV)
    return KernelCost("parallel", NV * N * n, flops, n * p.T * 2 * (K + V) * e, 2 * N)


def _recurrent_kernel(p: Problem, K: int, V: int, plan: Plan) -> KernelCost:
    """NV x B*H programs; each program walks every token: broadcast products, no tl.dot."""
    d = _blocks(p, "recurrent", K, V, plan)
    n, NV = p.B * p.H, d["NV"]
    flops = n * NV * p.T * 4 * d["BK"] * d["BV"]  # the state update and q @ state
    io = n * p.T * 2 * (K + V) * d["e"]
    return KernelCost("recurrent", NV * n, flops, io, p.T, dots=False)


@functools.cache
def sm_count(device: str) -> int:
    """Streaming multiprocessors of ``device``: CUDA's count, else the Triton machine's."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(dev).multi_processor_count)
    return MACHINES["triton"].sms


def kernel_seconds(k: KernelCost, m: Machine, dtype: str, sms: int, tf32: bool = False) -> float:
    """max(compute, memory) + chain + launch, compute at the fraction of the GPU that the grid
    occupies: one program runs on one SM, so ``min(programs, SMs) / m.sms`` of ``m``'s rates
    (``m.sms``: the SMs those rates are for; a device with other SMs scales them). ``tf32``:
    float32 dots run on the tensor cores."""
    tensor = dtype in ("bfloat16", "float16") or (tf32 and dtype == "float32")
    if dtype == "float64":
        rate = m.fp64_flops
    else:
        rate = m.flops if k.dots and tensor else m.fma_flops
    busy = max(1, min(k.programs, sms)) / m.sms  # NOTE: an empty grid (T = 0) does nothing
    # NOTE: memory runs at the whole GPU's bandwidth even for a few programs: what one program
    # cannot stream is its loads' latency, which the chain term (a step per loaded tile) counts.
    work = max(k.flops / (rate * busy), k.bytes / m.bandwidth)
    return work + k.steps * m.step + m.launch


def _triton_seconds(p: Problem, plan: Plan, m: Machine) -> float:
    from ..kernels.spec import float32_precision

    sms = sm_count(p.device)
    # NOTE: read at planning time like launch reads it per call; a plan is memoised per bucket,
    # so changing the precision mid-process keeps the plans made before (only their speed)
    tf32 = p.dtype == "float32" and p.device.startswith("cuda") and float32_precision() == "tf32"
    return sum(kernel_seconds(k, m, p.dtype, sms, tf32) for k in _triton_kernels(p, plan))


def estimate(p: Problem, plan: Plan) -> float:
    """Predicted seconds of ``plan`` on ``p`` (inf when its temporaries exceed memory).

    Triton: the sum of ``kernel_seconds`` over the kernels the call launches (the backward's
    three passes counted one by one); aten: the fitted model, a backward being three forwards.
    """
    machine = MACHINES.get(p.backend, MACHINES["aten"])
    if p.backend == "triton":
        return _triton_seconds(p, plan, machine)
    flops, temps, launches = _aten_costs(p, plan)
    if plan.form == "parallel" and not parallel_fits(p):
        return INF
    big = sum(t for t in temps if t > machine.cache)
    seconds = (
        flops / machine.flops
        + sum(temps) / machine.bandwidth
        + big / machine.fresh_bandwidth
        + launches * machine.launch
    )
    return 3.0 * seconds if p.phase == "bwd" else seconds


def parallel_fits(p: Problem) -> bool:
    """Whether the aten parallel form's T x T temporaries fit the backend's memory budget
    (the Triton kernels hold no T x T temporaries)."""
    if p.backend == "triton":
        return True
    return _parallel_bytes(p) <= MACHINES.get(p.backend, MACHINES["aten"]).memory


def _parallel_bytes(p: Problem) -> float:
    """Peak bytes of the aten parallel form's T x T temporaries (scores, mask, decay), in the
    accumulation dtype: float32, float64 for float64 inputs (counted as float32 until
    2026-11-25: a float64 plan could take twice the budget)."""
    width = 8.0 if p.dtype == "float64" else 4.0
    return width * p.T * p.T * (3 * p.B * p.H + 2 * p.H)
