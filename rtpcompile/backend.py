"""The ``rtp`` torch.compile backend: detect -> rewrite -> Inductor.

``torch.compile(model, backend="rtp", options={...})`` finds the entry point
``rtp = "rtpcompile.backend:rtp_backend"``. The backend never fails a compile because of
retention: any exception in detection or rewrite becomes one warning and the untouched graph
goes to Inductor, unless ``options={"strict": True}``. Timing and decision counts are kept in
:data:`counters` (``detect_seconds``, ``rewrite_seconds``, ``compile_seconds``,
``regions_claimed``, ``regions_declined``, ``fallbacks``, ``graphs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import pathlib
import time
import warnings

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from . import options as options_mod
from .detect import counters, find_regions_split
from .detect.ddp_pieces import real_example_inputs
from .detect.region import Region
from .detect.subgraphs import RunBodies
from .rewrite import (
    copy_graph_module,
    one_step_in,
    rewrite,
    rewrite_region,
    rtp_decay,
    rtp_retention,
)

log = logging.getLogger("rtpcompile")

__all__ = ["counters", "rtp_backend", "source_hash"]


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of the package's source: the Inductor cache tag, so stale artifacts never serve."""
    root = pathlib.Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".jinja") and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return "rtpcompile-" + digest.hexdigest()[:16]


def configure_logging(level: str) -> None:
    """Apply ``RTP_LOG`` to the ``rtpcompile`` logger for the process (its run-time planner
    messages included); "off" leaves the logger as the application configured it."""
    if level == "off":
        return
    log.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[rtpcompile] %(message)s"))
        log.addHandler(handler)


@contextlib.contextmanager
def logging_scope(level: str):
    """Apply the ``log`` option inside the block only (one compile's messages, its verify
    check), then put the logger's level and handlers back as they were."""
    saved_level, saved_handlers = log.level, list(log.handlers)
    configure_logging(level)
    try:
        yield
    finally:
        log.setLevel(saved_level)
        for handler in [h for h in log.handlers if h not in saved_handlers]:
            log.removeHandler(handler)


def detect_and_rewrite(
    gm, example_inputs, opts, runtime_options: str = ""
) -> tuple[fx.GraphModule, list[Region]]:
    """Detection then rewrite on a copy of ``gm``; returns (rewritten copy, regions). Every rtp
    op call of the copy carries ``runtime_options`` (``options.runtime_text``)."""
    start = time.perf_counter()
    # NOTE: under DDP's graph splitting the example inputs are fake; the mask proof needs the
    # real buffer values Dynamo recorded for the whole graph's inputs.
    # NOTE: a retention written as one einsum of four operands is split where that gets it
    # claimed (base is then a copy of gm with those einsums split)
    base, regions = find_regions_split(gm, real_example_inputs(gm, example_inputs))
    middle = time.perf_counter()
    counters["detect_seconds"] += middle - start
    new_gm = gm
    if any(r.claimed for r in regions):
        new_gm = rewrite(
            copy_graph_module(base), regions, opts.form, opts.chunk_size or 0, runtime_options
        )
    counters["rewrite_seconds"] += time.perf_counter() - middle
    return new_gm, regions


def _inductor(gm: fx.GraphModule, example_inputs, mode: str | None):
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(mode) if mode else {}
    # NOTE: AOTAutograd's cache bypasses a graph calling a function it does not know; the glue's
    # behaviour is fixed by its constant arguments (in the graph, so in the key) and by the
    # package source, which the key holds here, so its entries can be reused safely.
    marked = dict(torch._inductor.config.unsafe_marked_cacheable_functions)
    for glue in (rtp_retention, rtp_decay):
        marked[f"{glue.__module__}.{glue.__name__}"] = source_hash()
    patches["unsafe_marked_cacheable_functions"] = marked
    with torch.compiler.config.patch(cache_key_tag=cache_tag()):
        return compile_fx(gm, example_inputs, config_patches=patches)


def cache_tag() -> str:
    """The Inductor and AOTAutograd cache tag of a compile: the package's source, and the
    ``kernels`` option as the environment gives it (``RTP_KERNELS``).

    NOTE: the glue reads that option when AOTAutograd traces it (``rewrite.inline_step``,
    ``rewrite.normaliser_apart``) unless the options dict set it (then it is in the graph, as
    the op call's ``runtime_options``): without it in the key, a graph traced with the one-token
    CPU step inlined was served to a process running ``RTP_KERNELS=triton``, and the reverse."""
    return f"{source_hash()}-kernels={options_mod.resolve(None).kernels}"


