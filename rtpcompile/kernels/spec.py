"""Kernel specs: every decision about a generated retention kernel, made in Python.

A ``KernelSpec`` is frozen and hashable. ``render(spec)`` fills one of the templates in
``templates/`` (chunkwise, parallel, recurrent, and the two stages of the split chunkwise pass)
with the spec's constants and flags; the templates hold Triton and named holes only.
``choose(...)`` picks block sizes and warps from the dims (``blocks.default_blocks``), so the
same call always renders the same source (and therefore the same module); an optional
``config`` (``CONFIG_KEYS``: BV, num_warps, num_stages, split -- what the autotuner searches)
overrides those defaults after ``check_config`` validated it.

A chunkwise pass runs either fused (one program per V block and head walks every chunk) or
split (``blocks.use_split``): a "states" kernel walks the chunks computing only the state
entering each one, then an "output" kernel computes every chunk's rows in parallel from those
states.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from . import arguments, inline_constants
from .blocks import (  # noqa: F401 - re-exported: the block rules' names predate blocks.py
    CONFIG_KEYS,
    FEW_PROGRAMS,
    FEW_PROGRAMS_MIN_CHUNKS,
    MAX_DIM,
    MAX_STAGES,
    MAX_WARPS,
    SPLIT_MIN_CHUNKS,
    WIDE_DTYPES,
    _block_problem,
    check_config,
    default_blocks,
    dqk_blocks,
    next_pow2,
    row_dot_blocks,
    stage_blocks,
    use_split,
)

FORMS = ("parallel", "chunkwise", "recurrent")
DIRECTIONS = ("fwd", "bwd")
TEMPLATE_VERSION = 1  # NOTE: bump when a template changes meaning without changing its text
# NOTE: the stages of a chunkwise pass; "fused" is the one-kernel pass (see the module doc)
# and "dqk", the backward's dq and dk from the states of two split passes (``launch.run_dqk``)
STAGES = ("fused", "states", "output", "dqk")
# NOTE: tl.dot's input precisions for float32 (Triton 3.9 on NVIDIA): "ieee" multiplies float32
# on the FMA units; "tf32" rounds the operands to TF32 (10-bit mantissa) for the tensor cores;
# "tf32x3" sums three TF32 products (close to float32). Triton's interpreter accepts all three
# and computes every one as a float32 numpy matmul.
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
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


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One generated kernel: a retention pass that reads (q, k, v) and writes o and/or a state.

    form:        "chunkwise" | "parallel" | "recurrent"
    direction:   "fwd" reads positions 0..T-1; "bwd" reads them time-reversed (the dk and dv
                 passes of the backward are retentions run backwards in time)
    K, V:        real head dims of the reader/key and of the value (V counts the extra column);
                 each in [1, MAX_DIM], V up to MAX_DIM + 1 with ``extra_value_column``
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
    row_dot:     also write the forward-mode d gamma terms sum_t <r_t, d o_t / d gamma> over
                 the program's rows, one partial sum per program (the backward's dq pass): the
                 scores weighted by n gamma^(n-1), and a carried derivative of the state (the
                 "states" stage stores it beside the states; "dqk": the dq side's terms)
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
            raise ValueError(
                f"KernelSpec.direction must be one of {list(DIRECTIONS)}, got {self.direction!r}"
            )
        for name in ("in_dtype", "out_dtype"):
            # NOTE: names, not torch dtypes or their str() ("torch.float32"): see dtype_name
            dtype = getattr(self, name)
            if dtype not in _DTYPE_NAMES.values():
                raise ValueError(
                    f"KernelSpec.{name} must be one of {list(_DTYPE_NAMES.values())}, got {dtype!r}"
                )
        # NOTE: only V may pass MAX_DIM, by its column of ones (``extra_value_column``)
        for name, limit in (("K", MAX_DIM), ("V", MAX_DIM + int(self.extra_value_column))):
            dim = getattr(self, name)
            if not 1 <= dim <= limit:
                note = " (with extra_value_column)" if limit > MAX_DIM else ""
                raise ValueError(f"KernelSpec.{name} must be in [1, {limit}]{note}, got {dim}")
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

    @property
    def scale_first(self) -> bool:
        """Whether the kernels multiply by ``scale`` before a tensor-core operand is cast to the
        input dtype rather than after the dot: float16 only. Its range ends at 65504, and the
        unscaled scores q.k (or do.v) and the carried state (with a final-state gradient, dsf /
        scale) overflow it where the output itself is small; scaled, they are the terms of the
        output. The state is held times scale in float32 (k^T v is added times scale after its
        dot, so the k rows are cast unscaled: k gamma^n scale would be subnormal in float16), in
        the recurrent form too, so a tiny scale never divides dsf. bfloat16, float32 and float64
        have float32's range or more: their kernels keep the cheaper order (one multiply of the
        output block after the dots; docs/kernels.md)."""
        return self.in_dtype == "float16"

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
    extra = bool(flags.get("extra_value_column"))
    if K > MAX_DIM or V > MAX_DIM + extra:
        # NOTE: V counts the column of ones, the one way a pass's V may be MAX_DIM + 1
        raise ValueError(
            f"retention kernels support K, V <= {MAX_DIM} (V <= {MAX_DIM + 1} with the extra "
            f"value column of ones), got K={K}, V={V}" + ("" if extra else " without one")
        )
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
    stage = flags.get("stage", "fused")
    blocks = default_blocks(form, K, V, chunk_size, split=stage != "fused", dtype=in_dtype)
    blocks = stage_blocks(blocks, stage, V)
    for name, value in check_config(config).items():
        # NOTE: split is decided per pass by launch (use_split), not a block; the dqk kernel's V
        # block is a loop step of its own (``dqk_blocks``), not the V block the tuner chose
        if name == "split" or (name == "BV" and stage == "dqk"):
            continue
        # NOTE: one config serves every pass of a call, and the backward's passes swap K and V;
        # a V block wider than this pass's V is clamped to the smallest block covering it.
        blocks[name] = min(value, max(16, next_pow2(V))) if name == "BV" else value
    if flags.get("row_dot"):
        # NOTE: after the config: a tuned config was measured on passes without d gamma's sum
        # (the planner's problem does not say whether gamma needs a gradient), so its warps or
        # V block must not undo what keeps the row-dot kernels from spilling
        blocks = row_dot_blocks(blocks, form, stage)
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
        scale_first=spec.scale_first,
        reverse=spec.direction == "bwd",
        V_in=spec.V - int(spec.extra_value_column),
        summary=spec.short(),
        version=TEMPLATE_VERSION,
        signature=arguments.signature(spec),
        dqk_scale=arguments.scalar(spec, "scale"),
    )
    return inline_constants.inline(template.render(**values))
