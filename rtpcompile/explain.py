"""``rtpcompile.explain(model, *args, **kwargs)``: what the rtp backend would do, and why.

Runs Dynamo once on the model with a collecting backend (the graph then runs eagerly: nothing
is compiled or benchmarked) and returns a :class:`Report` with one row per candidate region:
where it is in the user's code, the form it was written in, heads, dims, decay, and either the
lowering the runtime planner picks for these shapes or the reason it was declined.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import re
import sys
import types

import torch
from torch._dynamo.utils import counters

from .detect import find_regions_split
from .detect.graph_view import GraphView, example, is_tensor
from .detect.products import scores_leaving_graph
from .detect.region import Region
from .detect.subgraphs import RunBodies, graph_at, has_bodies
from .fresh_caller import fresh_caller, isolated
from .kernels import GRADIENTS

_COLUMNS = ("#", "status", "where", "written", "heads", "K x V", "decay", "lowering / reason")


def _scope_text(scope: tuple[str, ...]) -> str:
    """The explain label of a region inside a body: in a checkpoint or in a compile region, by
    the call that runs the body (Dynamo names the node after its op)."""
    if not scope:
        return ""
    return " (in compile region)" if scope[-1].startswith("invoke_subgraph") else " (in checkpoint)"


def planned_lowering(region: Region) -> str:
    """The lowering the op's planner picks at run time for the region's example shapes.

    A native region (an rtp op call already in the graph) is planned from the form and chunk
    size its call requests; every other region from the ``form`` option (``RTP_FORM``, as the
    backend rewrites it). The planner reads ``RTP_CHUNK_SIZE`` itself, as it does at run time.
    """
    from .lowering import plan
    from .rewrite import steps_inline

    form = _op_call(region)[4]
    if region.seq_len is None or region.seq_len < 1:
        return f"{form} (decided per call)"
    device = None if region.device is None else torch.device(region.device).type
    if not region.native and steps_inline(device, region.seq_len):
        return "recurrent at T=1, as aten ops Inductor fuses (CPU: no op call)"
    chosen = plan.choose(
        form,
        T=region.seq_len,
        has_state=region.state is not None,
        chunk_size=region.chunk_size,
        tune=False,
    )
    problem = _example_problem(region)
    if chosen.source not in ("rule", "forced") and problem is not None:
        chosen = plan.plan_for(problem, tune=False)  # the memo, the autotune cache, the model
    text = chosen.form + (f" (chunk {chosen.chunk_size})" if chosen.form == "chunkwise" else "")
    text += f" at T={region.seq_len}"
    if region.native:
        text += ", op call kept" if region.form == "auto" else ", forced by the op call"
    elif form != "auto":
        text += ", forced by RTP_FORM"
    if region.normaliser == "abs_sum" and _normaliser_apart(region, device):
        text += ", the row normaliser by one more forward call on a column of ones"
    elif region.normaliser == "abs_sum":
        text += ", +1 value column for the row normaliser"
    elif region.normaliser == "sum_abs":
        text += ", sum-of-|A| normaliser computed beside the op"
    return text


def _normaliser_apart(region: Region, device_type: str | None) -> bool:
    """Whether the region's abs-sum normaliser runs as its own call on ``device_type``."""
    from . import options
    from .rewrite import normaliser_apart_on

    kernels = options.current().kernels
    return region.state is None and normaliser_apart_on(device_type, region.v_dim, kernels)


def _op_call(region: Region, device_type: str | None = None) -> tuple[int, int, bool, bool, str]:
    """(K, V, state in, state out, form) of the op call a claimed region runs on
    ``device_type`` (the region's own when None): V counts the column of ones of an abs-sum
    normaliser unless it runs apart; a rewritten region returns a state only when one comes in,
    an op call already in the graph when it is read. A rewritten region's form is the ``form``
    option of the environment (``RTP_FORM``), as the backend would rewrite it."""
    from . import options

    if device_type is None and region.device is not None:
        device_type = torch.device(region.device).type
    column = region.normaliser == "abs_sum" and not _normaliser_apart(region, device_type)
    V = (region.v_dim or 0) + int(column)
    has_state = region.state is not None
    state_out = region.state_output is not None if region.native else has_state
    form = region.form if region.native else options.current().form
    return region.k_dim, V, has_state, state_out, form


