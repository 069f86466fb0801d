"""Comparing (possibly symbolic) sizes, and the size symbols detection takes for equal.

``same_size`` compares two sizes; inside ``assumed_equal_sizes`` it may take two distinct size
symbols with the same example value for one size, which ``guard_equal`` then guards equal.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch


def same_size(a, b) -> bool:
    """Whether two (possibly symbolic) sizes are the same expression, or two size symbols that
    ``assumed_equal_sizes`` may take for the same (a guard makes them so when a region is claimed).
    """
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        ea = a.node.expr if isinstance(a, torch.SymInt) else a
        eb = b.node.expr if isinstance(b, torch.SymInt) else b
        return bool(ea == eb) or _assume_equal(a, b)
    return a == b


# NOTE: at an automatic-dynamic recompile (and with mark_dynamic) Dynamo can give each input's
# dims their own symbols (torch 2.13): a compiled function taking q, k and v then has q's length
# s0 and k's s49, tied by nothing when the scores' tril is the only mask, so
# ``(q @ k.mT).tril() @ v`` was claimed at the static first compile and silently not after the
# dynamic recompile (about 50x slower at T = 4096 on CPU).
_ASSUMED: contextvars.ContextVar[list | None] = contextvars.ContextVar("rtp_assumed", default=None)


def _assume_equal(a, b) -> bool:
    """Two distinct plain size symbols with the same example value, while detection collects the
    pairs it takes for equal (``assumed_equal_sizes``); never sums or unbacked sizes."""
    pending = _ASSUMED.get()
    if pending is None or not (isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt)):
        return False
    if not (a.node.expr.is_Symbol and b.node.expr.is_Symbol):
        return False
    if a.node.hint is None or a.node.hint != b.node.hint:
        return False
    pending.append((a, b))
    return True


@contextlib.contextmanager
def assumed_equal_sizes():
    """Inside the block ``same_size`` takes two size symbols with the same example value for the
    same size and lists the pairs (the list yielded); ``guard_equal`` must then make them so
    before a claim that relied on one is used."""
    pending: list = []
    token = _ASSUMED.set(pending)
    try:
        yield pending
    finally:
        _ASSUMED.reset(token)


def guard_equal(pairs) -> None:
    """Guard each pair of sizes equal: the compiled graph is used only when they are (Dynamo
    installs the shape environment's guards after the backend returns; another call recompiles),
    and the shape environment replaces one symbol by the other from here on."""
    for a, b in pairs:
        if not bool(a == b):  # NOTE: evaluated at the example values: adds the guard
            raise AssertionError(f"rtpcompile: sizes {a} and {b} were taken for equal")


def hint(size) -> int:
    """The example value of a (possibly symbolic) size."""
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else -1
    return int(size)
