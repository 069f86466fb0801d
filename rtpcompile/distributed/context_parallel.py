"""Context-parallel retention: one sequence sharded along T across the ranks of a group.

Retention is a linear recurrence, ``S_t = gamma S_{t-1} + k_t^T v_t``, so a shard only needs
the state that enters it. Each rank r holding positions ``[start_r, start_r + L_r)``:

0. checks, with one all-gather of a few int64s, that every rank's call agrees (B, H, K, V,
   dtype, ...): a mismatch would otherwise abort or hang inside the state all-gather. Inside
   ``torch.compile`` the check is one opaque custom op (``rtp_distributed::agree``), so Dynamo
   never sees its host reads (``.tolist()``) and the call traces without a graph break;

1. computes its shard's end state from a zero state, ``S_r = sum_t gamma^(L_r-1-t) k_t^T v_t``
   (one product: k and v only, no output);
2. exchanges ``(S_r, L_r * log gamma)`` with every rank in ONE all-gather
   (B*H*K*V + H numbers per rank);
3. combines them as an exclusive prefix scan::

       S_in(r) = gamma^(start_r) S_0 + sum_{r' < r} gamma^(L_{r'+1} + ... + L_{r-1}) S_{r'}

   (exponents are sums of the exchanged log decays, all <= 0: nothing computes gamma^(-n));
4. runs the chunkwise form on its shard from ``S_in`` -> its output and end state
   ``gamma^(L_r) S_in + S_r``. (Until 2026-11-25 it ran the shard from a zero state first and
   added ``scale * gamma^(t+1) q_t S_in`` to the output afterwards: a float16/bfloat16 output
   was rounded twice, and lost everything where the two parts cancel. The product in step 1
   costs about what that correction did.)

The backward is exact: the all-gather's backward all-reduces the gradients of the gathered
states and log decays, so a key on rank 0 receives the gradient of every later rank's outputs.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import torch.distributed as dist

from .. import ops
from ..lowering import validate
from ..lowering.aten_impl import accumulation_dtype, clamped_log_gamma
from .collectives import (
    all_gather_ints,
    all_gather_stacked,
    group_rank_and_size,
    rank_differences,
)

Tensor = torch.Tensor


def _incoming_weights(log_decays: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Decay from each earlier rank's end, and from the sequence start, to this rank's start.

    ``log_decays`` [W, H] holds ``L_r * log gamma``. Returns ``(weights [W, H], start [H])``:
    ``weights[r']`` is ``gamma^(L_{r'+1} + ... + L_{rank-1})`` for ``r' < rank`` and exactly 0
    otherwise; ``start`` is ``gamma^(start_rank)`` for an initial state.
    """
    W = log_decays.shape[0]
    idx = torch.arange(W, device=log_decays.device)
    # between[r', j]: shard j lies strictly between shard r' and this rank's shard
    between = (idx[None, :] > idx[:, None]) & (idx[None, :] < rank)
    # NOTE: a masked sum per pair rather than differences of a cumulative sum, which would
    # cancel catastrophically once the total log decay of a long sequence is large.
    exponent = between.to(log_decays.dtype) @ log_decays  # [W, H], every entry <= 0
    earlier = (idx < rank).to(log_decays.dtype)[:, None]
    weights = torch.exp(exponent) * earlier
    start = torch.exp((earlier * log_decays).sum(0))
    return weights, start


def _check_inputs(q, k, v, gamma, initial_state, scale, chunk_size) -> tuple[Tensor, float]:
    validate.check_qkv(q, k, v)
    gamma = validate.check_gamma(gamma, q)
    # NOTE: before any collective, not in the op; skipped while tracing (``_agreed_op`` checks)
    validate.check_gamma_values(gamma)
    validate.check_state(initial_state, q, v)
    # NOTE: here, not only in the local op: a rank that raised there (after the agreement
    # check) left the others waiting in the state all-gather until the group's timeout
    validate.check_chunk_size(chunk_size)
    if isinstance(scale, Tensor) and torch.compiler.is_compiling():
        # NOTE: its value goes into the ranks' agreement check, which reads it on the host:
        # traced, float() of it failed inside Dynamo ("sympy expression is NaN")
        return gamma, _tensor_scale(scale, q.shape[-1])
    return gamma, validate.check_scale(scale, q.shape[-1])


@torch.compiler.disable(
    reason="rtpcompile: context_parallel_retention's scale is a tensor (its value is not known "
    "while tracing), so it is read eagerly at a graph break; pass a Python float to compile the "
    "call whole"
)
def _tensor_scale(scale: Tensor, K: int) -> float:
    """A tensor scale read on the host, outside the trace (one graph break; the trace goes on
    with the float)."""
    return validate.check_scale(scale, K)


