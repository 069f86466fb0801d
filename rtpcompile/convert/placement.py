"""Which of the attention layers found become retention: ratio and placement."""

from __future__ import annotations

import math
import operator
import warnings


def round_half_up(x: float) -> int:
    # NOTE: not round(): Python rounds half to even, so ratio=0.5 of 3 layers would give 2.
    return int(math.floor(x + 0.5 + 1e-9))


def select_layers(num_layers: int, ratio: float, placement) -> list[int]:
    """Indices (into the attention modules found) that become retention.

    ``placement``: "front" (the first round(ratio * L) layers), "back" (the last ones),
    "interleave:N" (in every group of N consecutive layers the first N - 1 are converted and the
    last keeps attention; ``ratio`` is ignored), or an explicit list of layer indices.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"ratio (fraction of layers converted) must be in [0, 1], got {ratio!r}")
    if not isinstance(placement, str) and hasattr(placement, "__iter__"):
        # NOTE: any sequence of indices: a list, a numpy array, a 1-D integer tensor
        return _explicit(num_layers, list(placement))
    count = round_half_up(ratio * num_layers)
    if count == 0 and ratio > 0 and placement in ("front", "back"):
        # NOTE: silently converting nothing left users puzzled at the next step (distill)
        warnings.warn(
            f"retrofit: ratio={ratio} of {num_layers} attention layers rounds to 0 layers: "
            "nothing is converted (raise ratio, or pass the layer indices)",
            stacklevel=4,
        )
    if placement == "front":
        return list(range(count))
    if placement == "back":
        return list(range(num_layers - count, num_layers))
    if isinstance(placement, str) and placement.startswith("interleave:"):
        period = placement.partition(":")[2]
        if not period.isdigit() or int(period) < 2:
            raise ValueError(
                f"interleave needs a period N >= 2 ('interleave:4'), got {placement!r}"
            )
        n = int(period)
        if n > num_layers:
            raise ValueError(
                f"{placement!r} on {num_layers} attention layers: no group of {n} is complete, "
                "so every layer would be converted and none keep attention (use ratio=1.0 for "
                "that, or a smaller N)"
            )
        # NOTE: a last, incomplete group is converted whole
        return [i for i in range(num_layers) if (i + 1) % n != 0]
    raise ValueError(
        "placement must be 'front', 'back', 'interleave:N' or a list of layer indices, "
        f"got {placement!r}"
    )


def _explicit(num_layers: int, indices: list) -> list[int]:
    found = []
    for i in indices:
        # NOTE: operator.index takes numpy and 0-d torch integers (``np.arange(4)[1::2]``), not
        # floats; a bool is refused as an index
        index = None
        if not isinstance(i, bool) and "bool" not in str(getattr(i, "dtype", "")):
            try:
                index = operator.index(i)
            except TypeError:
                pass
        if index is None:
            raise ValueError(
                f"layer indices must be integers, got {i!r} of type {type(i).__name__}"
            )
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"layer index {index} is out of range for {num_layers} attention layers "
                f"(expected 0..{num_layers - 1})"
            )
        found.append(index)
    return sorted({i % num_layers for i in found})
