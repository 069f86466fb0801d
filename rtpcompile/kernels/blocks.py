"""Block sizes of the generated kernels: configs, their defaults, and the fused/split rule.

A kernel's tiles are BT (rows: the chunk for chunkwise, 1 for recurrent, fixed by K for
parallel), BK (always covers K), BV (a V block: one program per V block), BKC (the K block of a
split chunkwise stage) and the launch settings num_warps and num_stages. ``default_blocks`` picks
them per form, K, V, chunk size and dtype, from register and spill measurements
(benchmarks/results/static); a config (``CONFIG_KEYS``, what the autotuner searches) overrides
BV, the launch settings and ``use_split``'s choice after ``check_config`` validated it.
``spec.choose`` turns the result into a ``KernelSpec``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

MAX_DIM = 256
# NOTE: K is never tiled by a config (BK always covers K; the split stages walk it in BKC
# blocks, fixed by default_blocks), and BT is the chunk size (chunkwise), 1
# (recurrent) or fixed by K (parallel), so a config only names the V block and launch settings.
CONFIG_KEYS = ("BV", "num_warps", "num_stages", "split")
# NOTE: the split's default rule. The fused pass runs one program per (V block, head) through
# every chunk in sequence; the split pass runs a sequential kernel doing a third of the work,
# then a parallel one. Measured on an H200 (benchmarks/results/h200/kernels_NVIDIA_H200_2026-11-25,
# bfloat16, B*H = 64, K = V = 128, CUDA-graph GPU times, T = 2048 / 4096 / 16384): the forward
# runs fused faster at every length (0.107 / 0.207 / 0.802 ms against split's 0.118 / 0.229 /
# 0.896, the same ~10% at 32 and at 256 chunks), the backward split faster at every length
# (0.283 / 0.549 / 2.145 ms against fused's 0.315 / 0.615 / 2.410). So a forward pass counts no
# chunks, and a backward pass splits beyond this many (32 chunks was the shortest measured; a
# power of two, so every T of one planner bucket gets the same answer). At K = 256 the fused
# program is 5.6x (forward) and 7x (backward) slower than split (1.81 against 0.32 ms forward
# at T = 2048).
# Autotuning compares both.
SPLIT_MIN_CHUNKS = 16
# NOTE: and when the fused grid is too small to fill the GPU: the default model's layers (B*H = 8,
# V = 64: 8 programs on an H200's 132 SMs, walking 32 chunks at T = 2048) ran their compiled
# prefill 5.6x slower than Inductor there (benchmarks/results/h200). Split, the output kernel
# has a program per chunk. Also unmeasured; powers of two again.
FEW_PROGRAMS = 32
FEW_PROGRAMS_MIN_CHUNKS = 8
# NOTE: and always for float32/float64 inputs: compiled for sm_90, the fused kernel's 16-bit
# blocks spill 15-23 KB per thread in float32 (its float32 operands are twice the size); its
# float32 blocks (``_wide_blocks``) are spill-free up to K = 128 only with 16-row chunks and
# 16-32-wide V blocks, while the split stages' are spill-free with 32-row chunks and 64-wide V
# blocks at every K (benchmarks/results/static/kernel_resources_sm_90_2026-11-24.md).
WIDE_DTYPES = ("float32", "float64")
MAX_WARPS = 32
MAX_STAGES = 8


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def check_config(config: Mapping[str, int] | Iterable[tuple[str, int]] | None) -> dict[str, int]:
    """``config`` as a plain dict after validation; a bad name or value is a ValueError.

    BV: a power of two in [16, MAX_DIM]; num_warps: a power of two in [1, MAX_WARPS];
    num_stages: an integer in [1, MAX_STAGES]; split: 0 (fused chunkwise passes) or 1 (split
    passes; absent: ``use_split``'s rule). Accepts a mapping or (name, value) pairs (the
    planner's ``Plan.config``); None or empty means "the defaults".
    """
    if not config:
        return {}  # NOTE: the common call (the defaults), asked per pass and per stage
    found = dict(config)
    unknown = sorted(set(found) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"kernel config names must be among {list(CONFIG_KEYS)} (K is not tiled and BT is "
            f"the chunk size), got {unknown}"
        )
    for name, value in found.items():
        # NOTE: bool is an int subclass; True is not a block size
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"kernel config {name} must be an integer, got {type(value).__name__} {value!r}"
            )
        problem = _block_problem(name, value)
        if problem:
            raise ValueError(f"kernel config {name} {problem}")
    return found


def _block_problem(name: str, value: int) -> str | None:
    """Why ``value`` is not a valid ``name`` (one of CONFIG_KEYS), or None; one rule for both
    the planner's configs and KernelSpec."""
    if name == "BV" and not (_is_pow2(value) and 16 <= value <= MAX_DIM):
        return f"must be a power of two in [16, {MAX_DIM}], got {value}"
    if name == "num_warps" and not (_is_pow2(value) and value <= MAX_WARPS):
        return f"must be a power of two in [1, {MAX_WARPS}], got {value}"
    if name == "num_stages" and not 1 <= value <= MAX_STAGES:
        return f"must be in [1, {MAX_STAGES}], got {value}"
    if name == "split" and value not in (0, 1):
        return f"must be 0 (fused) or 1 (split), got {value}"
    return None


def use_split(
    form: str,
    T: int,
    K: int,
    chunk_size: int = 64,
    config: Mapping[str, int] | Iterable[tuple[str, int]] | None = None,
    *,
    V: int | None = None,
    BH: int | None = None,
    dtype: str | None = None,
    phase: str = "fwd",
) -> bool:
    """Whether a chunkwise pass that writes output rows runs split (states, then output).

    The config's ``split`` decides when present. Otherwise, with more than one chunk, split when:
    K needs a 256-wide block (and the split's wider chunks are more than one); ``phase`` is
    "bwd" (a backward pass) and the pass has more than SPLIT_MIN_CHUNKS chunks; ``dtype`` (a
    name, e.g. "float32") is in WIDE_DTYPES; or, when V and BH = B*H are given, the fused kernel
    would run fewer than FEW_PROGRAMS programs over more than FEW_PROGRAMS_MIN_CHUNKS chunks.
    B*H counts by its planner bucket (next power of 2).
    """
    if phase not in ("fwd", "bwd"):
        raise ValueError(f"phase must be 'fwd' or 'bwd', got {phase!r}")
    if not config:  # NOTE: the defaults' rule, asked per pass of every call: memoised
        return _default_rule(form, T, K, chunk_size, V, BH, dtype, phase)
    return _use_split(form, T, K, chunk_size, check_config(config), V, BH, dtype, phase)


@functools.lru_cache(maxsize=4096)
def _default_rule(form, T, K, chunk_size, V, BH, dtype, phase) -> bool:
    return _use_split(form, T, K, chunk_size, {}, V, BH, dtype, phase)


def _use_split(form, T, K, chunk_size, cfg, V, BH, dtype, phase) -> bool:
    if form != "chunkwise" or T <= 0:
        return False
    if "split" in cfg:
        return bool(cfg["split"])
    # NOTE: chunks count in the 16-bit blocks (64 rows) whatever the dtype: the thresholds are
    # the H200's bfloat16 measurements, and a float32 pass of <= 64 rows stays fused
    d = default_blocks(form, K, V or 1, chunk_size)
    chunks = -(-T // d["BT"])
    if chunks <= 1:
        return False
    if next_pow2(K) >= 256:  # counted in the split's own (64-row) chunks: one chunk stays fused
        return T > default_blocks(form, K, V or 1, chunk_size, split=True)["BT"]
    if (phase == "bwd" and chunks > SPLIT_MIN_CHUNKS) or dtype in WIDE_DTYPES:
        return True
    if V is None or BH is None:
        return False
    BV = min(cfg.get("BV", d["BV"]), max(16, next_pow2(V)))
    programs = -(-V // BV) * next_pow2(BH)
    return programs < FEW_PROGRAMS and chunks > FEW_PROGRAMS_MIN_CHUNKS


def default_blocks(
    form: str,
    K: int,
    V: int,
    chunk_size: int = 64,
    split: bool = False,
    *,
    dtype: str | None = None,
) -> dict[str, int]:
    """BT, BK, BV, num_warps and num_stages (and BKC, split) ``choose`` uses without a config.

    ``split``: the blocks of both stages of a split chunkwise pass (they must share BT).
    ``dtype``: the inputs' dtype name; float32 and float64 take smaller blocks
    (``_wide_blocks``); None or a 16-bit dtype: the 16-bit blocks.
    """
    BK = max(16, next_pow2(K))
    big = BK >= 256
    if dtype in WIDE_DTYPES and form != "recurrent":
        return _wide_blocks(form, BK, V, chunk_size, split)
    if form == "recurrent":
        # NOTE: a program keeps its [BK, BV] state slice in registers; in float64 a 64-wide slice
        # spills at K = 128 (456 bytes) and K = 256 (1,668), a 32-wide one does not (sm_90)
        narrow = big or (dtype == "float64" and BK >= 128)
        BT, BV = 1, min(max(16, next_pow2(V)), 32 if narrow else 64)
        # NOTE: at K = 256, 8 warps: at 4 the [256, 32] slice took 128 registers and spilled 8
        # bytes when T is not 1 (its loop not unrolled; bfloat16 and float32), at 8 it takes
        # 64-77 (float64 126) and spills nothing, with as many programs per SM at T = 1 (3, not
        # 4, in a T > 1 loop, but 24 resident warps, not 16; sm_90). Unmeasured on a GPU; K = 128
        # keeps the 4 warps its decode step was timed with
        warps = 8 if big else 4
    elif form == "parallel":
        BT = 32 if big else 64
        BV = min(max(16, next_pow2(V)), 64)
        warps = 8 if BK * BV >= 128 * 64 else 4
    else:
        # NOTE: the chunk size is a planner hint; tl.dot needs tiles of >= 16, and the result does
        # not depend on it, so it is rounded to a power of two in [16, 64] (32 for K = 256 when
        # fused, whose program also keeps the [256, BV] float32 state resident; the split
        # stages never hold both, so they keep 64-row tiles, the M that Hopper's wgmma wants).
        small = big and not split
        BT = min(max(16, next_pow2(chunk_size)), 32 if small else 64)
        BV = min(max(16, next_pow2(V)), 32 if small else 64)
        warps = 8 if BK * BV >= 128 * 64 else 4
        if split:
            # NOTE: the split stages walk K in 64-wide blocks, so their tiles do not grow with K
            # (a [64, 256] q and k and a [256, 64] state in shared memory would not fit
            # pre-Hopper GPUs in float32), and the states kernel gets a program per K block.
            # 8 warps once the output kernel's three [BT, BV]/[BT, BT] float32 accumulators
            # reach 64 x 64: at 4 they spill (ptxas on sm_90, benchmarks/kernel_resources.py).
            warps = 8 if BT * BV >= 64 * 64 else 4
            return {"BT": BT, "BK": BK, "BV": BV, "num_warps": warps, "num_stages": 2,
                    "BKC": min(BK, 64)}  # fmt: skip
    return {"BT": BT, "BK": BK, "BV": BV, "num_warps": warps, "num_stages": 2}


# NOTE: the split states kernel's grid (K blocks x V blocks x B*H: 256 programs at B*H = 64,
# K = V = 128) is the small one, and each program is a sequential chain through every chunk, so
# what matters is how many chains an SM holds at once. Its [BKC, BV] float32 state slice fits 4
# warps without spilling at any K (ptxas on sm_90: 229 registers at 64 x 64 in bfloat16, 140 in
# float32), which leaves room for two programs per SM; at 8 warps (142 registers) only one fits,
# and 256 chains take two waves of 132 SMs instead of one. Unmeasured on a GPU.
STATES_WARPS = 4


def stage_blocks(blocks: dict[str, int], stage: str, V: int) -> dict[str, int]:
    """A split stage's blocks from its pass's split blocks (``default_blocks(..., split=True)``):
    the states kernel runs STATES_WARPS warps, the dq/dk kernel its own (``dqk_blocks``)."""
    if stage == "states":
        return {**blocks, "num_warps": STATES_WARPS}
    if stage == "dqk":
        return dqk_blocks(blocks, V)
    return blocks


def dqk_blocks(blocks: dict[str, int], V: int) -> dict[str, int]:
    """The backward's dq/dk kernel (``chunk_dqk``) from its pass's split blocks: V is reduced
    over there, not written, so BV is the loop step (half of V's block, 16 to 64: a V read in one
    step spilled 16-36 bytes at K = 64 and 128 in bfloat16, two or more steps spill nothing,
    ptxas on sm_90), and three [BT, BT] / [BT, BKC] float32 accumulators take 8 warps (4 spilled
    792 bytes at 64 x 64, K = 128; float32's 32 x 32 tiles 48 / 264 / 260 bytes at K = 64 / 128 /
    256 with "ieee" dots, 0 at 8 warps)."""
    BV = max(16, min(64, next_pow2(V) // 2))
    return {**blocks, "BV": BV, "num_warps": max(blocks["num_warps"], 8)}


def row_dot_blocks(blocks: dict[str, int], form: str, stage: str) -> dict[str, int]:
    """The blocks of a chunkwise pass that also sums its forward-mode d gamma (``row_dot``: the
    backward's dq pass when gamma needs a gradient). It carries a second float32 tile, the state's
    derivative (fused, states) or the weighted scores' product (output, dqk), so its programs
    take 8 warps or more, the fused one a V block of at most 32 and the dq/dk kernel a V step of
    16; applied after a config (``spec.choose``), which was tuned without d gamma's sum.
    ptxas, sm_90, spill bytes per thread at the defaults without this -> with it, K = V in
    {64, 128}, bfloat16: states 624 -> 0, fused 876 and 652 -> 64 and 148 (the closed form's dq
    pass spilled 76 and 144), dqk 0 and 36 -> 0 (float32 784 at K = 128 -> 0), output 0 (float32
    52 and 36 -> 0). float16's derivative dots take float32 operands (``_dcast``): fused 216 and
    788, output 12 and 100, the others 0."""
    if form != "chunkwise":
        return blocks
    warps = max(blocks["num_warps"], 8)
    if stage == "dqk":
        return {**blocks, "BV": 16, "num_warps": warps}
    if stage == "fused":
        return {**blocks, "BV": min(blocks["BV"], 32), "num_warps": warps}
    return {**blocks, "num_warps": warps}


def _wide_blocks(form: str, BK: int, V: int, chunk_size: int, split: bool) -> dict[str, int]:
    """float32/float64 blocks: with 32-bit operands, the 16-bit tiles spill (ptxas, sm_90).

    Measured with "ieee" dots at K = V in {32, 64, 128, 256} and K != V, every BT, BV in
    {16, 32, 64}, 4 or 8 warps and BKC in {32, 64} (``benchmarks/kernel_resources.py --sweep``),
    spill bytes per thread of the 16-bit defaults -> these:
      parallel  BT=64 (32 at K=256), BV=64: 0-13,536 -> BT=32, BV=64, 8 warps: 0 at every K
      split     BT=64, BKC=64, 8 warps: states 0, output 92-908 -> BT=32, BKC=32, BV=64 and 4
                warps (8 at K <= 32: one K block, 4 spill 352-632 there): 0 and 0 at every K
                (BKC=64 or BT=64 spill 4-1,040 at some K; 8 warps at K=64 spill 4)
      fused     BT=64 (32), BV=64 (32): 10,620-22,680 -> BT=16, 8 warps, BV=32 at K <= 64 and 16
                above: 0 up to K=128, 596 at K=256 (BT=32 spills at K >= 64 whatever BV and warps)
    The fused kernel is left with small tiles because float32 passes that write rows split
    (``use_split``); it runs state-only passes and single chunks.
    """
    cover = max(16, next_pow2(V))
    if form == "parallel":
        return {"BT": 32, "BK": BK, "BV": min(cover, 64), "num_warps": 8, "num_stages": 2}
    if split:
        BT, warps = min(max(16, next_pow2(chunk_size)), 32), 8 if BK <= 32 else 4
        return {"BT": BT, "BK": BK, "BV": min(cover, 64), "num_warps": warps, "num_stages": 2,
                "BKC": min(BK, 32)}  # fmt: skip
    BV = min(cover, 32 if BK <= 64 else 16)
    return {"BT": 16, "BK": BK, "BV": BV, "num_warps": 8, "num_stages": 2}