# What must agree on every rank; "valid" is 0 on a rank whose inputs failed the local checks.
_FIELDS = ("valid", "B", "H", "K", "V", "dtype", "initial_state", "needs_grad", "scale")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _signature(q, k, v, gamma, initial_state) -> list[int]:
    """This rank's call as integers, one per entry of ``_FIELDS`` but the scale (its bits are
    added where the scale is a real float: ``_with_scale``)."""
    B, H, _, K = q.shape
    # NOTE: a rank whose gathered state needs no gradient skips the backward all-reduce that
    # the other ranks then wait in forever.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gamma))
    has_state = initial_state is not None
    # NOTE: ints, not bools: the custom op of a compiled call takes a SymInt[]
    flags = [int(has_state), int(needs_grad)]
    return [1, B, H, K, v.shape[-1], _DTYPES.index(q.dtype), *flags]


def _with_scale(signature: list[int], scale: float) -> list[int]:
    """The full signature: ``signature`` and the scale's bits (exact: 0.1 + 0.2 is not 0.3).

    NOTE: on a real float only: under dynamic shapes Dynamo traces the scale as a SymFloat,
    which has no bits (its polyfill of struct.pack recursed without end). A compiled call
    therefore hands the scale to ``_agreed_op`` (a ``float`` argument: the real value)."""
    return [*signature, struct.unpack("<q", struct.pack("<d", scale))[0]]


def _describe(field: str, value: int) -> str:
    """A gathered field's value as the user wrote it (also for the attention layers' check in
    sequence_parallel.py: -1 is a dtype outside ``_DTYPES``)."""
    if field == "dtype":
        return str(_DTYPES[value]) if value >= 0 else "another dtype"
    if field == "scale":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if field in ("initial_state", "needs_grad"):
        return str(bool(value))
    return str(value)


def _signal_device(q, group: dist.ProcessGroup | None) -> torch.device:
    if isinstance(q, Tensor):
        return q.device
    if dist.get_backend(group) == "nccl":  # NOTE: a rank whose q is not even a tensor
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_across_ranks(
    signature: list[int] | None, device, group: dist.ProcessGroup | None
) -> None:
    """Raise the same ValueError on every rank unless all ranks' calls agree.

    One all-gather of ``len(_FIELDS)`` int64s per call. Without it, a rank with another K (or
    dtype, ...) sends a state of another size, and gloo/NCCL abort the process or hang.
    """
    gathered = all_gather_ints(signature or [0] * len(_FIELDS), device, group)
    rejected = [r for r, sig in enumerate(gathered) if sig[0] == 0]
    if rejected:
        raise ValueError(
            f"context_parallel_retention: the inputs of rank(s) {rejected} failed validation "
            "(see the error raised on that rank); every rank stops before the state exchange"
        )
    diffs = rank_differences(gathered, _FIELDS, _describe)
    if diffs:
        raise ValueError(
            "context_parallel_retention: every rank must pass the same B, H, K, V, dtype, "
            "scale, initial_state (given or not) and need gradients or not; " + "; ".join(diffs)
        )


def _group_name(group: dist.ProcessGroup | None) -> str:
    # NOTE: how the functional collectives name a group (Dynamo reads it at trace time)
    return (group if group is not None else dist.group.WORLD).group_name


@torch.library.custom_op("rtp_distributed::agree", mutates_args=())
def _agreed_op(gamma: Tensor, signature: list[int], scale: float, group_name: str) -> Tensor:
    """``_agree_across_ranks`` as one opaque op for compiled code; returns a copy of gamma.

    NOTE: the check reads the gathered integers on the host (``.tolist()``): traced, that is a
    graph break per read (three per call). Opaque, Dynamo records one node, and the copy of
    gamma that every later op consumes orders it before the state all-gather. gamma's values
    are checked here (``validate.check_gamma_values`` does nothing while tracing), so a rank
    with a bad gamma raises its own error and the others a ValueError naming it.
    """
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    signature = _with_scale(list(signature), scale)
    in_range = gamma.numel() == 0 or bool(((gamma >= 0) & (gamma <= 1)).all())  # NaN: False
    if signature[0] and not in_range:
        signature[0] = 0
    try:
        _agree_across_ranks(signature, gamma.device, group)
    except ValueError:
        if not in_range:
            raise ValueError(validate.gamma_range_error(gamma.tolist())) from None
        raise
    return gamma.clone(memory_format=torch.contiguous_format)


@_agreed_op.register_fake
def _(gamma, signature, scale, group_name):
    return torch.empty_like(gamma, memory_format=torch.contiguous_format)


_agreed_op.register_autograd(lambda ctx, grad: (grad, None, None, None))


def _agree(
    gamma: Tensor | None,
    signature: list[int] | None,
    scale: float,
    device,
    group: dist.ProcessGroup | None,
) -> Tensor | None:
    """``_agree_across_ranks``, as the opaque ``_agreed_op`` while compiling; returns gamma
    (a copy while compiling). ``signature=None``: this rank failed its local checks."""
    if signature is None:
        signature, scale = [0] * (len(_FIELDS) - 1), 0.0
        if torch.compiler.is_compiling():
            gamma = torch.empty(0, device=device)
    if not torch.compiler.is_compiling():
        _agree_across_ranks(_with_scale(signature, scale), device, group)
        return gamma
    return _agreed_op(gamma, signature, scale, _group_name(group))


