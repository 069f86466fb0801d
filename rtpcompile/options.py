"""Backend and runtime options: from ``options={...}`` and ``RTP_*`` environment variables.

An unknown option or a bad value is a ValueError that lists the valid ones. Environment
variables are read at call time so tests and users can change them without re-importing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import operator
import os
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

FORMS = ("auto", "parallel", "chunkwise", "recurrent")
KERNELS = ("auto", "aten", "triton")
LOG_LEVELS = ("off", "info", "debug")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclasses.dataclass(frozen=True)
class Options:
    """Every option the backend and the rtp ops understand.

    form:      force one lowering for every claimed region ("auto": the planner decides per call)
    strict:    raise on anything detection or rewrite cannot handle instead of falling back
    verify:    on the first call, run each region's original subgraph beside the op and compare
    kernels:   "auto" (Triton on CUDA, aten on CPU), "aten", or "triton" (also on CPU tensors under
               TRITON_INTERPRET=1 — how CI tests the kernels)
    autotune:  benchmark candidate lowerings once per shape bucket and remember the winner
    chunk_size: force the chunk size of the chunkwise form (None: planner decides); in the
               options dict it is frozen into the rewritten regions, RTP_CHUNK_SIZE is read by
               the planner at every call
    log:       "off" | "info" | "debug" for the ``rtpcompile`` logger: RTP_LOG for the process,
               the options dict for that compile's own messages (and its verify check) only
    """

    form: str = "auto"
    strict: bool = False
    verify: bool = False
    kernels: str = "auto"
    autotune: bool = False
    chunk_size: int | None = None
    log: str = "off"


_CHOICES: dict[str, tuple[str, ...]] = {"form": FORMS, "kernels": KERNELS, "log": LOG_LEVELS}
# NOTE: the op's chunk_size is an int64 in its schema; a larger one would fail inside torch
CHUNK_ARG_MAX = 2**63 - 1
FIELDS = tuple(f.name for f in dataclasses.fields(Options))


def _coerce(name: str, value: Any, source: str) -> Any:
    """``value`` as option ``name``'s type. Text is taken without surrounding blanks and case
    (" Parallel" is "parallel", " 16" is 16); a number is ASCII digits only ("１６" is refused)."""
    default = getattr(Options(), name)
    if name in _CHOICES:
        value = str(value).strip().lower()
        if value not in _CHOICES[name]:
            raise ValueError(
                f"{source}: option {name!r} must be one of {list(_CHOICES[name])}, got {value!r}"
            )
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(
            f"{source}: option {name!r} must be a boolean (1/0/true/false), got {value!r}"
        )
    if name == "chunk_size":
        if value is None or value == "":
            return None
        # NOTE: a whole number only: int(3.7) or int(True) would pass a wrong size silently
        size = -1
        text = value.strip() if isinstance(value, str) else ""
        if text.isascii() and text.isdigit():  # NOTE: str.isdigit alone takes "１６" and "²"
            size = int(text)
        elif not isinstance(value, (bool, str)):
            try:
                size = operator.index(value)  # ints, numpy integers, integer 0-dim tensors
            except TypeError:
                pass
        if not 1 <= size <= CHUNK_ARG_MAX:
            raise ValueError(
                f"{source}: option 'chunk_size' must be a positive integer (at most 2**63 - 1), "
                f"got {value!r}"
            )
        return size
    return value


# Other RTP_* variables rtpcompile reads (not options): a name outside both is a likely typo.
OTHER_VARIABLES = (
    "RTP_CACHE", "RTP_CACHE_DIR", "RTP_DUMP_KERNELS", "RTP_PROOF_MAX_GB", "RTP_TUNE_CONFIGS",
    "RTP_SHOW_OPS", "RTP_VENV", "RTP_ZOO_BACKEND", "RTP_EAGER_BYPASS",
    # NOTE: read by make test and benchmarks/gpu_session.sh, which run rtpcompile processes
    "RTP_TEST_WORKERS", "RTP_GPU_WORKERS", "RTP_GPU_TEST_LIMIT",
)  # fmt: skip
_WARNED: set[str] = set()


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """One warning per unknown ``RTP_*`` variable (``RTP_FORMS=parallel`` would do nothing)."""
    known = {f"RTP_{name.upper()}" for name in FIELDS} | set(OTHER_VARIABLES)
    for key in environ:
        if key.startswith("RTP_") and key not in known and key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"rtpcompile: unknown environment variable {key} is ignored; options are "
                f"{sorted(known - set(OTHER_VARIABLES))}, other variables {list(OTHER_VARIABLES)}",
                stacklevel=3,
            )


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options set through ``RTP_<NAME>`` environment variables (an unknown ``RTP_*`` name
    is a warning: other tools may share the prefix, so it is not an error)."""
    environ = os.environ if environ is None else environ
    _warn_unknown(environ)
    check_variables(environ)
    found = {}
    for name in FIELDS:
        key = f"RTP_{name.upper()}"
        # NOTE: a blank variable (``RTP_FORM=``) is unset, for every option (an empty
        # RTP_FORM/RTP_KERNELS/RTP_LOG was an error while an empty RTP_CHUNK_SIZE was unset)
        if environ.get(key, "").strip():
            found[name] = _coerce(name, environ[key], f"environment variable {key}")
    return found


