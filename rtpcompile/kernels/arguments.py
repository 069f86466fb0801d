"""The arguments a generated kernel declares: only those its spec reads.

``launch._call`` builds every pass's arguments in one fixed order (``ARGUMENTS``); a kernel
declares the subset its spec reads (``names``, rendered into its signature), and a launch picks
that subset by name (``picker``). Triton binds and specialises every declared argument at each
launch (~0.2 µs each on the 2-core CI machine, ``benchmarks/triton_launch_cost.py``): a decode
step without row scales or d gamma sums declared 38 and reads 27. The split stages' chunk-state
buffers (h, hp) follow, and the dq/dk kernel (``chunk_dqk.jinja``) has a signature of its own.
"""

from __future__ import annotations

import functools
import itertools
import operator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # NOTE: spec.py renders the signature with this module
    from .spec import KernelSpec

ARGUMENTS = (
    "q", "k", "v", "g", "s0", "o", "sf", "rs", "r", "rd",
    "s_qb", "s_qh", "s_qt", "s_qk",
    "s_kb", "s_kh", "s_kt", "s_kk",
    "s_vb", "s_vh", "s_vt", "s_vv",
    "s_sb", "s_sh", "s_sk", "s_sv",
    "s_xb", "s_xh", "s_xt",
    "s_rb", "s_rh", "s_rt", "s_rv",
    "B", "H", "T", "scale", "state_scale",
)  # fmt: skip

_STATE_IN = ("s0", "s_sb", "s_sh", "s_sk", "s_sv", "state_scale")
_ROW_SCALE = ("rs", "s_xb", "s_xh", "s_xt")
_ROW_DOT = ("r", "rd", "s_rb", "s_rh", "s_rt", "s_rv")
_INDEX = {name: i for i, name in enumerate(ARGUMENTS)}


@functools.lru_cache(maxsize=512)
def names(spec: KernelSpec) -> tuple[str, ...]:
    """The arguments ``spec``'s kernel declares, in ``ARGUMENTS`` order: all but the groups its
    flags turn off (a few declared ones may still go unread, e.g. q of a state-only fused pass).
    B is never read (programs index batch * heads); a states stage reads neither q nor o, and
    writes its d gamma terms into hp, not through r, rd."""
    unread = {"B"}
    if not spec.state_in:
        unread.update(_STATE_IN)
    if not spec.state_out:
        unread.add("sf")
    if not spec.row_scale:
        unread.update(_ROW_SCALE)
    if not spec.row_dot or spec.stage == "states":
        unread.update(_ROW_DOT)
    if spec.stage == "states":  # NOTE: the states of k and v alone; no output rows
        unread.update(("q", "s_qb", "s_qh", "s_qt", "s_qk", "o"))
    return tuple(name for name in ARGUMENTS if name not in unread)


def _family(name: str) -> str:
    name = name.partition(":")[0]
    if name.startswith("s_"):
        return name[2]  # s_qb -> q: one line per tensor's strides
    return "sizes" if name in ("B", "H", "T", "scale", "state_scale") else "pointers"


def signature(spec: KernelSpec) -> str:
    """The kernel's parameter lines for the templates (``_signature.jinja``): the pointers, then
    a line per tensor's strides, then the sizes and scales (``scalar``)."""
    lines = itertools.groupby((scalar(spec, name) for name in names(spec)), key=_family)
    return "\n".join(f"    {', '.join(group)}," for _, group in lines)


def scalar(spec: KernelSpec, name: str) -> str:
    """``name`` as declared: a scale annotated ``tl.float64`` in a float64 kernel. Triton types
    a Python float argument fp32 otherwise, so a float64 kernel got ``scale`` rounded to float32
    (every float64 result off by ~2e-8 on a GPU until 2026-11-25; the interpreter keeps the
    double, so CI saw 4e-16)."""
    if name in ("scale", "state_scale") and spec.acc == "float64":
        return f"{name}: tl.float64"
    return name


def picker(kernel):
    """``operator.itemgetter`` of ``kernel``'s declared arguments out of a full ``ARGUMENTS``
    tuple (kept on the kernel object: worked out at its first launch only)."""
    found = getattr(kernel, "_rtp_picker", None)
    if found is None:
        indices = [_INDEX[name] for name in kernel.arg_names if name in _INDEX]
        if len(indices) == 1:  # NOTE: itemgetter of one index returns the item, not a tuple
            found = lambda full, i=indices[0]: (full[i],)  # noqa: E731
        else:
            found = operator.itemgetter(*indices)
        kernel._rtp_picker = found
    return found
