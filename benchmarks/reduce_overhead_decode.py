"""Prefill then decode the default model under torch.compile(mode="reduce-overhead").

Usage (CUDA machine): python benchmarks/reduce_overhead_decode.py VARIANT
VARIANT: "inductor" (backend="inductor", cache used as is), "plain" (backend rtp, cache used as
is), "mark" (rtp, torch.compiler.cudagraph_mark_step_begin() before every call), "own" (rtp,
``cache.own_tensors()`` after every call). Prints "<variant> OK max err E skips N" (the steps'
last logits against one full forward; N = Inductor's cudagraph skips) or "<variant> FAILED ...".
Run each variant in its own process: CUDA graph trees keep state per process.
"""

from __future__ import annotations

import sys

import torch
from torch._dynamo.utils import counters

from rtpcompile.backend import rtp_backend
from rtpcompile.nn.model import default_model

VARIANTS = ("inductor", "plain", "mark", "own")


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "own"
    if variant not in VARIANTS:
        raise SystemExit(f"variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(0)
    model = default_model().to("cuda").eval()
    # NOTE: the backend object, not the name "rtp": works without the package's entry point
    backend = "inductor" if variant == "inductor" else rtp_backend
    compiled = torch.compile(model, backend=backend, mode="reduce-overhead")
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    counters.clear()
    try:
        with torch.no_grad():
            full = model(ids)
            cache = model.new_cache(1)
            steps = []
            for a, b in [(0, 290)] + [(t, t + 1) for t in range(290, 299)]:
                if variant == "mark":
                    torch.compiler.cudagraph_mark_step_begin()
                steps.append(compiled(ids[:, a:b], cache=cache)[:, -1].clone())
                if variant == "own":
                    cache.own_tensors()
        err = (torch.stack(steps, 1) - full[:, 289:299]).abs().max().item()
        skips = counters["inductor"].get("cudagraph_skips", 0)
        print(f"{variant} OK max err {err:.3g} skips {skips}")
    except Exception as exc:  # noqa: BLE001 - the outcome is the result
        print(f"{variant} FAILED {type(exc).__name__} {str(exc)[:300]}")


if __name__ == "__main__":
    main()
