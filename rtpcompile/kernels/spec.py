"""Kernel specs: every decision about a generated retention kernel, made in Python.

A ``KernelSpec`` is frozen and hashable. ``render(spec)`` fills one of the templates in
``templates/`` (chunkwise, parallel, recurrent, and the two stages of the split chunkwise pass)
with the spec's constants and flags; the templates hold Triton and named holes only.
``choose(...)`` picks block sizes and warps from the dims, so the same call always renders the
same source (and therefore the same module); an optional ``config`` (``CONFIG_KEYS``: BV,
num_warps, num_stages, split -- what the autotuner searches) overrides those defaults after
``check_config`` validated it.

A chunkwise pass runs either fused (one program per V block and head walks every chunk) or
split (``use_split``): a "states" kernel walks the chunks computing only the state entering each
one, then an "output" kernel computes every chunk's rows in parallel from those states.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

FORMS = ("parallel", "chunkwise", "recurrent")
DIRECTIONS = ("fwd", "bwd")
MAX_DIM = 256
TEMPLATE_VERSION = 1  # NOTE: bump when a template changes meaning without changing its text
# NOTE: K is never tiled by a config (BK always covers K; the split stages walk it in BKC
# blocks, fixed by default_blocks), and BT is the chunk size (chunkwise), 1
# (recurrent) or fixed by K (parallel), so a config only names the V block and launch settings.
CONFIG_KEYS = ("BV", "num_warps", "num_stages", "split")
# NOTE: the stages of a chunkwise pass; "fused" is the one-kernel pass (see the module doc)
STAGES = ("fused", "states", "output")
# NOTE: the split's default rule. The fused pass runs one program per (V block, head) through
# every chunk in sequence; beyond this many chunks (T > 8192 at the 64-row chunk: fused measured
# 1.38x FLA's split kernels at T = 4096 but 0.84x at 16384 on an H200), or at K = 256 where the
# fused program's tiles spill (0.23x), the split pass -- a sequential kernel doing a third of the
# work, then a parallel one -- is expected to win. Unmeasured for the split itself: autotuning
# compares both. Powers of two, so every T of one planner bucket gets the same answer.
SPLIT_MIN_CHUNKS = 128
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
# blocks at every K (benchmarks/results/static/kernel_resources_sm_90_2026-11-23.md).
WIDE_DTYPES = ("float32", "float64")
# NOTE: tl.dot's input precisions for float32 (Triton 3.9 on NVIDIA): "ieee" multiplies float32
# on the FMA units; "tf32" rounds the operands to TF32 (10-bit mantissa) for the tensor cores;
# "tf32x3" sums three TF32 products (close to float32). Triton's interpreter accepts all three
# and computes every one as a float32 numpy matmul.
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
MAX_WARPS = 32
MAX_STAGES = 8

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(
            f"retention kernels support dtypes {list(_DTYPE_NAMES.values())}, got {dtype}"
        )
    return _DTYPE_NAMES[dtype]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One generated kernel: a retention pass that reads (q, k, v) and writes o and/or a state.

    form:        "chunkwise" | "parallel" | "recurrent"
    direction:   "fwd" reads positions 0..T-1; "bwd" reads them time-reversed (the dk and dv
                 passes of the backward are retentions run backwards in time)
    K, V:        real head dims of the reader/key and of the value (V counts the extra column)
    BT, BK, BV:  block sizes; BK and BV are powers of two >= 16 that cover or tile K and V
    in_dtype:    dtype of q/k/v as loaded; accumulation is float32 (float64 for float64)
    out_dtype:   dtype of the stored output rows
    state_in:    an initial state [B, H, K, V] is read (any strides, float32/64)
    state_offset: the initial state sits at position -1 (1: the forward) or 0 (0: the backward's
                 direct term of the final-state gradient)
    state_out:   the final state is written (float32/64, contiguous)
    store_o:     the output rows are written (False: a state-only pass)
    extra_value_column: v gets one more column of ones (a normaliser carried through every form)
    row_scale:   each query row is multiplied by a per-position scale rs[b, h, t]
    row_dot:     also write per-row partial dots <o_t, r_t> per V block (for d log gamma)
    stage:       chunkwise only: "fused", or a stage of the split pass, "states" (write the
                 state entering every chunk) or "output" (every chunk's rows from those states)
    BKC:         split stages only: the K block they walk K in (the states kernel one block
                 per program, the output kernel all blocks in a loop); 0 for the fused stage
    fp32_precision: float32 inputs only: ``tl.dot``'s input_precision, "ieee" (float32
                 products) or "tf32" / "tf32x3" (tensor cores; see ``float32_precision``);
                 always "ieee" for other dtypes
    """

    form: str
    direction: str
    K: int
    V: int
    BT: int
    BK: int
    BV: int
    in_dtype: str
    out_dtype: str
    state_in: bool = False
    state_offset: int = 1
    state_out: bool = False
    store_o: bool = True
    extra_value_column: bool = False
    row_scale: bool = False
    row_dot: bool = False
    num_warps: int = 4
    num_stages: int = 2
    stage: str = "fused"
    BKC: int = 0
    fp32_precision: str = "ieee"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"KernelSpec.form must be one of {list(FORMS)}, got {self.form!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"KernelSpec.direction must be one of {list(DIRECTIONS)}")
        for name in ("K", "V"):
            dim = getattr(self, name)
            if not 1 <= dim <= MAX_DIM + 1:
                raise ValueError(f"KernelSpec.{name} must be in [1, {MAX_DIM}], got {dim}")
        for name in ("BT", "BK", "BV", "BKC"):
            b = getattr(self, name)
            if (b < 1 and name != "BKC") or b & (b - 1):
                raise ValueError(f"KernelSpec.{name} must be a power of two, got {b}")
        if self.BK < self.K:
            raise ValueError(f"KernelSpec.BK={self.BK} must cover K={self.K} (one K block)")
        if self.stage not in STAGES or (self.stage != "fused" and self.form != "chunkwise"):
            raise ValueError(
                f"KernelSpec.stage must be one of {list(STAGES)} (split stages are chunkwise "
                f"only), got {self.stage!r} for form {self.form!r}"
            )
        split = self.stage != "fused"
        if split != (self.BKC > 0) or (split and not (16 <= self.BKC <= self.BK)):
            raise ValueError(
                f"KernelSpec.BKC must be a power of two in [16, BK] for a split stage and 0 "
                f"otherwise, got {self.BKC} (stage {self.stage!r}, BK={self.BK})"
            )
        if self.fp32_precision not in FP32_PRECISIONS:
            raise ValueError(
                f"KernelSpec.fp32_precision must be one of {list(FP32_PRECISIONS)}, "
                f"got {self.fp32_precision!r}"
            )
        if self.fp32_precision != "ieee" and self.in_dtype != "float32":
            raise ValueError(
                f"KernelSpec.fp32_precision applies to float32 inputs only and must be 'ieee' "
                f"for {self.in_dtype}, got {self.fp32_precision!r}"
            )
        if self.state_offset not in (0, 1):
            raise ValueError(f"KernelSpec.state_offset must be 0 or 1, got {self.state_offset}")
        for name in ("num_warps", "num_stages"):
            problem = _block_problem(name, getattr(self, name))
            if problem:
                raise ValueError(f"KernelSpec.{name} {problem}")

    @property
    def acc(self) -> str:
        return "float64" if self.in_dtype == "float64" else "float32"

    @property
    def precision(self) -> str:
        """``tl.dot``'s input_precision: the field for float32, "ieee" for float64; 16-bit
        inputs ignore it ("tf32", Triton's default, keeps their sources unchanged)."""
        if self.in_dtype == "float32":
            return self.fp32_precision
        return "ieee" if self.in_dtype == "float64" else "tf32"

    def short(self) -> str:
        flags = [
            f
            for f, on in (
                ("s0", self.state_in),
                ("sT", self.state_out),
                ("o", self.store_o),
                ("ones", self.extra_value_column),
                ("rs", self.row_scale),
                ("rd", self.row_dot),
            )
            if on
        ]
        form = self.form if self.stage == "fused" else f"{self.form}.{self.stage}"
        bk = f"BK={self.BK}" + (f" BKC={self.BKC}" if self.BKC else "")
        # NOTE: only a non-default precision is named, so "ieee" specs keep their summaries
        dt = self.in_dtype + (f"[{self.fp32_precision}]" if self.fp32_precision != "ieee" else "")
        return (
            f"{form}/{self.direction} K={self.K} V={self.V} {dt}->{self.out_dtype}"
            f" BT={self.BT} {bk} BV={self.BV} w={self.num_warps} [{','.join(flags)}]"
            + (f" s0@{-self.state_offset}" if self.state_in else "")
        )


