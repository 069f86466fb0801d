"""Context-parallel retention: one sequence sharded along T across the ranks of a group.

Retention is a linear recurrence, ``S_t = gamma S_{t-1} + k_t^T v_t``, so a shard only needs
the state that enters it. Each rank r holding positions ``[start_r, start_r + L_r)``:

1. runs the chunkwise form on its shard from a zero state -> local output, local end state S_r;
2. exchanges ``(S_r, L_r * log gamma)`` with every rank in ONE all-gather
   (B*H*K*V + H numbers per rank);
3. combines them as an exclusive prefix scan::

       S_in(r) = gamma^(start_r) S_0 + sum_{r' < r} gamma^(L_{r'+1} + ... + L_{r-1}) S_{r'}

   (exponents are sums of the exchanged log decays, all <= 0: nothing computes gamma^(-n));
4. corrects its outputs, ``o_t += scale * gamma^(t+1) q_t S_in`` for local position t, and its
   end state, ``S_end = gamma^(L_r) S_in + S_r``.

The backward is exact: the all-gather's backward all-reduces the gradients of the gathered
states and log decays, so a key on rank 0 receives the gradient of every later rank's outputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import ops
from ..lowering import validate
from ..lowering.aten_impl import accumulation_dtype
from .collectives import all_gather_stacked, group_rank_and_size

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


def _check_inputs(q, k, v, gamma, initial_state) -> Tensor:
    validate.check_qkv(q, k, v)
    gamma = validate.check_gamma(gamma, q)
    validate.check_gamma_values(gamma)  # NOTE: before any collective, not in the op
    validate.check_state(initial_state, q, v)
    return gamma


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
        gamma: per-head decay [H] (or a float), identical on every rank; gets a gradient (each
            rank receives its own contribution: sum it across ranks like a replicated parameter,
            as DDP does).
        group: the process group (default: the world). B, H, K, V and dtypes must agree on all
            ranks.
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
    gamma = _check_inputs(q, k, v, gamma, initial_state)
    rank, _ = group_rank_and_size(group)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    acc = accumulation_dtype(q.dtype)
    B, H, T, K = q.shape
    V = v.shape[-1]

    o_local, s_local = ops.retention_chunkwise(q, k, v, gamma, chunk_size=chunk_size, scale=scale)
    log_gamma = torch.log(gamma.to(acc))
    packed = torch.cat([s_local.to(acc).reshape(-1), log_gamma * T])
    gathered = all_gather_stacked(packed, group)  # [W, B*H*K*V + H]
    states = gathered[:, : B * H * K * V].reshape(-1, B, H, K, V)
    weights, start = _incoming_weights(gathered[:, B * H * K * V :], rank)

    s_in = torch.einsum("rh,rbhkv->bhkv", weights, states)
    if initial_state is not None:
        s_in = s_in + start[:, None, None] * initial_state.to(acc)

    pos = torch.arange(1, T + 1, device=q.device, dtype=acc)
    to_here = torch.exp(log_gamma[:, None] * pos[None, :])  # [H, T]: gamma^(t+1)
    # [B, H, T, K] @ [B, H, K, V] -> [B, H, T, V]
    correction = ((q.to(acc) * to_here[..., None]) @ s_in) * scale
    o = (o_local.to(acc) + correction).to(q.dtype)
    end_state = torch.exp(log_gamma * T)[:, None, None] * s_in + s_local.to(acc)
    return o, end_state
