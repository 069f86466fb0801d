"""How much memory the mask proof may use (``RTP_PROOF_MAX_GB``); ``mask_eval.proof_bytes``
estimates what one evaluation needs."""

from __future__ import annotations

import math
import os


def proof_budget() -> int:
    """Bytes the proof may use: RTP_PROOF_MAX_GB, else half the RAM capped at 16 GiB."""
    env = os.environ.get("RTP_PROOF_MAX_GB")
    if env:
        try:
            gib = float(env)
        except ValueError:
            gib = math.nan
        if not (math.isfinite(gib) and gib > 0):
            raise ValueError(f"RTP_PROOF_MAX_GB must be a positive number of GiB, got {env!r}")
        return int(gib * 2**30)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # NOTE: not POSIX: assume 32 GiB
        ram = 32 * 2**30
    return min(16 * 2**30, ram // 2)