def _is_pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def check_config(config: Mapping[str, int] | Iterable[tuple[str, int]] | None) -> dict[str, int]:
    """``config`` as a plain dict after validation; a bad name or value is a ValueError.

    BV: a power of two in [16, MAX_DIM]; num_warps: a power of two in [1, MAX_WARPS];
    num_stages: an integer in [1, MAX_STAGES]; split: 0 (fused chunkwise passes) or 1 (split
    passes; absent: ``use_split``'s rule). Accepts a mapping or (name, value) pairs (the
    planner's ``Plan.config``); None or empty means "the defaults".
    """
    found = dict(config or ())
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
) -> bool:
    """Whether a chunkwise pass that writes output rows runs split (states, then output).

    The config's ``split`` decides when present. Otherwise, with more than one chunk, split when:
    K needs a 256-wide block (and the split's wider chunks are more than one); the pass has more
    than SPLIT_MIN_CHUNKS chunks; ``dtype`` (a name, e.g. "float32") is in WIDE_DTYPES; or, when
    V and BH = B*H are given, the fused kernel would run fewer than FEW_PROGRAMS programs over
    more than FEW_PROGRAMS_MIN_CHUNKS chunks. B*H counts by its planner bucket (next power of 2).
    """
    if form != "chunkwise" or T <= 0:
        return False
    cfg = check_config(config)
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
    if chunks > SPLIT_MIN_CHUNKS or dtype in WIDE_DTYPES:
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
        warps = 4
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


