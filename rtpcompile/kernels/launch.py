"""Launch one retention pass: pick its spec, allocate its outputs, read inputs with their strides.

A pass computes, for readers r (q), writers w (k) and values u (v), all [B, H, T, D] views:
    o_t = scale * sum_{s<=t} gamma^(t-s) (r_t . w_s) u_s + state_scale * gamma^(t+offset) r_t S0
in time order ("fwd") or time-reversed ("bwd"), and optionally the final state. The forward is
one pass; the backward is three (see ``backward.py``). Inside ``recording()`` nothing is
launched: each pass appends its ``KernelInfo`` and returns empty outputs (for explain()).
Every pass of a call takes the same optional ``config`` (``spec.check_config``: BV, num_warps,
num_stages, split), the block configuration the planner chose; None keeps ``spec.choose``'s
defaults. A chunkwise pass that writes rows runs fused or split (``spec.use_split``): split, it is
two launches sharing a buffer of the states entering each chunk, [B*H, chunks, K, V] in the
input dtype (the dtype the fused kernel casts its state to for the same tl.dot; in float16 the
states times scale, ``KernelSpec.scale_first``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from collections.abc import Mapping

import torch

from . import arguments, codegen
from . import grid as grids
from .spec import (
    KernelSpec,
    check_config,
    choose,
    default_blocks,
    dtype_name,
    float32_precision,
    use_split,
)

Tensor = torch.Tensor
log = logging.getLogger("rtpcompile")
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("rtp_kernels", default=None)


@contextlib.contextmanager
def recording():
    """Collect the kernels launched inside the block instead of launching them."""
    seen: list[codegen.KernelInfo] = []
    token = _RECORD.set(seen)
    try:
        yield seen
    finally:
        _RECORD.reset(token)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class Pass:
    """The tensors and flags of one pass (everything but the kernel's block sizes)."""

    form: str
    q: Tensor
    k: Tensor
    v: Tensor
    gamma: Tensor
    scale: float
    reverse: bool = False
    s0: Tensor | None = None
    state_offset: int = 1
    state_scale: float | None = None  # None: same as scale (the forward)
    store_o: bool = True
    state_out: bool = False
    out_dtype: torch.dtype | None = None
    # r: also return the pass's forward-mode d gamma terms, sum over rows of <r_t, d o_t / d gamma>,
    # as partial sums [B, NV, H, tiles] (``_outputs``)
    row_dot_with: Tensor | None = None
    row_scale: Tensor | None = None  # [B, H, T]
    extra_value_column: bool = False
    do: Tensor | None = None  # the dq/dk kernel only (stage "dqk"): the output gradient
    phase: str = "fwd"  # "bwd" for the backward's passes: the split rule differs (use_split)


Config = Mapping[str, int] | None


def _value_dim(p: Pass) -> int:
    """V of the pass's kernels: v's columns plus the column of ones when there is one."""
    return p.v.shape[-1] + int(p.extra_value_column)


def _spec(
    p: Pass,
    chunk_size: int,
    config: Config = None,
    stage: str = "fused",
    *,
    state_in: bool | None = None,
    state_offset: int | None = None,
    state_out: bool | None = None,
    store_o: bool | None = None,
    row_scale: bool | None = None,
    out_dtype: torch.dtype | None = None,
) -> KernelSpec:
    """The spec of ``p``'s kernel for ``stage``; a keyword given overrides what ``p`` says (a
    split stage's flags: cheaper than a ``dataclasses.replace`` of the pass per stage)."""
    flags = (
        ("state_in", p.s0 is not None if state_in is None else state_in),
        ("state_offset", p.state_offset if state_offset is None else state_offset),
        ("state_out", p.state_out if state_out is None else state_out),
        ("store_o", p.store_o if store_o is None else store_o),
        ("extra_value_column", p.extra_value_column),
        ("row_scale", p.row_scale is not None if row_scale is None else row_scale),
        ("row_dot", p.row_dot_with is not None),
        ("stage", stage),
        ("fp32_precision", _fp32_precision(p.q)),
    )
    return _choose(
        p.form,
        "bwd" if p.reverse else "fwd",
        p.q.shape[-1],
        _value_dim(p),
        p.q.dtype,
        out_dtype or p.out_dtype or p.q.dtype,
        chunk_size,
        tuple(sorted(check_config(config).items())),  # validated: plain ints, pairs accepted
        flags,
    )


def _fp32_precision(q: Tensor) -> str:
    # NOTE: CUDA (and meta, which kernels_for uses to describe CUDA launches) follow torch's
    # float32 matmul precision, read per call; the interpreter computes in float32 anyway
    # float32 only: other dtypes ignore it, so their passes skip the read
    if q.dtype != torch.float32 or q.device.type not in ("cuda", "meta"):
        return "ieee"
    return float32_precision()


@functools.lru_cache(maxsize=1024)
def _choose(form, direction, K, V, dtype, out_dtype, chunk_size, config, flags) -> KernelSpec:
    # NOTE: memoised: building and validating a KernelSpec costs ~15 us, paid by every pass of
    # every call otherwise (a decode step is one pass, a backward three or four). Everything
    # choose reads is in the key; the config was validated by check_config before the lookup
    # (so True is never taken for a cached 1), and exceptions are not cached.
    return choose(form, direction, K, V, dtype, out_dtype, chunk_size, dict(config), **dict(flags))


def _strides(t: Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def run(
    p: Pass, chunk_size: int = 64, config: Config = None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Launch pass ``p``; returns (o [B,H,T,V] | None, final state | None, the d gamma partial
    sums [B, NV, H, tiles] of a ``row_dot_with`` pass | None; summed over all but H: the pass's
    sum_t <r_t, d o_t / d gamma>).

    A parallel pass that must also produce the final state runs a state-only chunkwise pass.
    """
    if p.form == "parallel" and (p.state_out or not p.store_o):
        o = rd = None
        if p.store_o:
            o, _, rd = run(dataclasses.replace(p, state_out=False), chunk_size, config)
        state_only = dataclasses.replace(
            p, form="chunkwise", store_o=False, row_dot_with=None, row_scale=None
        )
        return o, run(state_only, chunk_size, config)[1], rd
    if p.store_o and runs_split(p, chunk_size, config):
        return run_split(p, chunk_size, config)
    B, H, T, K = p.q.shape
    spec = _spec(p, chunk_size, config)
    o, sf, rd = _outputs(p, spec)
    seen = _RECORD.get()
    if seen is not None:
        seen.append(codegen.info(spec))
    elif B * H * T > 0 or p.state_out:
        _launch(spec, p, (o, sf, rd), (B, H, T))
    return o, sf, rd


def runs_split(
    p: Pass, chunk_size: int, config: Config, extra_bytes: int = 0, quiet: bool = False
) -> bool:
    """Whether ``p``, written as rows, runs split: ``use_split``'s rule, and its chunk-state
    buffer (plus ``extra_bytes`` held beside it) fits (``split_fits``). ``quiet``: a question
    (the backward's four-kernel path), not the pass's decision, so a misfit is not logged."""
    B, H, T, K = p.q.shape
    V, dtype = _value_dim(p), dtype_name(p.q.dtype)
    if not use_split(p.form, T, K, chunk_size, config, V=V, BH=B * H, dtype=dtype, phase=p.phase):
        return False
    if split_fits(p, chunk_size, extra_bytes):
        return True
    if not quiet:
        log.info("rtpcompile kernels: chunk states of %s do not fit; running fused", p.q.shape)
    return False


def run_split(p: Pass, chunk_size: int, config: Config, keep_states: bool = False):
    """A chunkwise pass as two launches: the states entering each chunk, then every chunk's rows.
    With ``keep_states``, also returns the chunk-state buffers (for ``run_dqk``)."""
    h, sf = chunk_states(p, chunk_size, config)
    # NOTE: the output stage reads no s0 (only where a state sits, which matters when there is one)
    offset = p.state_offset if p.s0 is not None else 1
    rows = _spec(
        p, chunk_size, config, "output", state_out=False, state_in=False, state_offset=offset
    )
    o, _, rd = _outputs(p, rows, state=False)
    seen = _RECORD.get()
    if seen is not None:
        seen.append(codegen.info(rows))
    elif h is not None:
        _launch(rows, p, (o, None, rd), p.q.shape[:3], h)
    return (o, sf, rd, h) if keep_states else (o, sf, rd)


def chunk_states(
    p: Pass, chunk_size: int, config: Config
) -> tuple[tuple[Tensor, Tensor] | None, Tensor | None]:
    """The states stage of a split pass alone: ((the states entering each chunk, [B*H, chunks,
    K, V] in the input dtype, and their derivatives in gamma, the same but float32 for float16,
    for a ``row_dot_with`` pass, else the states again), or None when nothing runs; the final
    state if ``p.state_out``)."""
    # NOTE: each stage's spec carries only the flags its template reads, so the backward's
    # passes share modules: the states stage writes no rows (out_dtype is moot); its row_dot
    # flag stores the states' derivatives, which the output stage's row dots read
    # NOTE: out_dtype=q's dtype: the states stage writes no rows
    states = _spec(
        p, chunk_size, config, "states", store_o=False, row_scale=False, out_dtype=p.q.dtype
    )
    _, sf, _ = _outputs(p, states, rows=False)
    B, H, T, K = p.q.shape
    seen = _RECORD.get()
    if seen is not None:
        seen.append(codegen.info(states))
        return None, sf
    if B * H * T == 0:
        return None, sf
    h = torch.empty(B * H, -(-T // states.BT), K, states.V, dtype=p.q.dtype, device=p.q.device)
    # NOTE: float16 stores the derivatives in float32: they reach ~T times the states (a state
    # times scale fits float16 where its derivative need not); other dtypes keep their range
    hp_dtype = torch.float32 if states.scale_first else h.dtype
    hs = (h, torch.empty_like(h, dtype=hp_dtype) if states.row_dot else h)
    _launch(states, p, (None, sf, None), (B, H, T), hs)
    return hs, sf


def _outputs(
    p: Pass, spec: KernelSpec, rows: bool = True, state: bool = True
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Empty o [B,H,T,V], final state [B,H,K,V] and the d gamma partial sums [B, NV, H, tiles]
    (one per program: tiles is 1 for a program that walks every row, the row blocks otherwise),
    each only if asked (by ``p`` and the spec; ``rows``/``state`` False: not by this stage)."""
    B, H, T, K = p.q.shape
    V, acc, dev = spec.V, acc_dtype(p.q.dtype), p.q.device
    o = None
    if rows and p.store_o:
        o = torch.empty(B, H, T, V, dtype=p.out_dtype or p.q.dtype, device=dev)
    sf = torch.empty(B, H, K, V, dtype=acc, device=dev) if state and p.state_out else None
    rd = None
    if spec.row_dot:
        tiles = -(-T // spec.BT) if spec.form == "parallel" or spec.stage == "output" else 1
        # NOTE: at T = 0 no kernel may run to write them (nothing to launch), and d gamma is 0
        alloc = torch.zeros if T == 0 else torch.empty
        rd = alloc(B, -(-V // spec.BV), H, tiles, dtype=acc, device=dev)
    return o, sf, rd


# NOTE: a chunk-state buffer below this needs no check of the free memory (a driver call)
SPLIT_BUFFER_UNCHECKED = 1 << 30


def states_bytes(p: Pass, chunk_size: int) -> int:
    """The size of ``p``'s chunk-state buffers when it runs split (a ``row_dot_with`` pass's
    include the states' derivatives, float32 for float16: ``chunk_states``)."""
    B, H, T, K = p.q.shape
    V = _value_dim(p)
    dtype = dtype_name(p.q.dtype)
    BT = default_blocks("chunkwise", K, V, chunk_size, split=True, dtype=dtype)["BT"]  # no config
    size = p.q.element_size()
    if p.row_dot_with is not None:
        size += 4 if p.q.dtype == torch.float16 else p.q.element_size()
    return B * H * -(-T // BT) * K * V * size


def split_fits(p: Pass, chunk_size: int, extra_bytes: int = 0) -> bool:
    """Whether the split pass's chunk-state buffer (with ``extra_bytes`` held beside it) fits: on
    CUDA, over 1 GiB they must take at most half the free memory (else the pass runs fused,
    which needs no buffer)."""
    if p.q.device.type != "cuda":
        return True
    need = states_bytes(p, chunk_size) + extra_bytes
    # NOTE: no driver query while a CUDA graph is being captured (the allocation then comes from
    # the graph's pool, and an out-of-memory there names the buffer's size)
    if need <= SPLIT_BUFFER_UNCHECKED or torch.cuda.is_current_stream_capturing():
        return True
    return need <= torch.cuda.mem_get_info(p.q.device)[0] // 2


def _launch(
    spec: KernelSpec,
    p: Pass,
    outs: tuple[Tensor | None, ...],
    bht: tuple[int, int, int],
    h: tuple[Tensor, ...] = (),
) -> None:
    """Launch ``spec``'s kernel over ``p`` writing ``outs`` ((o, final state, d gamma partials);
    for "dqk" (dq, dk, partials)), with the chunk-state buffers ``h`` of a split stage."""
    with on_device(p.q.device):
        _launch_grid(spec, p, outs, bht, h)


def on_device(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the *current* CUDA device (and
    its current stream), not on the device of the tensors it is given, so an eager call on
    ``cuda:1`` while ``cuda:0`` is current would run on the wrong GPU. Inductor guards its own
    launches the same way; inside a compiled graph the device is already current (no switch)."""
    if device.type == "cuda" and device.index is not None:
        if device.index != torch.cuda.current_device():
            return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def _launch_grid(spec: KernelSpec, p: Pass, outs, bht, h) -> None:
    B, H, T = bht
    kernel = codegen.load(spec).kernel
    shape = grids.grid(spec, B, H, T)
    if all(n <= cap for n, cap in zip(shape, grids.GRID_LIMITS, strict=False)):
        _call(kernel, shape, spec, p, outs, h, B, H, T)
        return
    # NOTE: a decode batch of 4096 sequences x 32 heads is 131072 programs on the batch*head axis
    per = grids.batch_per_launch(spec, H, T)
    for b0 in range(0, B, per):
        rows = slice(b0, min(B, b0 + per))
        part = dataclasses.replace(
            p,
            **{
                name: None if getattr(p, name) is None else getattr(p, name)[rows]
                for name in ("q", "k", "v", "s0", "row_dot_with", "row_scale", "do")
            },
        )
        cut = tuple(None if x is None else x[rows] for x in outs)
        h_part = tuple(x[rows.start * H : rows.stop * H] for x in h)  # [B*H, ...]
        n = rows.stop - rows.start
        _call(kernel, grids.grid(spec, n, H, T), spec, part, cut, h_part, n, H, T)


# NOTE: a multiply and an add fused into one fma, as Inductor compiles its own kernels
# (``enable_fp_fusion = not emulate_precision_casts``). Said at every launch because Triton's own
# default changes: on in 3.9 (with a warning when unset), off from 3.10; the float16 order's
# instruction counts (docs/kernels.md) are with fusion.
FP_FUSION = True


def compile_options(spec: KernelSpec) -> dict:
    """The compile options ``_call`` launches ``spec``'s kernel with (aot compiles the same)."""
    return {
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "enable_fp_fusion": FP_FUSION,
    }


def _call(kernel, grid, spec: KernelSpec, p: Pass, outs, h, B: int, H: int, T: int) -> None:
    if spec.stage == "dqk":
        dq, dk, rd = outs
        kernel[grid](
            p.q, p.k, p.v, p.do, p.gamma, dq, dk, rd, *h,
            *p.q.stride(), *p.k.stride(), *p.v.stride(), *p.do.stride(),
            B, H, T, float(p.scale),
            num_warps=spec.num_warps, num_stages=spec.num_stages, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
        return
    o, sf, rd = outs
    # NOTE: every argument in arguments.ARGUMENTS order; the kernel declares (and Triton binds)
    # only those its spec reads (arguments.names). An absent tensor that a spec still reads
    # (o of a state-only pass) is passed as q, which the kernel never reads there.
    dummy = p.q
    r = p.row_dot_with
    scale = float(p.scale)
    state_scale = scale if p.state_scale is None else float(p.state_scale)
    full = (
        p.q,
        p.k,
        p.v,
        p.gamma,
        dummy if p.s0 is None else p.s0,
        dummy if o is None else o,
        dummy if sf is None else sf,
        dummy if p.row_scale is None else p.row_scale,
        dummy if r is None else r,
        dummy if rd is None else rd,
        *p.q.stride(),
        *p.k.stride(),
        *p.v.stride(),
        *_strides(p.s0, 4),
        *_strides(p.row_scale, 3),
        *_strides(r, 4),
        B,
        H,
        T,
        scale,
        state_scale,
    )
    kernel[grid](
        *arguments.picker(kernel)(full),
        *h,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        enable_fp_fusion=FP_FUSION,
    )


def run_dqk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    do: Tensor,
    gamma: Tensor,
    scale: float,
    hq: tuple[Tensor, Tensor] | None,
    hk: tuple[Tensor, Tensor] | None,
    reverse_offset: int,
    chunk_size: int,
    config: Config = None,
    dgamma: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """dq, dk and, with ``dgamma``, d gamma's partial sums [B, NK, H, chunks] (summed: sum_t
    <q_t, d dq_t / d gamma>) from one kernel (``chunk_dqk``): ``hq`` is the split dq pass's
    (do, v, k) ``chunk_states`` (with ``dgamma``, a ``row_dot_with`` pass's: the states and
    their derivatives), ``hk`` the ``chunk_states`` of the split reversed dv pass (k, q, do), all
    [B*H, chunks, ., .]; ``reverse_offset`` is the dv pass's state offset (0 with a final-state
    gradient). The caller runs both passes' states first."""
    B, H, T, K = q.shape
    flags = (
        ("state_offset", reverse_offset),
        ("row_dot", dgamma),
        ("stage", "dqk"),
        ("fp32_precision", _fp32_precision(q)),
    )
    cfg = tuple(sorted(check_config(config).items()))
    spec = _choose("chunkwise", "bwd", K, v.shape[-1], q.dtype, q.dtype, chunk_size, cfg, flags)
    acc, n_chunks = acc_dtype(q.dtype), -(-T // spec.BT)
    for name, h in (("hq", hq), ("hk", hk)):
        if h is not None and h[0].shape[1] != n_chunks:
            raise ValueError(
                f"run_dqk: {name} holds {h[0].shape[1]} chunk states, expected {n_chunks} "
                f"(chunks of {spec.BT} rows of T={T}: the passes must share q's dtype and chunk "
                "size)"
            )
    dq = torch.empty(B, H, T, K, dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    # NOTE: every (sequence, K block, head, chunk) has its program, so nothing is left unwritten
    rd = (
        torch.empty(B, -(-K // spec.BKC), H, n_chunks, dtype=acc, device=q.device)
        if dgamma
        else None
    )
    seen = _RECORD.get()
    if seen is not None:
        seen.append(codegen.info(spec))
        return dq, dk, rd
    if B * H * T == 0:
        return dq, dk, rd
    p = Pass("chunkwise", q, k, v, gamma, scale, do=do)
    _launch(spec, p, (dq, dk, q if rd is None else rd), (B, H, T), (hq[0], hk[0], hq[1]))
    return dq, dk, rd
