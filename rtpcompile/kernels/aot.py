"""Compile a generated kernel for an NVIDIA GPU without one: registers, spills, shared memory.

``resources(spec)`` runs Triton's full compiler (TTIR -> TTGIR -> LLVM -> PTX) for a target
capability (default 9.0, Hopper) on this machine, then the ``ptxas`` Triton ships with to read
what one program uses: registers per thread, bytes spilled to local memory, and the shared
memory Triton allocated (``capabilities()`` lists the targets this Triton's ptxas
accepts). Nothing is launched, so this works on a CPU-only machine. It catches
what the interpreter cannot (code Triton's compiler rejects, register spills) and is how the
kernels' default blocks are checked against spills (``benchmarks/kernel_resources.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import tempfile

from . import codegen
from .spec import KernelSpec

# NOTE: Triton 3.9's get_ptxas runs its legacy ptxas below 9.0 and ptxas-blackwell from 9.0
_LEGACY_MAX = 89
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
    types.update({p: "*" + t_in for p in ("q", "k", "v", "h", "hp", "r", "do", "hq", "hk", "hqp")})
    if spec.scale_first:  # float16 stores the states' derivatives in float32 (launch.chunk_states)
        types.update(hp="*fp32", hqp="*fp32")
    types.update({p: "*" + t_acc for p in ("g", "s0", "sf", "rs", "rd")})
    types.update({p: "*" + t_out for p in ("o", "dq", "dk")})
    types.update(scale="fp32", state_scale="fp32")
    return {name: types[name] for name in names}


def resources(spec: KernelSpec, capability: int = 90) -> Resources:
    """Compile ``spec`` for ``sm_<capability>`` and read its registers, spills, shared memory.

    ``capability`` is major * 10 + minor (90 for 9.0); one this Triton cannot compile for is a
    ValueError listing ``capabilities()``. Needs Triton's NVIDIA backend (bundled with the Linux
    wheels); raises RuntimeError with ptxas's output when its report cannot be read.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    check_capability(capability)
    fn = codegen.load(spec).kernel
    source = ASTSource(fn=fn, signature=signature(spec, fn.arg_names), constexprs={})
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [get_ptxas(capability).path, f"-arch={ptx_arch(ptx)}", "-v", path, "-o", os.devnull],
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


def ptx_arch(ptx: str) -> str:
    """The architecture a PTX module targets (its ``.target`` line), as ptxas's -arch takes it.

    Triton targets the architecture-specific variant from 9.0 on ("sm_90a", "sm_100a",
    "sm_120a"), which ptxas compiles only for that same name.
    """
    # NOTE: read, not rebuilt from the capability: the suffix rule is Triton's and changed before
    # ("sm_100" for a PTX of .target sm_100a is a ptxas fatal error)
    found = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, flags=re.MULTILINE)
    if found is None:
        raise RuntimeError("Triton's PTX has no .target line")
    return found.group(1)


def check_capability(capability: int) -> None:
    """ValueError unless ``resources`` can compile for ``capability`` with this Triton."""
    # NOTE: checked before compiling: for some (88, 130) Triton's LLVM aborts the whole process
    valid = capabilities()
    if type(capability) is not int or (valid and capability not in valid):
        # NOTE: an empty list (a ptxas whose --help this cannot read) checks the type only
        raise ValueError(
            f"capability must be a compute capability as major * 10 + minor (90 for 9.0) that "
            f"Triton's ptxas compiles for, one of {list(valid)}, got {capability!r}"
        )


@functools.lru_cache(maxsize=1)
def capabilities() -> tuple[int, ...]:
    """The capabilities ``resources`` accepts: those whose architecture (as Triton names it)
    the ptxas Triton picks for them accepts (Triton's wheel ships one below 9.0, one from 9.0)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    tools = {get_ptxas(c).path for c in (_LEGACY_MAX, _LEGACY_MAX + 1)}
    listed = {int(arch[3:].rstrip("af")) for tool in tools for arch in _ptxas_archs(tool)}
    return tuple(
        sorted(c for c in listed if sm_arch_from_capability(c) in _ptxas_archs(get_ptxas(c).path))
    )


@functools.lru_cache(maxsize=4)
def _ptxas_archs(path: str) -> frozenset[str]:
    """The real architectures (sm_*) ``ptxas --help`` lists for its --gpu-name option."""
    text = subprocess.run([path, "--help"], capture_output=True, text=True, check=False).stdout
    section = text.partition("--gpu-name")[2].partition("\n--")[0]
    return frozenset(re.findall(r"'(sm_\d+[af]?)'", section))