def check_variables(environ: Mapping[str, str]) -> None:
    """A ValueError for a bad value of an ``RTP_*`` variable read deep inside a stage (the mask
    proof's budget, the tuner's config space), so it fails up front like a bad option: at
    compile time (``resolve``) and at an op call (``current``), never caught by a fallback."""
    raw = environ.get("RTP_PROOF_MAX_GB")
    if raw:  # NOTE: the rule of detect.memory_budget.proof_budget, which reads it
        try:
            gib = float(raw)
        except ValueError:
            gib = math.nan
        if not (math.isfinite(gib) and gib > 0):
            raise ValueError(
                f"environment variable RTP_PROOF_MAX_GB must be a positive number of GiB, "
                f"got {raw!r}"
            )
    raw = environ.get("RTP_DUMP_KERNELS")
    if raw and os.path.exists(raw) and not os.path.isdir(raw):
        # NOTE: only what a stat can tell; a directory that cannot be created or written is a
        # warning when the first kernel is dumped (kernels.codegen), the kernels still run
        raise ValueError(
            f"environment variable RTP_DUMP_KERNELS must name a directory to write generated "
            f"kernel sources into (created when missing), got {raw!r}, which is not a directory"
        )
    raw = environ.get("RTP_CACHE")
    if raw is not None:
        # NOTE: the rule of kernels.cache.mode, which reads it only when the planner reaches the
        # cache: after its in-process memo, so a bad value failed or passed by call history
        from .kernels import cache

        text = raw.strip().lower()
        if cache._MODE_ALIASES.get(text, text) not in cache.MODES:
            raise ValueError(
                f"environment variable RTP_CACHE must be one of {list(cache.MODES)} (or 1/0), "
                f"got {text!r}"
            )
    raw = environ.get("RTP_CACHE_DIR")
    if raw:
        try:  # NOTE: kernels.cache._absolute's expansion; "~nosuchuser/x" raises RuntimeError
            pathlib.Path(raw).expanduser()
        except RuntimeError as exc:
            raise ValueError(
                f"environment variable RTP_CACHE_DIR must be a directory path, got {raw!r}: "
                f"its ~ cannot be expanded ({exc})"
            ) from None
    if environ.get("RTP_EAGER_BYPASS") is not None:
        from .lowering import eager  # NOTE: lazily: lowering imports this module

        eager.bypass_enabled(environ)
    raw = environ.get("RTP_TUNE_CONFIGS")
    if raw is not None:
        from .lowering.tune import CONFIG_SPACES  # NOTE: lazily: lowering imports this module

        if (raw.strip().lower() or "auto") not in CONFIG_SPACES:
            raise ValueError(
                f"environment variable RTP_TUNE_CONFIGS must be one of {list(CONFIG_SPACES)}, "
                f"got {raw!r}"
            )


def _inductor_hint(names: list[str]) -> str:
    """A hint when an unknown option is an Inductor setting (``options=`` of backend="inductor")."""
    import torch._inductor.config as inductor_config

    if not any(hasattr(inductor_config, name.replace("-", "_")) for name in names):
        return ""
    return (
        ". Inductor settings are not passed through the rtp backend's options: set them with "
        "torch._inductor.config.patch(...) around the compiled calls, or use "
        "torch.compile(..., mode=...) with the rtp options given as RTP_* environment variables "
        "(torch refuses mode= together with options=)"
    )


