"""Compile a generated kernel for an NVIDIA GPU without one: registers, spills, shared memory.

``resources(spec)`` runs Triton's full compiler (TTIR -> TTGIR -> LLVM -> PTX) for a target
capability (default 9.0, Hopper) on this machine, then the ``ptxas`` Triton ships with to read
what one program uses: registers per thread, bytes spilled to local memory, and the shared
memory Triton allocated (``capabilities()`` lists the targets this Triton's ptxas
accepts). Nothing is launched, so this works on a CPU-only machine. It catches
what the interpreter cannot (code Triton's compiler rejects, register spills) and is how the
kernels' default blocks are checked against spills (``benchmarks/kernel_resources.py``).

The kernel is specialised as a launch specialises it: Triton's launcher types each argument of
the call (an int equal to 1 becomes a constant, ints divisible by 16 and 16-byte aligned pointers
are marked so), and the compiled code depends on it (a constant unit stride lets a tile load as
vectors). ``resources`` takes the arguments ``launch`` passes for a representative call
(``launch_arguments``: contiguous [B, H, T, D] tensors of a training shape, ``SHAPE``) and runs
them through Triton's own binder. ``layout=None`` compiles the unspecialised kernel (every int
a plain i32, no alignment), which is what this module measured before 2026-11-25.
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


# (B, H, T) of the representative call: a training shape, whose strides and T are multiples of 16
SHAPE = (2, 8, 2048)
# [B, H, T, D] tensors as launch reads them: contiguous, or views of [B, T, H, D] (heads last
# but one, as a model's projections lay them out before a transpose)
LAYOUTS = ("bhtd", "bthd")


def signature(spec: KernelSpec, names: list[str]) -> dict[str, str]:
    """Triton's argument types for ``spec``'s kernel, unspecialised: every stride and size a
    plain i32 (``resources(..., layout=None)``; a launch specialises them)."""
    t_in, t_out, t_acc = (_TYPES[d] for d in (spec.in_dtype, spec.out_dtype, spec.acc))
    types = {name: "i32" for name in names}  # strides and sizes
    types.update({p: "*" + t_in for p in ("q", "k", "v", "h", "hp", "r", "do", "hq", "hk", "hqp")})
    if spec.scale_first:  # float16 stores the states' derivatives in float32 (launch.chunk_states)
        types.update(hp="*fp32", hqp="*fp32")
    types.update({p: "*" + t_acc for p in ("g", "s0", "sf", "rs", "rd")})
    types.update({p: "*" + t_out for p in ("o", "dq", "dk")})
    types.update(scale=_TYPES[spec.acc], state_scale=_TYPES[spec.acc])  # arguments.scalar
    return {name: types[name] for name in names}


def launch_arguments(
    spec: KernelSpec, shape: tuple[int, int, int] = SHAPE, layout: str = "bhtd"
) -> tuple:
    """The positional arguments ``launch`` passes to ``spec``'s kernel for a call of ``shape``
    (B, H, T), on meta tensors (address 0: aligned, as CUDA's allocations are).

    q, k, v, row dots and the dq/dk kernel's do are ``layout``; the state [B, H, K, V] and the
    row scales are contiguous (the backward's dq pass reads its state transposed: another unit
    stride), absent tensors as launch passes them (q again, zero strides); ``launch._call``
    builds the list, so its order and strides are the launcher's own.
    """
    import torch

    from . import launch

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} (or None in resources), got {layout!r}")
    B, H, T = shape
    t_in, t_out, acc = (getattr(torch, d) for d in (spec.in_dtype, spec.out_dtype, spec.acc))
    K, V = spec.K, spec.V
    V0 = V - int(spec.extra_value_column)  # v's columns; the kernel adds the ones column

    def rows(D: int, dtype=t_in):
        if layout == "bthd":
            return torch.empty(B, T, H, D, dtype=dtype, device="meta").transpose(1, 2)
        return torch.empty(B, H, T, D, dtype=dtype, device="meta")

    def empty(*size: int, dtype=acc):
        return torch.empty(*size, dtype=dtype, device="meta")

    p = launch.Pass(
        spec.form,
        rows(K),
        rows(K),
        rows(V0),
        empty(H),
        K**-0.5,
        s0=empty(B, H, K, V) if spec.state_in else None,
        state_offset=spec.state_offset,
        row_scale=empty(B, H, T) if spec.row_scale else None,
        row_dot_with=rows(V0) if spec.row_dot and spec.stage != "dqk" else None,
        do=rows(V0) if spec.stage == "dqk" else None,
    )
    chunks = -(-T // spec.BT)
    h = empty(B * H, chunks, K, V, dtype=t_in)
    # the states' derivatives, written by a row_dot states stage (float32 for float16)
    hp = empty(B * H, chunks, K, V, dtype=torch.float32 if spec.scale_first else t_in)
    hp = hp if spec.row_dot else h
    rd = empty(B, 1, H, chunks) if spec.row_dot else None
    if spec.stage == "dqk":
        d = empty(B, H, T, K, dtype=t_out)
        outs, states = (d, d, p.q if rd is None else rd), (h, h, hp)
    else:
        o = empty(B, H, T, V, dtype=t_out) if spec.store_o else None
        # NOTE: a states stage gets no d gamma partials (launch.chunk_states): its rd flag
        # stores the states' derivatives in hp
        outs = (
            o,
            empty(B, H, K, V) if spec.state_out else None,
            None if spec.stage == "states" else rd,
        )
        states = (h, hp) if spec.stage in ("states", "output") else ()
    captured = []

    class _Kernel:  # records the call instead of launching
        arg_names = codegen.load(spec).kernel.arg_names

        def __getitem__(self, grid):
            return lambda *args, **kwargs: captured.append(args)

    launch._call(_Kernel(), None, spec, p, outs, states, B, H, T)
    return captured[0]


def specialization(
    spec: KernelSpec,
    capability: int = 90,
    shape: tuple[int, int, int] = SHAPE,
    layout: str | None = "bhtd",
) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) that Triton's launcher derives from
    ``launch_arguments(spec, shape, layout)`` for ``sm_<capability>``; ``layout=None``: the
    unspecialised ``signature`` and no constants or attributes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from . import launch

    fn = codegen.load(spec).kernel
    kwargs = launch.compile_options(spec)
    if layout is None:
        return signature(spec, fn.arg_names), {}, {}, kwargs
    backend = make_backend(GPUTarget("cuda", capability, 32))
    # NOTE: JITFunction.run's own steps (its binder needs a GPU driver for the target): bind and
    # specialise the arguments, then turn the specialisation into the compiler's inputs
    bind = create_function_from_signature(fn.signature, fn.params, backend)
    bound, found, options = bind(*launch_arguments(spec, shape, layout), **kwargs)
    options, types, constexprs, attrs = fn._pack_args(backend, kwargs, bound, found, options)
    return types, constexprs, attrs, options.__dict__


def resources(
    spec: KernelSpec,
    capability: int = 90,
    shape: tuple[int, int, int] = SHAPE,
    layout: str | None = "bhtd",
) -> Resources:
    """Compile ``spec`` for ``sm_<capability>`` and read its registers, spills, shared memory.

    The kernel is specialised for the arguments a launch of ``shape`` (B, H, T) passes, q, k, v
    in ``layout`` (``launch_arguments``); ``layout=None`` compiles it unspecialised.
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
    types, constexprs, attrs, options = specialization(spec, capability, shape, layout)
    source = ASTSource(fn=fn, signature=types, constexprs=constexprs, attrs=attrs)
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


# Per-SM limits (CUDA C programming guide, "compute capabilities"): 32-bit registers, resident
# warps, resident blocks, shared memory bytes; registers are allocated per warp in units of 256,
# and the driver reserves SHARED_RESERVED bytes of shared memory per block (8.x and 9.x)
SM_LIMITS = {
    80: (65536, 64, 32, 167936),
    86: (65536, 48, 16, 102400),
    89: (65536, 48, 24, 102400),
    90: (65536, 64, 32, 233472),
}
SHARED_RESERVED = 1024


def blocks_per_sm(res: Resources, num_warps: int, capability: int = 90) -> int:
    """Programs of a kernel using ``res`` with ``num_warps`` that one SM holds at once: the
    smallest of what its registers, warps, block slots and shared memory allow (the occupancy
    calculator's rule; a static figure, no launch)."""
    if capability not in SM_LIMITS:
        raise ValueError(f"capability must be one of {sorted(SM_LIMITS)}, got {capability!r}")
    registers, warps, blocks, shared = SM_LIMITS[capability]
    per_warp = -(-max(res.registers, 1) * 32 // 256) * 256
    fits = [
        registers // (per_warp * num_warps),
        warps // num_warps,
        blocks,
        shared // (res.shared_bytes + SHARED_RESERVED),
    ]
    return max(0, min(fits))


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