def compile_options(options) -> options_mod.Options:
    """The options a compile freezes into its graph: ``resolve(options)``, except that a chunk
    size from ``RTP_CHUNK_SIZE`` is left to the planner, which reads it at every call (only
    ``options={"chunk_size": ...}`` is frozen into the rewritten regions)."""
    opts = options_mod.resolve(options)
    if "chunk_size" not in (options or {}):
        opts = dataclasses.replace(opts, chunk_size=None)
    return opts


def rtp_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    """The torch.compile backend (``mode=`` and ``options=`` arrive only when non-default)."""
    opts = compile_options(kwargs.get("options"))
    # NOTE: the op reads its run-time options when it runs, long after this call returns: the
    # options dict's kernels/autotune travel inside each op call (RTP_* apply as they stand)
    runtime = options_mod.runtime_text(kwargs.get("options"))
    configure_logging(options_mod.resolve(None).log)  # RTP_LOG: the process's setting
    with logging_scope(opts.log):
        return _compile(gm, example_inputs, opts, runtime, kwargs.get("mode"))


def _compile(gm: fx.GraphModule, example_inputs, opts, runtime: str, mode: str | None):
    start = time.perf_counter()
    counters["graphs"] += 1
    try:
        new_gm, regions = detect_and_rewrite(gm, example_inputs, opts, runtime)
    except Exception as exc:
        if opts.strict:
            raise
        counters["fallbacks"] += 1
        warnings.warn(
            f"rtpcompile: retention detection/rewrite failed ({type(exc).__name__}: {exc}); "
            "compiling this graph unchanged with Inductor (options={'strict': True} raises)",
            stacklevel=3,
        )
        new_gm, regions = gm, []
    claimed = [r for r in regions if r.claimed]
    log.info("rtp: %d region(s) claimed, %d declined", len(claimed), len(regions) - len(claimed))
    restored = _autograd_state(gm)
    try:
        compiled = _inductor(new_gm, example_inputs, mode)
    except Exception as exc:
        # NOTE: Dynamo's own exceptions steer its tracing (TensorifyScalarRestartAnalysis from
        # Inductor retraces with the floats specialised, SkipFrame runs the frame eagerly)
        if opts.strict or new_gm is gm or isinstance(exc, torch._dynamo.exc.TorchDynamoException):
            raise
        with restored():
            compiled, claimed = _unchanged(gm, example_inputs, mode, exc), []
    counters["compile_seconds"] += time.perf_counter() - start
    # NOTE: an rtp op already in the graph (native region) is its own reference: nothing to verify
    rewritten = [r for r in claimed if not r.native]
    if opts.verify and rewritten:
        return _verified(compiled, gm, rewritten, opts, runtime, new_gm)
    return compiled


def _unchanged(gm: fx.GraphModule, example_inputs, mode: str | None, exc: Exception):
    """``gm`` compiled by Inductor as it is, after the rewritten graph failed to compile with
    ``exc``; one warning once that compile works.

    NOTE: called inside the handler of ``exc``: when ``gm`` fails too, the graph fails with
    plain Inductor as well, and its own error (what backend="inductor" reports) is raised,
    with ``exc`` shown as the error it was handling."""
    compiled = _inductor(gm, example_inputs, mode)
    counters["fallbacks"] += 1
    warnings.warn(
        f"rtpcompile: compiling the rewritten graph failed ({type(exc).__name__}: "
        f"{_first_line(exc)}); compiled this graph unchanged with Inductor "
        "(options={'strict': True} raises)",
        stacklevel=4,
    )
    return compiled


def _autograd_state(gm: fx.GraphModule):
    """A context manager that puts the functorch and autograd state back as it is now, and
    keeps the dispatch keys as they are now inside it: around the compile of the unchanged
    graph after the rewritten one failed.

    NOTE: AOTAutograd runs the state calls of the graph while it traces it, which has no
    try/finally: a compile failing inside a functorch grad or jvp level (or a forward-AD dual
    level) the graph enters leaves the level pushed and saved-tensor hooks disabled; Dynamo
    undoes the functorch levels and dispatch keys only after the backend returns."""
    depth = torch._C._functorch.get_dynamic_layer_stack_depth()
    included = torch._C._dispatch_tls_local_include_set()
    excluded = torch._C._dispatch_tls_local_exclude_set()
    fwd_grad = torch._C._is_fwd_grad_enabled()
    hooks = torch._C._autograd._saved_tensors_hooks_get_disabled_error_message()
    dual_free = _enters_dual_level(gm) and _dual_level_free()

    @contextlib.contextmanager
    def restored():
        torch._C._functorch.pop_dynamic_layer_stack_and_undo_to_depth(depth)
        torch._C._set_fwd_grad_enabled(fwd_grad)
        if hooks is None:
            torch._C._autograd._saved_tensors_hooks_enable()
        else:
            torch._C._autograd._saved_tensors_hooks_disable(hooks)
        if dual_free and not _dual_level_free():
            torch._C._exit_dual_level(level=0)  # NOTE: one level at a time: it is level 0
        with torch._C._ForceDispatchKeyGuard(included, excluded):
            yield

    return restored