def context_parallel_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor | float,
    group: dist.ProcessGroup | None = None,
    *,
    scale: float | None = None,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Retention over a sequence whose time axis is sharded across the ranks of ``group``.

    Args:
        q, k: this rank's shard, [B, H, T_r, K]; rank r holds the r-th consecutive piece of the
            sequence (rank order = sequence order). ``T_r`` may differ per rank and may be 0.
        v: [B, H, T_r, V].
        gamma: per-head decay [H] (or a float; 0 allowed), identical on every rank; gets a
            gradient: each rank receives the part due to its own loss, and the full gradient is
            the sum over ranks (DDP all-reduces with a mean, so it leaves the sum / world size,
            as for every other parameter).
        group: the process group (default: the world). B, H, K, V, the dtype, the scale,
            whether an initial state is given and whether gradients are needed must agree on
            all ranks: one tiny all-gather checks it first, and on a mismatch (or when one
            rank's inputs fail validation) every rank raises ValueError.
        scale: score scale, default ``K ** -0.5``.
        chunk_size: chunk of the local chunkwise form (default: the planner's).
        initial_state: optional state [B, H, K, V] before the sequence's first token, identical
            on every rank (its gradient is per-rank like gamma's).

    Returns:
        ``(o, end_state)``: this rank's output shard [B, H, T_r, V] in q's dtype, and the state
        after this rank's last position (float32, float64 for float64 inputs). The last rank's
        end state is the final state of the whole sequence.

    Every rank must call this (one all-gather) and, when training, run backward on a loss that
    depends on its output (the backward runs one all-reduce).
    """
    try:
        gamma, scale = _check_inputs(q, k, v, gamma, initial_state, scale, chunk_size)
    except ValueError:
        if dist.is_available() and dist.is_initialized():
            # NOTE: still join the agreement check, so the other ranks raise instead of waiting;
            # this rank raises its own, more precise error.
            with contextlib.suppress(ValueError):
                _agree(None, None, 0.0, _signal_device(q, group), group)
        raise
    rank, _ = group_rank_and_size(group)
    signature = _signature(q, k, v, gamma, initial_state)
    gamma = _agree(gamma, signature, scale, q.device, group)
    acc = accumulation_dtype(q.dtype)
    B, H, T, K = q.shape
    V = v.shape[-1]

    # NOTE: autocast off, as inside the op: the state is float32 whatever the caller's autocast
    # (under a bfloat16 autocast the products below ran in bfloat16: state error 3e-2)
    with torch.autocast(q.device.type, enabled=False):
        log_gamma = clamped_log_gamma(gamma.to(acc))
        s_local = _end_state_saving_inputs(k, v, log_gamma, acc)
        packed = torch.cat([s_local.reshape(-1), log_gamma * T])
        gathered = all_gather_stacked(packed, group)  # [W, B*H*K*V + H]
        states = gathered[:, : B * H * K * V].reshape(-1, B, H, K, V)
        weights, start = _incoming_weights(gathered[:, B * H * K * V :], rank)
        # NOTE: the earlier ranks only: a later rank's weight is exactly 0, but 0 * inf is NaN,
        # and a non-finite value on a later rank reached every position (until 2026-11-25)
        s_in = torch.einsum("rh,rbhkv->bhkv", weights[:rank], states[:rank])
        if initial_state is not None:
            s_in = s_in + start[:, None, None] * initial_state.to(acc)
    if rank == 0 and initial_state is None and not s_in.requires_grad:
        # NOTE: nothing enters the first shard; when training, its (zero) state ties its output
        # to the all-gather, whose backward is a collective every rank must join
        s_in = None
    # NOTE: the shard runs once, from the state entering it: its output is rounded to q's dtype
    # once (a local output corrected afterwards was rounded twice: float16/bfloat16 outputs
    # off by up to their value where the two parts cancel, until 2026-11-25)
    return ops.retention_chunkwise(
        q, k, v, gamma, chunk_size=chunk_size, scale=scale, initial_state=s_in
    )


def _end_state_saving_inputs(k: Tensor, v: Tensor, log_gamma: Tensor, acc) -> Tensor:
    """``_local_end_state``, recomputed in the backward when training: it would save float32
    copies of k and v (a 16-bit shard's k, v saved twice more; the op saves its own)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, log_gamma))
    if not needs_grad:
        return _local_end_state(k, v, log_gamma, acc)
    return torch.utils.checkpoint.checkpoint(
        _local_end_state, k, v, log_gamma, acc, use_reentrant=False
    )


def _local_end_state(k: Tensor, v: Tensor, log_gamma: Tensor, acc: torch.dtype) -> Tensor:
    """This shard's end state from a zero state, ``sum_t gamma^(T-1-t) k_t^T v_t`` [B, H, K, V]
    in ``acc``: one product (exponents <= 0; a state the op would compute too, but without
    the output the shard computes once the entering state is known)."""
    T = k.shape[2]
    to_end = torch.arange(T - 1, -1, -1, device=k.device, dtype=acc)
    weights = torch.exp(log_gamma[:, None] * to_end[None, :])  # [H, T]
    return (k.to(acc) * weights[..., None]).transpose(-1, -2) @ v.to(acc)
