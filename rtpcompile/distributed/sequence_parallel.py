"""Run a whole RTPHybridLM forward with the sequence sharded across ranks (context parallelism).

Rank r holds the r-th consecutive piece of every sequence. Token-wise layers (embedding, norms,
feed-forward, LM head) need nothing from other ranks. Mixers do:

* retention (MultiScaleRetention): :func:`context_parallel_retention` -- one all-gather of a
  [B, H, K, V] state per layer, independent of the sequence length;
* attention (CausalSelfAttention): every rank all-gathers the rotated keys and values of all
  ranks and attends to the earlier ranks' and its own -- per layer that moves
  ``2 * B * T_max * H * D * world`` numbers and each rank keeps up to the whole sequence's
  K/V, so attention layers keep their O(T) memory and O(T^2) compute (split across ranks).

Each mixer's ``forward`` is replaced on the instance by its context-parallel version for the
duration of one call; the modules stay in place (their hooks run), and the model's own forward
and its parameters are used unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import CausalSelfAttention
from ..nn.retention import MultiScaleRetention, overridden_core
from ..nn.rotary import rotate_qk
from .collectives import (
    all_gather_along,
    all_gather_ints,
    all_gather_lengths,
    depend_on,
    group_rank_and_size,
    rank_differences,
)
from .context_parallel import _DTYPES, _describe, context_parallel_retention


def shard_lengths(total: int, world_size: int) -> list[int]:
    """Split ``total`` positions into ``world_size`` consecutive pieces, the first ones longer."""
    if total < 0 or world_size < 1:
        raise ValueError(f"need total >= 0 and world_size >= 1, got {total}, {world_size}")
    base, extra = divmod(total, world_size)
    return [base + (r < extra) for r in range(world_size)]


def shard_sequence(x: Tensor, rank: int, lengths: list[int], dim: int = 1) -> Tensor:
    """This rank's piece of ``x`` along ``dim`` given every rank's length (sum = x.shape[dim])."""
    if sum(lengths) != x.shape[dim]:
        raise ValueError(
            f"shard lengths {lengths} sum to {sum(lengths)}, expected x.shape[{dim}] = "
            f"{x.shape[dim]}"
        )
    return x.narrow(dim, sum(lengths[:rank]), lengths[rank])


class _ShardInfo:
    def __init__(self, group: dist.ProcessGroup | None, lengths: list[int], rank: int) -> None:
        self.group, self.lengths, self.rank = group, lengths, rank
        self.offset = sum(lengths[:rank])


def _refuse_state(kind: str, hint: str, **given: object) -> None:
    """A sharded mixer runs without state: refuse the arguments that ask for one.

    NOTE: the sharded forward used to take ``**_`` and drop them: ``msr(x, return_state=True)``
    then returned a plain tensor, and ``y, state = ...`` split it along the batch, silently."""
    asked = [
        f"{name}={value!r}" if isinstance(value, bool) else f"a {name}"
        for name, value in given.items()
        if value is not None and value is not False
    ]
    if asked:
        raise ValueError(
            f"context_parallel_forward runs each {kind} on this rank's piece of the sequence "
            f"without state or cache; {' and '.join(asked)}: not supported there ({hint})"
        )


_ATTENTION_FIELDS = ("B", "H", "head_dim", "dtype", "needs_grad")


def _agree_attention(q: Tensor, v: Tensor, info: _ShardInfo) -> None:
    """Raise the same ValueError on every rank unless all ranks' attention calls agree.

    NOTE: a rank with another batch size (or heads, dtype, ...) would send keys of another size
    to the all-gather below, and gloo aborts the process (EnforceNotMet, SIGABRT); a rank that
    needs no gradient skips the backward all-reduce the others wait in. One all-gather of five
    int64s per attention layer, like the retention path's agreement check."""
    B, H, _, D = q.shape
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or v.requires_grad)
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    mine = [B, H, D, dtype, int(needs_grad)]
    gathered = all_gather_ints(mine, q.device, info.group)
    diffs = rank_differences(gathered, _ATTENTION_FIELDS, _describe)
    if diffs:
        raise ValueError(
            "context_parallel_forward: every rank must run the attention layers with the same "
            "batch size B, heads H, head dim, dtype and need gradients or not; " + "; ".join(diffs)
        )


class _CPRetention:
    """The sharded forward of one MultiScaleRetention, installed as the instance's ``forward``
    for the duration of a call (the module stays in place: its hooks still run). Its signature
    is MultiScaleRetention.forward's; a state is refused (``_refuse_state``)."""

    def __init__(self, inner: MultiScaleRetention, info: _ShardInfo) -> None:
        self.inner, self.info = inner, info

    # NOTE: eager even inside a compiled model. AOTAutograd orders a compiled graph's backward
    # collectives by its own partition, and ranks compile different graphs (rank 0 reads no
    # earlier keys): their all-reduces would pair up wrongly -- same sizes, no error, wrong
    # gradients. Eager, the autograd engine runs them in creation order on every rank.
    @torch.compiler.disable
    def __call__(
        self, x: Tensor, state: Tensor | None = None, offset: int = 0, return_state: bool = False
    ) -> Tensor:
        _refuse_state(
            "MultiScaleRetention",
            "a sequence sharded across ranks has no single state: call "
            "context_parallel_retention, whose end state is the state after this rank's piece",
            state=state,
            return_state=return_state,
        )
        msr = self.inner
        q, k, v = msr.project(x, self.info.offset + offset)
        gamma = msr.log_decay().exp()
        y, _ = context_parallel_retention(q, k, v, gamma, self.info.group, scale=msr.scale)
        return msr.output(y.to(x.dtype), x)