def _enters_dual_level(gm: fx.GraphModule) -> bool:
    return any(
        getattr(node.target, "__name__", "") == "_enter_dual_level"
        for module in gm.modules()
        if isinstance(module, fx.GraphModule)
        for node in module.graph.nodes
    )


def _dual_level_free() -> bool:
    """Whether no forward-AD dual level is entered (torch has no getter: enter one and exit)."""
    try:
        level = torch._C._enter_dual_level()
    except RuntimeError:
        return False
    torch._C._exit_dual_level(level=level)
    return True


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _verified(compiled, gm, regions: list[Region], opts, runtime: str = "", new_gm=None):
    """Run each region's original subgraph beside the op on the first call; raise on mismatch.
    The op runs as in the compiled graph: same form, chunk size and run-time options."""
    state = {"pending": True}

    def run(*args):
        if state["pending"]:
            state["pending"] = False
            with logging_scope(opts.log), _parameters_unwritten(args):
                verify_regions(gm, regions, list(args), opts, runtime, new_gm)
        return compiled(*args)

    return run


def _unwritten(gm: fx.GraphModule, args) -> list:
    """``args`` with a copy of each tensor the graph may write in place: the checks run the
    graph eagerly before the compiled call, which until 2026-11-25 then applied every such
    write a second time (an offset buffer's ``+=`` at 26 instead of 13, outputs off by 238; a
    batch norm's running statistics updated twice). Every tensor but a parameter is copied (an
    op may write its arguments without an in-place node: ``batch_norm``), and a parameter the
    graph writes in place; a parameter written otherwise is a warning."""
    from .detect.mutation import writers

    found = list(args)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(inputs[: len(found)]):
        t = found[i]
        if isinstance(t, torch.Tensor) and (not isinstance(t, nn.Parameter) or writers([node])):
            found[i] = t.detach().clone()
    return found


@contextlib.contextmanager
def _parameters_unwritten(args):
    """Warn when the checks wrote a parameter they were handed (the compiled call then sees
    it written twice); ``_unwritten`` copies every one it knows the graph writes."""
    kept = [(i, a, a._version) for i, a in enumerate(args) if isinstance(a, nn.Parameter)]
    yield
    moved = [i for i, a, version in kept if a._version != version]
    if moved:
        warnings.warn(
            f"rtp verify: checking the regions wrote graph input(s) {moved} (parameters) in "
            "place; the compiled call that follows writes them again",
            RuntimeWarning,
            stacklevel=2,
        )


@contextlib.contextmanager
def _random_state_kept(args):
    """The random number generators as they were: the checks' random draws (dropout) are not
    the compiled call's."""
    devices = sorted(
        {a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda}
    )
    with torch.random.fork_rng(devices=devices):
        yield


