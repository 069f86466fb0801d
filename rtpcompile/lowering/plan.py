"""Choose the lowering of one retention call from its real shapes (at run time, inside the op).

Order of decision (docs/autotune.md):
  1. a forced form (and, for chunkwise, a forced chunk size) is used as given;
  2. T == 1, or a state comes in and T <= RECURRENT_MAX_T            -> recurrent (decoding);
     an empty call (B, H or T of 0) -> the requested form, or parallel (nothing to tune);
  3. the in-process memo, then the persistent autotune cache (``rtpcompile/kernels/cache.py``);
  4. with autotuning on (``options={"autotune": True}`` / ``RTP_AUTOTUNE=1``): benchmark the
     candidates once per shape bucket and store the winner (on Triton: with its block config);
  5. otherwise the cost model (``tune.estimate``: FLOPs, bytes and op launches per form).
Deciding here rather than in the compiled graph means no shape guards and no recompiles. The
decision is memoized per shape bucket, so the hot path is one dict lookup and the disk is read
once per bucket per process. Counters (``counters``) and ``describe`` feed ``explain()``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.metadata
import logging
import platform
from pathlib import Path

import torch

from .. import options as _options

log = logging.getLogger("rtpcompile")

RECURRENT_MAX_T = 16
DEFAULT_CHUNK = 64
FORMS = ("parallel", "chunkwise", "recurrent")
PHASES = ("fwd", "bwd")

counters: collections.Counter[str] = collections.Counter()
_memo: dict[tuple, Plan] = {}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A resolved lowering. ``config`` holds kernel block settings as sorted (name, value) pairs.

    On the Triton backend the config (``kernels.spec.CONFIG_KEYS``: BV, num_warps, num_stages,
    split) is passed to every kernel launch of the call; empty means the kernels' defaults. The aten
    path has no blocks: its config is always empty.
    """

    form: str
    chunk_size: int
    source: str = "rule"  # "rule" | "forced" | "model" | "cache" | "tuned"
    config: tuple[tuple[str, int], ...] = ()

    @property
    def label(self) -> str:
        """The candidate's name, independent of where the decision came from."""
        text = f"chunkwise(C={self.chunk_size})" if self.form == "chunkwise" else self.form
        if self.config:
            text += "[" + ",".join(f"{k}={v}" for k, v in self.config) + "]"
        return text


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything a plan may depend on, for one call. ``request``: "auto" or a forced form."""

    B: int
    H: int
    T: int
    K: int
    V: int
    dtype: str
    device: str
    backend: str  # "aten" | "triton"
    has_state: bool
    phase: str = "fwd"  # "fwd" | "bwd" (the backward op plans its own pass)
    request: str = "auto"
    chunk: int = 0  # a forced chunk size, 0 when free
    # the forward writes the final state (a parallel forward then runs a state pass); the
    # backward's passes do not depend on it, nor does aten's cost (it computes the state
    # anyway), so those problems always have True: one plan and one tuning for both calls
    state_out: bool = True

    def __post_init__(self):
        if self.phase != "fwd" or self.backend == "aten":
            object.__setattr__(self, "state_out", True)  # NOTE: frozen; see state_out above

    def bucket(self) -> dict[str, int]:
        """T to the next power of two, B*H to the next power of two; K and V stay exact."""
        return {"T": next_pow2(self.T), "BH": next_pow2(self.B * self.H)}

    def at_bucket(self) -> Problem:
        """The representative problem of this bucket (B=1, H=BH bucket, T=T bucket)."""
        b = self.bucket()
        return dataclasses.replace(self, B=1, H=b["BH"], T=b["T"])


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def is_empty(p: Problem) -> bool:
    """Nothing to compute (B, H or T is 0; K and V are >= 1): never tuned, cached or memoised."""
    return p.B * p.H * p.T == 0


def reset() -> None:
    """Forget memoized plans and zero the counters (tests; after changing RTP_CACHE_DIR)."""
    _memo.clear()
    counters.clear()


def cache_location() -> str:
    """Where tuned plans persist, and the cache mode (``RTP_CACHE``) when it is not "on"."""
    from ..kernels import cache

    mode = cache.mode()
    return str(cache.directory()) + ("" if mode == "on" else f" (RTP_CACHE={mode})")


def describe(plan: Plan) -> str:
    """One line for explain(): the lowering and where the decision came from."""
    where = {
        "rule": "rule",
        "forced": "forced",
        "model": "cost model",
        "cache": "autotune cache",
        "tuned": "autotuned",
    }
    return f"{plan.label} ({where.get(plan.source, plan.source)})"


def stats() -> dict[str, int]:
    """Counters for explain() and logs: benchmarks, tunings, cache_hits, cache_misses, model."""
    return {
        name: counters[name]
        for name in ("benchmarks", "tunings", "cache_hits", "cache_misses", "model")
    }


def choose(
    form: str,
    T: int,
    has_state: bool,
    chunk_size: int = 0,
    *,
    q: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    phase: str = "fwd",
    tune: bool | None = None,
    state_out: bool = True,
    scale: float = 1.0,
    **_: object,
) -> Plan:
    """Resolve ``form`` ("auto" or a concrete form) and its chunk size for one call.

    ``tune`` None follows the ``autotune`` option; explain() passes False (never benchmarks).
    ``state_out``: whether the forward returns its final state (``output_final_state``).
    ``scale``: the call's, which decides with the shapes whether the kernels run it (a scale
    they refuse runs on aten, and is planned for aten: its T x T memory rule applies).
    """
    opts = _options.current()
    chunk = chunk_size if chunk_size > 0 else (opts.chunk_size or 0)
    if form != "auto" and (form != "chunkwise" or chunk):
        return Plan(form, chunk or DEFAULT_CHUNK, "forced")
    if form == "auto" and (T == 1 or (has_state and T <= RECURRENT_MAX_T)):
        return Plan("recurrent", chunk or DEFAULT_CHUNK, "rule")
    if q is None or v is None:  # explain(): no tensors, so never benchmark
        problem = Problem(1, 1, T, 64, 64, "float32", "cpu", "aten", has_state, phase, form, chunk)
        return plan_for(problem, tune=False)
    backend = None if q.is_cuda or opts.kernels == "triton" else "aten"  # NOTE: skips a lookup
    problem = problem_of(
        q, v, has_state, phase=phase, request=form, chunk=chunk, backend=backend,
        state_out=state_out, scale=scale,
    )  # fmt: skip
    return plan_for(problem, tune=opts.autotune if tune is None else tune)


def problem_of(
    q,
    v,
    has_state: bool,
    *,
    phase="fwd",
    request="auto",
    chunk=0,
    backend: str | None = None,
    state_out: bool = True,
    scale: float = 1.0,
) -> Problem:
    """The planning problem of one call; ``backend`` None asks dispatch (aten or Triton)."""
    from . import dispatch

    B, H, T, K = q.shape
    if backend is None:
        backend = "triton" if dispatch.use_triton(q, v, scale) else "aten"
    return Problem(
        B, H, T, K, v.shape[-1], _dtype_name(q.dtype), str(q.device), backend, has_state,
        phase, request, chunk, state_out,
    )  # fmt: skip


def plan_for(problem: Problem, *, tune: bool = False, force: bool = False) -> Plan:
    """Memo -> cache -> (benchmark when ``tune``) -> cost model. ``force`` re-benchmarks.

    An empty problem (``is_empty``) gets a rule without any of them: its timings would be noise
    stored for the bucket of real calls (B*H = 0 or T = 0 rounds up to a real bucket)."""
    p = problem
    if is_empty(p):
        form = p.request if p.request != "auto" else "parallel"
        return Plan(form, p.chunk or DEFAULT_CHUNK, "rule")
    # NOTE: what the cache key's device part varies with inside one process: the CPU thread
    # count (device_info); a device's name and capability are fixed by its string
    threads = torch.get_num_threads() if p.device == "cpu" else 0  # ~0.1 us
    memo_key = (next_pow2(p.T), next_pow2(p.B * p.H), p.K, p.V, p.dtype, p.device, p.backend,
                p.has_state, p.phase, p.request, p.chunk, p.state_out, tune, threads)  # fmt: skip
    found = None if force else _memo.get(memo_key)
    # NOTE: the memo is per bucket: a parallel plan a smaller call of it took may not fit this one
    if found is not None and (found.form != "parallel" or _parallel_fits(p)):
        return found
    from . import tune as _tune

    key = cache_key(problem)
    found = None if force else _from_cache(key, problem)
    if found is None and tune:
        found = _tune.autotune(problem, key)
    if found is None:
        found = dataclasses.replace(_tune.model_choice(problem.at_bucket()), source="model")
        counters["model"] += 1
        log.info("rtpcompile plan: %s for %s (cost model)", found.label, shape_text(problem))
    _memo[memo_key] = found
    return found


def _parallel_fits(problem: Problem) -> bool:
    from .cost import parallel_fits  # NOTE: cost imports this module

    return parallel_fits(problem)


def _from_cache(key: dict, problem: Problem) -> Plan | None:
    from ..kernels import cache

    value = cache.load(key)
    if value is not None and key["spec"]["backend"] == "triton" and value["config"]:
        reason = _config_problem(problem, value)
        if reason is not None:  # e.g. written by another version or by hand: re-tune, no crash
            log.warning("rtpcompile plan: ignoring cached kernel config (%s)", reason)
            value = None
    if value is not None and value["form"] == "parallel" and not _parallel_fits(problem):
        # NOTE: an entry serves its whole bucket (T and B*H up to 2x the tuned call's), and
        # may come from another machine or by hand: the memory rule holds at this call's shape
        log.warning(
            "rtpcompile plan: ignoring a cached parallel plan for %s: its T x T temporaries "
            "exceed the memory budget",
            shape_text(problem),
        )
        value = None
    if value is None:
        counters["cache_misses"] += 1
        return None
    counters["cache_hits"] += 1
    found = Plan(
        value["form"], value["chunk_size"], "cache", tuple(sorted(value["config"].items()))
    )
    log.info("rtpcompile plan: %s from the autotune cache (%s)", found.label, cache.key_id(key))
    return found


def _config_problem(problem: Problem, value: dict) -> str | None:
    """Why a cached Triton config is unusable for ``problem``'s bucket, or None: it must pass
    ``check_config`` and the tuner's resource rule (``tune.why_not_fits``), which pruned every
    config the tuner itself could have stored."""
    from ..kernels.spec import check_config, default_blocks, use_split
    from .tune import why_not_fits

    try:
        cfg = check_config(value["config"])
    except ValueError as exc:
        return str(exc)
    p, form, chunk = problem.at_bucket(), value["form"], value["chunk_size"]
    split = use_split(form, p.T, p.K, chunk, cfg, V=p.V, BH=p.B * p.H, dtype=p.dtype, phase=p.phase)
    blocks = default_blocks(form, p.K, p.V, chunk, split, dtype=p.dtype)
    full = {name: blocks[name] for name in ("BV", "num_warps", "num_stages")} | cfg
    why = why_not_fits(p, form, chunk, full)
    return None if why is None else f"{cfg} does not fit: {why}"


def shape_text(p: Problem) -> str:
    state = ", state in" if p.has_state else ""
    state += "" if p.state_out else ", no state out"
    return f"{p.phase} B={p.B} H={p.H} T={p.T} K={p.K} V={p.V} {p.dtype} {p.device}{state}"


# ----------------------------------------------------------------------------- cache keys


def cache_key(problem: Problem) -> dict:
    """The persistent cache key of ``problem``'s bucket (plain JSON data)."""
    from ..kernels import cache

    name, capability = device_info(problem.device)
    spec = {
        "op": "retention",
        "phase": problem.phase,
        "backend": problem.backend,
        "K": problem.K,
        "V": problem.V,
        "state_in": problem.has_state,
        "state_out": problem.state_out,
        "request": problem.request,
        "chunk": problem.chunk,
    }
    return {
        "version": cache.FORMAT_VERSION,
        "source": source_hash(problem.backend),
        "spec": spec,
        "device": name,
        "capability": capability,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dtype": problem.dtype,
        "bucket": problem.bucket(),
    }


def device_info(device: str) -> tuple[str, str]:
    """(device name, capability). On CPU the capability includes the intra-op thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return torch.cuda.get_device_name(dev), f"sm_{major}{minor}"
    if dev.type == "cpu":
        threads = torch.get_num_threads()
        return _cpu_name(), f"{torch.backends.cpu.get_cpu_capability()}/{threads}threads"
    return dev.type, "unknown"


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.lru_cache(maxsize=1)
def _triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=4)
def source_hash(backend: str) -> str:
    """Hash of the implementation whose timings are cached: aten forms or Triton templates."""
    here = Path(__file__).resolve().parent
    if backend == "triton":
        kernels = here.parent / "kernels"
        files = sorted(kernels.glob("templates/*.jinja"))
        # NOTE: blocks.py holds the default tiles and the fused/split rule that launch applies;
        # inline_constants.py and arguments.py shape every rendered template
        names = ("blocks.py", "spec.py", "launch.py", "inline_constants.py", "arguments.py")
        files += [kernels / name for name in names]
    else:
        files = [here / "aten_impl.py"]
    digest = hashlib.sha256(backend.encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()[:16]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
