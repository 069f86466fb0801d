"""Host cost of one retention call: the public op against the same kernels launched directly.

Usage (CUDA machine): python benchmarks/host_overhead.py [--profile]
Times 100 eager calls after warm-up with ``time.perf_counter`` (host time: the loop returns
before the GPU finishes, so for host-bound calls this is the host's cost per call) and with a
final synchronize (wall), for the chunkwise op at B=4, H=16, T=2048, K=V=128, bfloat16, fixed
gamma, no state: forward+backward through autograd and forward alone under no_grad
(``ops.retention_chunkwise``; eagerly it skips the custom op's dispatch, and the "via custom
op" rows time the same calls through it, ``RTP_EAGER_BYPASS=0``), and
``kernels.triton_forward`` / ``triton_backward`` called directly. The "module constants" rows
repeat the op's and the kernels' forward+backward with kernels rendered as the templates read
them (``inline_constants.module_constants``: Triton then checks 11-18 constexpr globals per
launch). ``--profile`` adds a
cProfile of the op's calls (top 45 by self time). On a CPU machine the kernels need
``RTP_KERNELS=triton TRITON_INTERPRET=1`` and the times are the interpreter's; the CPU
counterpart is ``benchmarks/call_overhead.py`` (the Python path alone, launches mocked).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from contextlib import nullcontext

import torch

from rtpcompile import kernels, ops
from rtpcompile.kernels import inline_constants
from rtpcompile.lowering import eager

QKV = (True, True, True, False, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, H, D = (4, 2048, 16, 128) if dev == "cuda" else (1, 64, 2, 16)
    q, k, v = (
        torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    do = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    g, scale = ops.retention_init_decay(H).to(dev), D**-0.5

    def t(x):
        return x.transpose(1, 2)  # [B, T, H, D] storage as [B, H, T, D]

    def op_fwd_bwd():
        o, _ = ops.retention_chunkwise(
            t(q), t(k), t(v), g, 64, output_final_state=False, scale=scale
        )
        return torch.autograd.grad(o, (q, k, v), t(do))

    def op_fwd():
        with torch.no_grad():
            return ops.retention_chunkwise(
                t(q), t(k), t(v), g, 64, output_final_state=False, scale=scale
            )

    def kernels_fwd():
        return kernels.triton_forward(
            "chunkwise", t(q), t(k), t(v), g, scale, None, 64, None, state_out=False
        )

    def kernels_fwd_bwd():
        o, sf = kernels.triton_forward(
            "chunkwise", t(q), t(k), t(v), g, scale, None, 64, None, state_out=False
        )
        return kernels.triton_backward(
            "chunkwise", t(do), None, t(q), t(k), t(v), g, scale, None, sf, 64, None, needs=QKV
        )

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    print(f"device {dev}, torch {torch.__version__}, B={B} H={H} T={T} K=V={D}")
    # NOTE: "op" rows call the public op eagerly as users do, which skips the custom op's
    # dispatch (lowering/eager.py); "via custom op" rows are the same calls with it off
    # (name, call, skip the custom op's dispatch, kernels with module-level constants)
    cases = (
        ("op fwd+bwd", op_fwd_bwd, True, False),
        ("op fwd", op_fwd, True, False),
        ("op fwd+bwd via custom op", op_fwd_bwd, False, False),
        ("op fwd via custom op", op_fwd, False, False),
        ("kernels fwd+bwd", kernels_fwd_bwd, True, False),
        ("kernels fwd", kernels_fwd, True, False),
        ("op fwd+bwd, module constants", op_fwd_bwd, True, True),
        ("kernels fwd+bwd, module constants", kernels_fwd_bwd, True, True),
    )
    for name, fn, bypass, module in cases:
        constants = inline_constants.module_constants() if module else nullcontext()
        with eager.bypassing(bypass), constants:
            for _ in range(5):
                fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(100):
                fn()
            host = (time.perf_counter() - t0) / 100
            sync()
            wall = (time.perf_counter() - t0) / 100
        print(f"{name}: host {host * 1e6:.0f} us/call, wall {wall * 1e6:.0f} us/call")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            op_fwd_bwd()
        sync()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(45)
        print(out.getvalue())


if __name__ == "__main__":
    main()