def verify_regions(
    gm: fx.GraphModule,
    regions: list[Region],
    args: list,
    opts,
    runtime: str = "",
    rewritten: fx.GraphModule | None = None,
) -> None:
    """Compare every region's original output with the op's on real inputs (eager); the op
    calls carry ``runtime`` (``options.runtime_text``) as the compiled graph's do. A region in
    a checkpoint's or nested compile region's body (``Region.scope``) is checked on the
    operands each call passes the body; then, given the ``rewritten`` graph (what Inductor
    compiles), its outputs are compared with ``gm``'s: what the rewrite changed around the
    bodies (gamma read before a checkpoint call, the bodies' new identifiers) is checked too."""
    # NOTE: every eager run below starts from copies of what the graph may write and from the
    # same random state (three runs on one copy piled up the writes and moved the generator:
    # a checkpointed region after a buffer's += or a dropout failed, until 2026-11-25)
    inner = one_step_in(regions)
    if inner:
        with _random_state_kept(args):
            _verify_bodies(gm, inner, _unwritten(gm, args), opts, runtime)
        if rewritten is not None:
            _verify_graph(gm, rewritten, args)
    regions = [r for r in regions if not r.scope]
    if not regions:
        return
    check = copy_graph_module(gm)
    named = {node.name: node for node in check.graph.nodes}
    pairs = []
    for region in regions:
        results = rewrite_region(
            check, region, opts.form, opts.chunk_size or 0, keep=True, runtime_options=runtime
        )
        outs = [region.output] + ([region.state_output] if region.state_output else [])
        # NOTE: the original output as the region left it: a later in-place write (``o.mul_(2)``)
        # reached the compared value and failed a correct region (until 2026-11-25)
        pairs += [
            (region, o, _as_left(check, named[o]), r) for o, r in zip(outs, results, strict=True)
        ]
    output = next(n for n in check.graph.nodes if n.op == "output")
    output.args = ([p[2] for p in pairs] + [p[3] for p in pairs],)
    check.graph.lint()
    check.recompile()
    with torch.no_grad(), _random_state_kept(args):
        values = check(*_unwritten(gm, args))
    n = len(pairs)
    for (region, name, _, _), want, got in zip(pairs, values[:n], values[n:], strict=True):
        _compare(region, name, want, got)
    log.info("rtp verify: %d region output(s) match the original subgraphs", n)


def _as_left(graph_module: fx.GraphModule, node: fx.Node) -> fx.Node:
    """A copy of ``node``'s value taken right after it."""
    with graph_module.graph.inserting_after(node):
        return graph_module.graph.call_method("clone", (node,))


def _verify_bodies(gm: fx.GraphModule, inner: dict, args: list, opts, runtime: str) -> None:
    """Run ``gm`` eagerly; at each call named in ``inner`` (a checkpoint, a nested compile
    region), verify the body's regions on the operands that call passes it."""

    def at_call(node, body, operands):
        if node.name in inner:
            verify_regions(body, inner[node.name], operands, opts, runtime)

    with torch.no_grad():
        RunBodies(gm, at_call).run(*args)


def _verify_graph(gm: fx.GraphModule, rewritten: fx.GraphModule, args: list) -> None:
    """Compare the outputs of the ``rewritten`` graph with those of Dynamo's ``gm``."""
    with torch.no_grad():
        with _random_state_kept(args):
            want = RunBodies(gm).run(*_unwritten(gm, args))
        with _random_state_kept(args):
            got = RunBodies(rewritten).run(*_unwritten(rewritten, args))
    flat_want, flat_got = pytree.tree_leaves(want), pytree.tree_leaves(got)
    for i, (a, b) in enumerate(zip(flat_want, flat_got, strict=True)):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            _compare(None, f"graph output {i}", a, b)
    log.info("rtp verify: the rewritten graph's %d output(s) match", len(flat_want))


def _compare(region: Region | None, name: str, want: torch.Tensor, got: torch.Tensor) -> None:
    low = want.dtype in (torch.float16, torch.bfloat16) or got.dtype in (
        torch.float16,
        torch.bfloat16,
    )
    tol = 3e-2 if low else 2e-3
    what = (
        f"region at {region.where} ({region.written}, output {name}"
        if region is not None
        else f"the rewritten graph ({name}, around the checkpoint and compile region bodies"
    )
    if want.shape != got.shape:
        raise RuntimeError(
            f"rtp verify: {what}): shape {tuple(got.shape)} from the rtp op, "
            f"{tuple(want.shape)} from the original subgraph"
        )
    # NOTE: non-finite entries must sit where the original's are (a NaN input is a NaN output
    # in both); the tolerance is for the finite ones (a NaN error failed a correct region)
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(
        want[~finite].nan_to_num(), got[~finite].to(want.dtype).nan_to_num()
    ):
        raise RuntimeError(
            f"rtp verify: {what}, shape {tuple(want.shape)}, dtype {want.dtype}) differs from "
            "the original subgraph in its non-finite entries (NaN/inf positions or signs)"
        )
    shape, dtype = tuple(want.shape), want.dtype
    want, got = want[finite].double(), got[finite].double()
    err = (want - got).abs().max().item() if want.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    if not err <= bound:
        raise RuntimeError(
            f"rtp verify: {what}, shape {shape}, dtype {dtype}) differs from "
            f"the original subgraph: max abs error {err:.3g} > {bound:.3g}"
        )
