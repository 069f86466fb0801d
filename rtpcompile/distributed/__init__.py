"""Distributed retention: context parallelism (a sequence sharded across ranks) and helpers.

    from rtpcompile.distributed import context_parallel_retention, context_parallel_forward
    o, end_state = context_parallel_retention(q_shard, k_shard, v_shard, gamma, group=None)
    logits_shard = context_parallel_forward(model, ids_shard)

Data parallelism needs nothing from here: ``torch.compile(DDP(model), backend="rtp")`` and
FSDP2's ``fully_shard`` work as with any backend (see docs/distributed.md).
"""

from __future__ import annotations

from .collectives import all_gather_along, all_gather_lengths, all_gather_stacked, depend_on
from .context_parallel import context_parallel_retention
from .launch import run_local
from .sequence_parallel import context_parallel_forward, shard_lengths, shard_sequence

__all__ = [
    "all_gather_along",
    "all_gather_lengths",
    "all_gather_stacked",
    "context_parallel_forward",
    "context_parallel_retention",
    "depend_on",
    "run_local",
    "shard_lengths",
    "shard_sequence",
]