def _example_problem(region: Region):
    """The planning problem of the region's example call (its batch, heads, dims, dtype and
    device, on the backend the op would use), or None when detection could not see them."""
    from . import options as _options
    from .lowering import dispatch, plan

    options = _options.current()
    if None in (region.batch, region.heads, region.k_dim, region.v_dim, region.dtype):
        return None
    K, V, has_state, state_out, form = _op_call(region)
    try:
        probe = torch.empty(0, device=region.device)
    except (RuntimeError, ValueError):  # NOTE: a device this process cannot use
        return None
    q, v = probe.new_empty((0, 0, 0, K)), probe.new_empty((0, 0, 0, V))
    try:
        backend = "triton" if dispatch.use_triton(q, v) else "aten"
    except RuntimeError:  # NOTE: forced kernels that cannot run here: the call will say so
        return None
    return plan.Problem(
        region.batch, region.heads, region.seq_len, K, V, region.dtype, str(probe.device),
        backend, has_state, "fwd", form, region.chunk_size or options.chunk_size, state_out,
    )  # fmt: skip


def region_kernels(
    region: Region, batch: int, dtype: torch.dtype, backward: bool, needs: tuple | None = None
) -> list:
    """``Report.kernels``: the region's op call as meta tensors through ``kernels_for``;
    ``needs``: the five gradients its backward computes (``kernels.GRADIENTS``; None: all)."""
    from . import kernels
    from .lowering import plan, tune
    from .rewrite import split_scale

    # NOTE: checked here, not by torch.empty below: it takes batch=0 (a list of kernels that
    # would never launch) and raises its own TypeError for dtype="bf16"
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(
            f"kernels(): batch must be a positive integer (sequences per call), got {batch!r}"
        )
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # the op's dtypes
    if dtype not in floats:
        raise ValueError(
            f"kernels(): dtype must be one of torch.float16, torch.bfloat16, torch.float32, "
            f"torch.float64 (the op's dtypes), got {dtype!r}"
        )
    if region.seq_len is None or region.seq_len < 1 or region.k_dim is None:
        raise ValueError(f"kernels(): region at {region.where} has no example shapes")
    H, T = region.heads, region.seq_len
    K, V, has_state, state_out, form = _op_call(region, "cuda")
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(batch, H, T, K, **meta)
    v = torch.empty(batch, H, T, V, **meta)
    s0 = torch.empty(batch, H, K, V, device="meta") if has_state else None
    found, dtype_name = [], str(dtype).removeprefix("torch.")
    # NOTE: the backward's passes depend on the scale (kernels.backward.TINY_SCALE); a rewritten
    # region's is its constant score factors (rewrite.split_scale); a native call's is not recorded
    scale = 1.0 if region.native else split_scale(region.pre)[0]
    # NOTE: the op plans its backward apart from its forward (it may pick another form)
    for phase in ("fwd", "bwd") if backward else ("fwd",):
        problem = plan.Problem(batch, H, T, K, V, dtype_name, "cuda", "triton", has_state, phase,
                               form, region.chunk_size, state_out)  # fmt: skip
        chosen = plan.choose(form, T, has_state, region.chunk_size, phase=phase, tune=False)
        if chosen.source not in ("rule", "forced"):
            chosen = tune.model_choice(problem.at_bucket())
        args = (chosen.form, q, q, v, torch.empty(H, device="meta"), s0, chosen.chunk_size)
        kw = dict(config=dict(chosen.config) or None, state_out=state_out, scale=scale)
        fwd = kernels.kernels_for(*args, **kw)
        if phase == "fwd":
            found += fwd
            if region.normaliser == "abs_sum" and _normaliser_apart(region, "cuda"):
                ones = torch.empty(batch, H, T, 1, **meta)  # NOTE: the normaliser's own call
                found += kernels.kernels_for(*args[:3], ones, *args[4:5], None, args[6],
                                             config=kw["config"], state_out=False,
                                             scale=scale)  # fmt: skip
            continue
        # NOTE: a state output always has a gradient in the backward: autograd materialises
        # zeros for an unused one (the op's backward drops it only without a state output)
        both = kernels.kernels_for(*args, backward=True, final_state_grad=state_out, needs=needs,
                                   **kw)  # fmt: skip
        found += both[len(fwd) :]
    return found


