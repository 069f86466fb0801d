"""Compile a generated kernel for an NVIDIA GPU without one: registers, spills, shared memory.

``resources(spec)`` runs Triton's full compiler (TTIR -> TTGIR -> LLVM -> PTX) for a target
capability (default 9.0, Hopper) on this machine, then the ``ptxas`` Triton ships with to read
what one program uses: registers per thread, bytes spilled to local memory, and the shared
memory Triton allocated. Nothing is launched, so this works on a CPU-only machine. It catches
what the interpreter cannot (code Triton's compiler rejects, register spills) and is how the
kernels' default blocks are checked against spills (``benchmarks/kernel_resources.py``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

from . import codegen
from .spec import KernelSpec

_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one program of a kernel uses on the target (per thread for registers)."""

    registers: int
    spill_bytes: int  # bytes stored to local memory because registers ran out
    shared_bytes: int


def signature(spec: KernelSpec, names: list[str]) -> dict[str, str]:
    """Triton's argument types for ``spec``'s kernel, as ``launch._launch`` passes them."""
    t_in, t_out, t_acc = (_TYPES[d] for d in (spec.in_dtype, spec.out_dtype, spec.acc))
    types = {name: "i32" for name in names}  # strides and sizes
    types.update({p: "*" + t_in for p in ("q", "k", "v", "h", "r", "do", "hq", "hk")})
    types.update({p: "*" + t_acc for p in ("g", "s0", "sf", "rs", "rd")})
    types.update({p: "*" + t_out for p in ("o", "dq", "dk")})
    types.update(scale="fp32", state_scale="fp32")
    return {name: types[name] for name in names}


def resources(spec: KernelSpec, capability: int = 90) -> Resources:
    """Compile ``spec`` for ``sm_<capability>`` and read its registers, spills, shared memory.

    Needs Triton's NVIDIA backend (bundled with the Linux wheels); raises RuntimeError with
    ptxas's output when its report cannot be read.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = codegen.load(spec).kernel
    source = ASTSource(fn=fn, signature=signature(spec, fn.arg_names), constexprs={})
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    arch = f"sm_{capability}" + ("a" if capability == 90 else "")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        run = subprocess.run(
            [get_ptxas(capability).path, f"-arch={arch}", "-v", ptx, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=False,
        )
    report = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores", report)
    if run.returncode or regs is None or spill is None:
        raise RuntimeError(f"ptxas report for {spec.short()} unreadable:\n{report}")
    return Resources(int(regs.group(1)), int(spill.group(1)), int(compiled.metadata.shared))
