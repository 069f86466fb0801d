"""Benchmark harness behind ``rtpcompile bench`` and ``rtpcompile demo``.

stats (interleaved timer, median and spread) -> variants / models (what is measured) ->
op_suite / model_suite (the sweeps) -> report / writers / plots (JSON, markdown, PNG).
memory + worker read peak memory (CUDA counters, or a subprocess' peak RSS on CPU);
optional probes the parts that may be missing (rtp backend, explain, fla, matplotlib).
See docs/benchmarks.md.
"""