def choose(
    form: str,
    direction: str,
    K: int,
    V: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    chunk_size: int = 64,
    config: Mapping[str, int] | Iterable[tuple[str, int]] | None = None,
    *,
    fp32_precision: str | None = None,
    **flags: bool | int | str,
) -> KernelSpec:
    """Block sizes and warps for one pass. K and V are the dims of this pass (V incl. extras).

    ``config`` (see ``check_config``) overrides the defaults of ``default_blocks``.
    ``fp32_precision``: tl.dot's precision for float32 inputs (FP32_PRECISIONS); None reads
    torch's float32 matmul setting now (``float32_precision``; "ieee" under the interpreter).
    Other dtypes ignore it. ``dtype`` also selects the blocks (``default_blocks``).
    """
    if K > MAX_DIM or V > MAX_DIM + 1:
        raise ValueError(f"retention kernels support K, V <= {MAX_DIM}, got K={K}, V={V}")
    in_dtype = dtype_name(dtype)
    if fp32_precision is not None and fp32_precision not in FP32_PRECISIONS:
        raise ValueError(
            f"fp32_precision must be None (follow torch) or one of {list(FP32_PRECISIONS)}, "
            f"got {fp32_precision!r}"
        )
    if in_dtype != "float32":
        fp32_precision = "ieee"
    elif fp32_precision is None:
        fp32_precision = float32_precision()
    split = flags.get("stage", "fused") != "fused"
    blocks = default_blocks(form, K, V, chunk_size, split=split, dtype=in_dtype)
    for name, value in check_config(config).items():
        if name == "split":  # decided per pass by launch (use_split), not a block
            continue
        # NOTE: one config serves every pass of a call, and the backward's passes swap K and V;
        # a V block wider than this pass's V is clamped to the smallest block covering it.
        blocks[name] = min(value, max(16, next_pow2(V))) if name == "BV" else value
    return KernelSpec(
        form=form,
        direction=direction,
        K=K,
        V=V,
        in_dtype=in_dtype,
        out_dtype=dtype_name(out_dtype),
        fp32_precision=fp32_precision,
        **blocks,
        **flags,
    )


def float32_precision() -> str:
    """tl.dot's precision for float32 inputs that follows torch: "tf32" when float32 matmuls may
    use TF32 (``torch.set_float32_matmul_precision("high")`` or ``"medium"``, or
    ``torch.backends.cuda.matmul.allow_tf32 = True``), else "ieee" (the default, "highest").

    Read as Inductor reads it for its own matmul templates, so a compiled model's retention and
    its other matmuls round alike. "ieee" under the Triton interpreter (``TRITON_INTERPRET=1``),
    which computes every float32 dot in float32 whatever the source says.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "ieee"
    # NOTE: fp32_precision is "tf32" exactly when allow_tf32 is True, and it does not raise where
    # allow_tf32 and get_float32_matmul_precision() do (torch 2.13 raises when the legacy and the
    # new precision APIs were both used); "none" (never set) means the default, "ieee"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2

    loader = jinja2.FileSystemLoader(str(Path(__file__).with_name("templates")))
    return jinja2.Environment(
        loader=loader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )


@functools.lru_cache(maxsize=256)
def render(spec: KernelSpec) -> str:
    """The Triton source of ``spec``: the form's template with the spec's constants filled in."""
    name = spec.form if spec.stage == "fused" else f"chunk_{spec.stage}"
    template = _environment().get_template(f"{name}.jinja")
    values = dataclasses.asdict(spec)
    values.update(
        acc=spec.acc,
        precision=spec.precision,
        reverse=spec.direction == "bwd",
        V_in=spec.V - int(spec.extra_value_column),
        summary=spec.short(),
        version=TEMPLATE_VERSION,
    )
    return template.render(**values)
