"""Choose the lowering of one retention call from its real shapes (at run time, inside the op).

The rule (documented in docs/ops.md):
  * a state comes in and T <= RECURRENT_MAX_T, or T == 1         -> recurrent
  * T <= PARALLEL_MAX_T                                          -> parallel
  * otherwise                                                    -> chunkwise, chunk DEFAULT_CHUNK
Deciding here rather than in the compiled graph means no shape guards and no recompiles.
"""

from __future__ import annotations

import dataclasses

RECURRENT_MAX_T = 16
PARALLEL_MAX_T = 256
DEFAULT_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class Plan:
    form: str
    chunk_size: int
    source: str = "rule"  # "rule" | "forced" | "cache" | "tuned"


def choose(form: str, T: int, has_state: bool, chunk_size: int = 0, **_: object) -> Plan:
    """Resolve ``form`` ("auto" or a concrete form) and the chunk size for sequence length T."""
    chunk = chunk_size if chunk_size > 0 else DEFAULT_CHUNK
    if form != "auto":
        return Plan(form, chunk, "forced")
    if T == 1 or (has_state and T <= RECURRENT_MAX_T):
        return Plan("recurrent", chunk)
    if T <= PARALLEL_MAX_T:
        return Plan("parallel", chunk)
    return Plan("chunkwise", chunk)
