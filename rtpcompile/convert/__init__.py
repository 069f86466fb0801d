"""Retrofit existing models: attention -> retention, the hybrid cache, memory report, distillation.

handle = rtpcompile.retrofit(model, ratio=0.5, placement="front")
print(rtpcompile.memory_report(model, seq_len=8192, batch=1))
rtpcompile.distill(model, teacher, batches)
"""

from __future__ import annotations

from .distill import distill
from .find import AttentionSite, find_attention, select_layers
from .memory import MemoryReport, memory_report
from .retrofit import RetrofitHandle, retrofit

__all__ = [
    "AttentionSite",
    "MemoryReport",
    "RetrofitHandle",
    "distill",
    "find_attention",
    "memory_report",
    "retrofit",
    "select_layers",
]
