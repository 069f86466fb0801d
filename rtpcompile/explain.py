"""``rtpcompile.explain(model, *args, **kwargs)``: what the rtp backend would do, and why.

Runs Dynamo once on the model with a collecting backend (the graph then runs eagerly: nothing
is compiled or benchmarked) and returns a :class:`Report` with one row per candidate region:
where it is in the user's code, the form it was written in, heads, dims, decay, and either the
lowering the runtime planner picks for these shapes or the reason it was declined.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import torch

from .detect import find_regions
from .detect.region import Region

_COLUMNS = ("#", "status", "where", "written", "heads", "K x V", "decay", "lowering / reason")


def planned_lowering(region: Region) -> str:
    """The lowering the op's planner picks at run time for the region's example shapes.

    A native region (an rtp op call already in the graph) is planned from the form and chunk
    size its call requests; every other region from "auto".
    """
    from .lowering import plan

    if region.seq_len is None or region.seq_len < 1:
        return f"{region.form} (decided per call)"
    chosen = plan.choose(
        region.form,
        T=region.seq_len,
        has_state=region.state is not None,
        chunk_size=region.chunk_size,
    )
    text = chosen.form + (f" (chunk {chosen.chunk_size})" if chosen.form == "chunkwise" else "")
    text += f" at T={region.seq_len}"
    if region.native:
        text += ", op call kept" if region.form == "auto" else ", forced by the op call"
    if region.normaliser == "abs_sum":
        text += ", +1 value column for the row normaliser"
    elif region.normaliser == "sum_abs":
        text += ", sum-of-|A| normaliser computed beside the op"
    return text


@dataclasses.dataclass
class Report:
    """Claimed and declined regions of one model call (``print(report)`` shows the table)."""

    regions: list[Region]
    graphs: int = 0

    @property
    def claimed(self) -> list[Region]:
        return [r for r in self.regions if r.claimed]

    @property
    def declined(self) -> list[Region]:
        return [r for r in self.regions if not r.claimed]

    def rows(self) -> list[tuple[str, ...]]:
        rows = []
        for i, r in enumerate(self.regions):
            dims = f"{r.k_dim} x {r.v_dim}" if r.k_dim is not None else "-"
            last = planned_lowering(r) if r.claimed else r.reason or ""
            rows.append(
                (
                    str(i),
                    "claimed" if r.claimed else "declined",
                    r.where,
                    r.written,
                    str(r.heads) if r.heads is not None else "-",
                    dims,
                    r.decay_text(),
                    last,
                )
            )
        return rows

    def __str__(self) -> str:
        head = (
            f"rtpcompile.explain: {len(self.claimed)} claimed, {len(self.declined)} declined "
            f"region(s) in {self.graphs} graph(s)"
        )
        rows = self.rows()
        if not rows:
            return head + "\n(no retention candidates found)"
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
        lines = [head, "  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(line.rstrip() for line in lines)

    __repr__ = __str__


def explain(model, *args, **kwargs) -> Report:
    """Trace ``model(*args, **kwargs)`` with Dynamo (dynamic shapes) and report every region."""
    from .backend import configure_logging
    from .options import resolve

    configure_logging(resolve(None).log)
    report = Report([])

    def collect(gm, example_inputs, **_):
        report.graphs += 1
        report.regions.extend(find_regions(gm, example_inputs))
        return gm.forward

    compiled = torch.compile(model, backend=collect, dynamic=True)
    try:
        compiled(*args, **kwargs)
    finally:
        _forget(model)
    return report


def _forget(model) -> None:
    """Drop the collecting backend's cache entries so later compiles of the model start clean."""
    forward = getattr(type(model), "forward", None) if isinstance(model, torch.nn.Module) else model
    code = getattr(forward, "__code__", None)
    if code is None:
        return
    try:
        from torch._dynamo.eval_frame import reset_code

        reset_code(code)
    except Exception:  # noqa: BLE001 - best effort; only the cache entry count is at stake
        pass


class _CallableModule(types.ModuleType):
    """``rtpcompile.explain`` may resolve to this module once it is imported; calling it works."""

    def __call__(self, model, *args, **kwargs) -> Report:
        return explain(model, *args, **kwargs)


# NOTE: importing the submodule rtpcompile.explain sets the package attribute ``explain`` to the
# module, shadowing the lazily exported function; a callable module keeps the public API intact.
sys.modules[__name__].__class__ = _CallableModule
