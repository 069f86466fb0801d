"""Launch grids of the generated kernels, and CUDA's limits on them.

One program per (V block, B*H) for a fused pass, more axes for the parallel form and the split
stages. A batch whose B*H passes the batch axis's limit launches in slices of the batch
(``launch._launch``); a grid that one sequence already overflows is an error.
"""

from __future__ import annotations

from .spec import KernelSpec

# NOTE: CUDA's grid limits; axis 0 takes 2**31 - 1 programs, axes 1 and 2 take 65535
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def grid(spec: KernelSpec, B: int, H: int, T: int) -> tuple[int, ...]:
    """The launch grid of ``spec``'s kernel over B sequences of H heads and T rows."""
    NV = -(-spec.V // spec.BV)
    if spec.form == "parallel":
        return (NV, -(-T // spec.BT), B * H)
    if spec.stage == "output":
        return (NV * -(-T // spec.BT), B * H)
    if spec.stage == "dqk":
        return (-(-spec.K // spec.BKC) * -(-T // spec.BT), B * H)
    if spec.stage == "states":
        return (NV * -(-spec.K // spec.BKC), B * H)
    return (NV, B * H)


def batch_per_launch(spec: KernelSpec, H: int, T: int) -> int:
    """How many sequences one launch takes when the whole batch's B*H passes its grid axis's
    65535: the batch goes in slices (every tensor the kernels index by batch is batch-first, so a
    slice is a view). A grid that one sequence already overflows is a ValueError."""
    shape = grid(spec, 1, H, T)
    if any(n > cap for n, cap in zip(shape, GRID_LIMITS, strict=False)):
        raise ValueError(
            f"retention kernel {spec.short()}: grid {shape} for one sequence exceeds the launch "
            f"limits {GRID_LIMITS[: len(shape)]} (H={H}, T={T})"
        )
    return max(1, GRID_LIMITS[len(shape) - 1] // H)
