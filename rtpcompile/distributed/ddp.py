"""Reading graphs that Dynamo's DDPOptimizer split: ``rtpcompile.detect.ddp_pieces``, named here
too (where docs/distributed.md points). The helpers live in detection, which uses them and must
not import this package (it imports the ops)."""

from __future__ import annotations

from ..detect.ddp_pieces import (
    BUCKET_CUT,
    bucket_cut_reason,
    foreign_inputs,
    is_ddp_piece,
    real_example_inputs,
)

__all__ = [
    "BUCKET_CUT",
    "bucket_cut_reason",
    "foreign_inputs",
    "is_ddp_piece",
    "real_example_inputs",
]
