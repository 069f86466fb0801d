"""Differentiable collectives used by context parallelism (any backend: gloo, nccl, ...).

``all_gather_stacked`` stacks every rank's tensor along a new leading dim; its backward sums the
incoming gradients over all ranks (one all-reduce) and keeps this rank's slice, so a value that
another rank consumed still receives that rank's gradient. Every rank of the group must run the
backward (the all-reduce is a collective), which holds whenever each rank backpropagates a loss
that depends on its outputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) of this process inside ``group`` (the default group when None)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "context parallelism needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherStacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        rank, world = group_rank_and_size(group)
        ctx.rank = rank
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # NOTE: rank r's slice was read by every rank; the total gradient of the sum of all
        # ranks' losses with respect to it is the sum over ranks of their local gradients.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


def all_gather_stacked(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """[*shape] on each rank -> [world, *shape] on every rank, differentiable."""
    return _AllGatherStacked.apply(x, group)


def all_gather_ints(
    values: list[int], device, group: dist.ProcessGroup | None = None
) -> list[list[int]]:
    """Every rank's list of integers, in rank order (one all-gather of a small int64 tensor).

    The list must have the same length on every rank (that length sizes the collective).
    """
    _, world = group_rank_and_size(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [p.tolist() for p in parts]


def rank_differences(gathered: list[list[int]], fields, describe) -> list[str]:
    """ "rank r has f=..., rank 0 has f=..." for every field of ``all_gather_ints``' rows where
    a rank differs from rank 0 (``describe(field, value)`` names a value)."""
    return [
        f"rank {r} has {field}={describe(field, row[i])}, "
        f"rank 0 has {field}={describe(field, gathered[0][i])}"
        for r, row in enumerate(gathered)
        for i, field in enumerate(fields)
        if row[i] != gathered[0][i]
    ]


def all_gather_lengths(n: int, device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's integer ``n`` (e.g. its shard length), in rank order."""
    return [p[0] for p in all_gather_ints([n], device, group)]


def all_gather_along(
    x: Tensor, dim: int, lengths: list[int], group: dist.ProcessGroup | None = None
) -> list[Tensor]:
    """Gather tensors whose size along ``dim`` differs per rank (``lengths``), differentiably.

    Each rank pads its tensor to the longest length, one stacked all-gather runs, and the padding
    is cut off again. Returns one tensor per rank, in rank order.
    """
    longest = max(lengths)
    pad = longest - x.shape[dim]
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    stacked = all_gather_stacked(x, group)
    return [stacked[r].narrow(dim, 0, n) for r, n in enumerate(lengths)]


class _DependOn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, *others: Tensor) -> Tensor:
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in others]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        zeros = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes]
        return (grad, *zeros)


def depend_on(out: Tensor, *others: Tensor) -> Tensor:
    """``out`` unchanged, but with a (zero-gradient) autograd edge to each of ``others``.

    A rank that gathered a tensor but does not use it (rank 0 needs no earlier keys) must still
    run the gather's backward, or the other ranks wait forever in its all-reduce.
    """
    return _DependOn.apply(out, *others)