def resolve(options: Mapping[str, Any] | None = None) -> Options:
    """Defaults, then ``RTP_*`` variables, then explicit ``options`` (highest priority)."""
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(
            f"rtp options must be a dict of option names to values (valid names: "
            f"{list(FIELDS)}), got a {type(options).__name__}: {options!r}"
        )
    options = dict(options or {})
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"unknown rtp option(s) {unknown}; valid options are {list(FIELDS)}"
            + _inductor_hint(unknown)
        )
    values = from_env()
    for name, value in options.items():
        values[name] = _coerce(name, value, "options")
    return Options(**values)


# NOTE: the variables check_variables validates too, so a changed value is checked again
_CHECKED = (
    "RTP_PROOF_MAX_GB", "RTP_TUNE_CONFIGS", "RTP_DUMP_KERNELS", "RTP_CACHE", "RTP_CACHE_DIR",
    "RTP_EAGER_BYPASS",
)  # fmt: skip
_ENV_KEYS = tuple(f"RTP_{name.upper()}" for name in FIELDS) + _CHECKED
_ENCODED_KEYS = tuple(map(getattr(os.environ, "encodekey", str), _ENV_KEYS))


def _env_values() -> tuple:
    """The raw ``RTP_*`` values: the memo key of ``current``."""
    # NOTE: os.environ.get encodes the key and decodes the value on every lookup (~1.5 us each,
    # 11 us for seven); os.environ's backing dict answers the same question in < 1 us. Both see
    # exactly what os.environ sees (changes through os.environ, not a C library's setenv).
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        return tuple(map(data.get, _ENCODED_KEYS))
    return tuple(map(os.environ.get, _ENV_KEYS))


# The run-time options a compiled graph's op calls carry (``runtime_text``): what the op reads
# besides the environment. Set by ``scoped`` around one op call.
RUNTIME = ("kernels", "autotune")
_SCOPED: contextvars.ContextVar[str] = contextvars.ContextVar("rtp_runtime_options", default="")


def runtime_text(options: Mapping[str, Any] | None) -> str:
    """The run-time options given explicitly in a backend's ``options`` dict, as the op's
    ``runtime_options`` argument ("kernels=triton;autotune=1"; "" when none)."""
    given = {name: _coerce(name, value, "options") for name, value in (options or {}).items()}
    return ";".join(f"{n}={int(given[n]) if n == 'autotune' else given[n]}" for n in RUNTIME
                    if n in given)  # fmt: skip


@contextlib.contextmanager
def scoped(text: str):
    """Inside the block ``current()`` also applies ``text`` (``runtime_text``) over the
    environment, as the backend's ``options`` dict did over it when the graph was compiled."""
    token = _SCOPED.set(text)
    try:
        yield
    finally:
        _SCOPED.reset(token)


def current() -> Options:
    """Options visible to the runtime ops: the environment, and the run-time options of the
    compiled op call being run (``scoped``)."""
    # NOTE: called on every op call; memoised on the raw RTP_* values so a change still applies.
    return _current_for(_env_values(), _SCOPED.get())


@functools.lru_cache(maxsize=16)
def _current_for(_env_values: tuple[str | None, ...], scoped_text: str = "") -> Options:
    current = resolve(parse_runtime_text(scoped_text) if scoped_text else None)
    if current.log != "off":
        # NOTE: RTP_LOG applied at an op call too (eager calls, ``rtpcompile tune``), not only at
        # a compile or explain; once per change of the RTP_* values (this function's memo)
        from .backend import configure_logging

        configure_logging(current.log)
    return current


def parse_runtime_text(text: str) -> dict[str, str]:
    """``runtime_text``'s inverse: {"kernels": "triton", ...}; a ValueError names a bad item."""
    found = {}
    for item in text.split(";"):
        name, sep, value = item.partition("=")
        if not sep or name not in RUNTIME:
            raise ValueError(
                f"runtime_options: expected ';'-separated NAME=VALUE items with NAME in "
                f"{list(RUNTIME)}, got {item!r} in {text!r}"
            )
        found[name] = value
    return found