def traced_needs(gm, region: Region) -> tuple[bool, ...] | None:
    """Which of the op's five gradients (``kernels.GRADIENTS``) its backward would compute:
    ``requires_grad`` of the values the op reads, from the traced graph's fake values, as the
    op's backward gets them (``ctx.needs_input_grad``); None when the graph does not say."""
    named = {node.name: node for node in gm.graph.nodes}

    def wants(name: str) -> bool | None:
        value = example(named[name]) if name in named else None
        return bool(value.requires_grad) if is_tensor(value) else None

    if region.native:
        from .detect.patterns_native import bound_args, op_schema

        call = named.get(region.nodes[0]) if region.nodes else None
        schema = op_schema(call.target) if call is not None else None
        if schema is None:
            return None
        gamma = bound_args(call, schema).get("gamma")
        decay = [gamma.name] if hasattr(gamma, "name") else []
    elif region.mask_kind == "mul":  # NOTE: the op's gamma is read from every mask factor
        decay = list(region.masks)
    elif region.mask_kind == "decay":  # a state decay tensor (none for a literal)
        decay = list(region.masks[:1])
    else:  # NOTE: a 0/1 causal mask: gamma = 1, a constant
        decay = []
    operands = (region.q, region.k, region.v)
    found = [None if x is None else wants(x.node) for x in operands]
    decays = [wants(name) for name in decay]
    s0 = False if region.state is None else wants(region.state.node)
    if None in (*found, *decays, s0):
        return None
    return (*found, any(decays), s0)


def backward_note(needs: tuple[bool, ...] | None, has_state: bool) -> str:
    """The Triton kernels' backward passes for ``needs``, when they skip any; "" otherwise (all
    passes, no gradient at all, or unknown). The rule is ``kernels.backward``'s (the aten
    backward runs its own: ``aten_impl.retention_backward``)."""
    if needs is None or not any(needs):
        return ""
    dq, dk, dv, dg, ds0 = needs
    runs = {"dq": dq or dg, "dk": dk, "dv": dv or (has_state and ds0)}
    if all(runs.values()):
        return ""
    wanted = [
        f"d{n}" for n, want in zip(("q", "k", "v", "gamma", "s0"), needs, strict=True) if want
    ]
    kept = [name for name, run in runs.items() if run]
    passes = "pass" if len(kept) == 1 else "passes"
    return f"kernels' backward: {', '.join(kept)} {passes} only ({', '.join(wanted)} wanted)"