class _CPAttention:
    """The sharded forward of one CausalSelfAttention (see :class:`_CPRetention`); ``past`` and
    ``return_kv`` are refused."""

    def __init__(self, inner: CausalSelfAttention, info: _ShardInfo) -> None:
        self.inner, self.info = inner, info

    @torch.compiler.disable  # NOTE: see _CPRetention.__call__
    def __call__(
        self,
        x: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
        offset: int = 0,
        return_kv: bool = False,
    ) -> Tensor:
        _refuse_state(
            "CausalSelfAttention",
            "each call gathers the keys and values of the earlier ranks; none are cached",
            past=past,
            return_kv=return_kv,
        )
        att, info = self.inner, self.info
        B, T, _ = x.shape
        q, k, v = (
            proj(x).view(B, T, att.num_heads, att.head_dim).transpose(1, 2)
            for proj in (att.q_proj, att.k_proj, att.v_proj)
        )
        if att.rotary:
            q, k = rotate_qk(q, k, info.offset + offset, att.rope_base)
        _agree_attention(q, v, info)
        keys = all_gather_along(k, 2, info.lengths, info.group)
        values = all_gather_along(v, 2, info.lengths, info.group)
        k_all = torch.cat([*keys[: info.rank], k], dim=2)
        v_all = torch.cat([*values[: info.rank], v], dim=2)
        L = k_all.shape[2]
        q_pos = torch.arange(L - T, L, device=x.device)
        mask = torch.arange(L, device=x.device)[None, :] <= q_pos[:, None]
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        # NOTE: rank 0 reads no gathered keys; the edge keeps its gather's backward (an
        # all-reduce every rank must join) in the graph.
        y = depend_on(y, keys[-1], values[-1])
        y = y.transpose(1, 2).reshape(B, T, att.num_heads * att.head_dim)
        return att.out_proj(y) if att.out_proj is not None else y


_WRAPPERS = {MultiScaleRetention: _CPRetention, CausalSelfAttention: _CPAttention}


def _wrapper_for(name: str, child: nn.Module):
    """The context-parallel forward of a sequence mixer, None for a token-wise module; a mixer
    this module cannot shard is refused (it would see only this rank's piece: wrong, silently)."""
    for kind, wrapper in _WRAPPERS.items():
        if isinstance(child, kind):
            if kind is MultiScaleRetention:
                # NOTE: the sharded forward replaces the retention core too: a subclass's own
                # parallel form (a custom mask) would be sharded as the stock one, silently
                overrides = overridden_core(child)
            elif type(child).forward is not kind.forward or "forward" in vars(child):
                overrides = ["forward"]
            else:
                overrides = []
            if overrides:
                raise ValueError(
                    f"context_parallel_forward: {name} ({type(child).__name__}) overrides "
                    f"{kind.__name__}'s {', '.join(overrides)}; only the stock one can be sharded"
                )
            return wrapper
    if isinstance(child, nn.MultiheadAttention) or type(child).__name__.endswith(
        ("Attention", "Retention")
    ):
        raise ValueError(
            f"context_parallel_forward shards MultiScaleRetention and CausalSelfAttention "
            f"mixers only; {name} ({type(child).__name__}) mixes the sequence and would see "
            "only this rank's piece of it"
        )
    return None


@contextlib.contextmanager
def _sharded_mixers(model: nn.Module, info: _ShardInfo):
    """Replace each mixer's ``forward`` (on the instance) by its sharded version for the block.

    The modules stay in place, so their forward hooks and pre-hooks still run (on this rank's
    piece of the sequence), as they do in ``model(ids)``.
    """
    swapped = []
    inside: list[str] = []  # NOTE: names of the swapped mixers: their children are their own
    try:  # NOTE: a mixer refused halfway through must not leave the earlier ones swapped
        for name, child in list(model.named_modules()):
            if not name or any(name == w or name.startswith(w + ".") for w in inside):
                continue
            wrapper = _wrapper_for(name, child)
            if wrapper is not None:
                child.forward = wrapper(child, info)
                swapped.append(child)
                inside.append(name)
        yield
    finally:
        for child in swapped:
            del child.forward


def context_parallel_forward(
    model: nn.Module, input_ids: Tensor, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Logits for this rank's shard of the sequence, [B, T_r, vocab].

    ``model`` is an ``RTPHybridLM`` (or any model whose mixers are ``MultiScaleRetention`` /
    ``CausalSelfAttention`` and whose other layers act token by token), identical on every
    rank; ``input_ids`` [B, T_r] is this rank's consecutive piece (rank order = sequence order,
    lengths may differ and may be 0). Concatenating the ranks' logits gives ``model(ids)``.
    Every rank must call it, with the same batch size, and run backward when training. Not for
    cached decoding: a mixer called with a state or a cache (``state``, ``return_state``,
    ``past``, ``return_kv``) raises ValueError.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        # NOTE: before the lengths collective the other ranks wait in
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be this rank's [B, T_r] token ids, got {shape}")
    rank, _ = group_rank_and_size(group)
    lengths = all_gather_lengths(input_ids.shape[1], input_ids.device, group)
    with _sharded_mixers(model, _ShardInfo(group, lengths, rank)):
        return model(input_ids)