@dataclasses.dataclass
class Report:
    """Claimed and declined regions of one model call (``print(report)`` shows the table)."""

    regions: list[Region]
    graphs: int = 0
    graph_breaks: list[str] = dataclasses.field(default_factory=list)
    # NOTE: per region (same index), the op's five wanted gradients seen in the trace, or None
    needs: list[tuple[bool, ...] | None] = dataclasses.field(default_factory=list)
    # NOTE: how the trace differed from the usual one (a static retry), printed under the table
    notes: list[str] = dataclasses.field(default_factory=list)

    def grads(self, index: int) -> tuple[str, ...] | None:
        """The op inputs of region ``index`` that needed a gradient when explain traced the
        model (names from ``kernels.GRADIENTS``), or None when the trace does not say."""
        needs = self.needs[index] if index < len(self.needs) else None
        if needs is None:
            return None
        return tuple(n for n, want in zip(GRADIENTS, needs, strict=True) if want)

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
            if r.claimed:
                needs = self.needs[i] if i < len(self.needs) else None
                note = backward_note(needs, r.state is not None)
                last += f"; {note}" if note else ""
            rows.append(
                (
                    str(i),
                    "claimed" if r.claimed else "declined",
                    r.where,
                    r.written + _scope_text(r.scope),
                    str(r.heads) if r.heads is not None else "-",
                    dims,
                    r.decay_text(),
                    last,
                )
            )
        return rows

    def kernels(
        self,
        index: int,
        *,
        batch: int = 1,
        dtype=torch.bfloat16,
        backward: bool = False,
        grads=None,
    ) -> list:
        """The generated kernels claimed region ``index`` would launch on a GPU at its example
        length (``KernelInfo`` rows: module name and spec; ``print`` each). The form and blocks
        are the Triton cost model's choice for ``batch`` sequences (>= 1) in ``dtype`` (float16,
        bfloat16, float32 or float64; anything else is a ValueError); a tuned cache entry on
        the deployment GPU may pick others. ``backward`` adds the training pass's
        kernels, only the passes the wanted gradients need: ``grads`` names them (a subset of
        ``kernels.GRADIENTS``: "q", "k", "v", "gamma", "initial_state"); None takes the ones
        that needed a gradient when explain traced the model (``grads(index)``), or all five
        when that trace wanted none (an inference call) or did not say. Nothing is compiled or
        launched."""
        claimed = [i for i, r in enumerate(self.regions) if r.claimed]
        if not 0 <= index < len(self.regions):
            valid = f"0..{len(self.regions) - 1}" if self.regions else "none: no regions"
            raise ValueError(
                f"kernels(): region index {index} is out of range (valid: {valid}; "
                f"claimed: {claimed})"
            )
        if not self.regions[index].claimed:
            raise ValueError(f"kernels(): region {index} is not claimed (claimed: {claimed})")
        if grads is None:
            grads = self.grads(index) or GRADIENTS
        elif isinstance(grads, str) or not set(grads) <= set(GRADIENTS):
            raise ValueError(f"kernels(): grads must be names from {GRADIENTS}, got {grads!r}")
        needs = tuple(n in grads for n in GRADIENTS)
        return region_kernels(self.regions[index], batch, dtype, backward, needs)

    def __str__(self) -> str:
        head = (
            f"rtpcompile.explain: {len(self.claimed)} claimed, {len(self.declined)} declined "
            f"region(s) in {self.graphs} graph(s)"
        )
        rows = self.rows()
        if not rows:
            lines = [head, "(no retention candidates found)"]
        else:
            widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
            lines = [head, "  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True))]
            lines.append("  ".join("-" * w for w in widths))
            lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        if self.graph_breaks:
            lines.append(f"graph breaks ({len(self.graph_breaks)}):")
            lines += [f"  {reason}" for reason in self.graph_breaks]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(line.rstrip() for line in lines)

    __repr__ = __str__


def explain(model, *args, **kwargs) -> Report:
    """Trace ``model(*args, **kwargs)`` with Dynamo (dynamic shapes) and report every region."""
    from .backend import configure_logging
    from .options import resolve

    configure_logging(resolve(None).log)
    report = Report([])
    at_breaks: list[Region] = []

    rename = _user_names(model)

    def collect(gm, example_inputs, **_):
        report.graphs += 1
        base, found = find_regions_split(gm, example_inputs)
        report.regions.extend(rename(r) for r in found)
        needs = (traced_needs(graph_at(base, r.scope), r) if r.claimed else None for r in found)
        report.needs.extend(needs)
        at_breaks.extend(scores_leaving_graph(GraphView(gm)))
        if not has_bodies(gm):
            return gm.forward
        return lambda *args: RunBodies(gm).run(*args)  # NOTE: not an eager invoke_subgraph

    before = collections.Counter(counters["graph_break"])
    try:
        _trace(collect, True, model, args, kwargs)
    except torch._dynamo.exc.InternalTorchDynamoError as exc:
        # NOTE: torch 2.13's Dynamo fails tracing some nested compile regions with dynamic=True
        # (docs/backend.md); a static trace still shows every region at this length
        report.regions.clear()
        report.needs.clear()
        at_breaks.clear()
        report.graphs = 0
        report.notes.append(
            "traced with static shapes: Dynamo failed under dynamic=True "
            f"({type(exc).__name__}: {_first_line(str(exc))})"
        )
        _trace(collect, False, model, args, kwargs)
    broken = collections.Counter(counters["graph_break"]) - before
    report.graph_breaks = [_first_line(reason) for reason in broken.elements()]
    if report.graph_breaks:  # NOTE: without a break, scores returned from a graph are its result
        report.regions.extend(at_breaks)
    return report


def _trace(collect, dynamic: bool, model, args, kwargs) -> None:
    """Run ``model(*args, **kwargs)`` compiled with the ``collect`` backend.

    NOTE: through a throwaway frame (fresh_caller), so the user's compiled models keep their
    cache entries; graph breaks inside the model stay in that frame (nested_graph_breaks), and
    the resume functions after them are the trace's own."""
    with fresh_caller() as caller:
        compiled = torch.compile(caller, backend=collect, dynamic=dynamic, **isolated())
        with torch._dynamo.config.patch(nested_graph_breaks=True):
            compiled(model, *args, **kwargs)


def _user_names(model):
    """Region -> the region with the throwaway caller's input names in its reason replaced by
    the ones compiling the model gives them (``'l_args_3_'`` -> ``'l_x_'``, ``'l_model_mask'``
    -> ``'l_self_mask'``), so explain's reasons read as the model's own."""
    try:
        # NOTE: a plain function has no forward (its reasons named 'l_args_3_' until 2026-11-25)
        params = list(inspect.signature(getattr(model, "forward", model)).parameters.values())
    except (TypeError, ValueError):
        params = []
    code = getattr(getattr(type(model), "forward", None), "__code__", None)
    owner = code.co_varnames[0] if code is not None and code.co_argcount else "self"
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def arg(match: re.Match) -> str:
        i = int(match.group(1))
        return f"l_{positional[i]}_" if i < len(positional) else match.group(0)

    def rename(region: Region) -> Region:
        if not region.reason:
            return region
        reason = re.sub(r"\bl_args_(\d+)_", arg, region.reason)
        reason = re.sub(r"\bl_kwargs_", "l_", reason)
        reason = re.sub(r"\bl_model_", f"l_{owner}_", reason)
        return dataclasses.replace(region, reason=reason)

    return rename


def _first_line(reason: str) -> str:
    """Dynamo's graph-break reason, short: its first line and its explanation when given."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    text = lines[0] if lines else "unknown reason"
    why = next((ln for ln in lines[1:] if ln.startswith("Explanation:")), None)
    return f"{text} ({why.removeprefix('Explanation:').strip()})" if why else text


class _CallableModule(types.ModuleType):
    """``rtpcompile.explain`` may resolve to this module once it is imported; calling it works."""

    def __call__(self, model, *args, **kwargs) -> Report:
        return explain(model, *args, **kwargs)


# NOTE: importing the submodule rtpcompile.explain sets the package attribute ``explain`` to the
# module, shadowing the lazily exported function; a callable module keeps the public API intact.
sys.modules[__name__].__class__ = _CallableModule
