"""Input checks for the public ops and the rtp op: every error names what was expected and what
came. The public ops check their arguments' structure (``check_qkv`` ...); the op itself checks
its structure again (``check_op_args``: a raw or compiled call reaches no public op) and gamma's
values (``check_gamma_values``), on real tensors, so a compiled model's gamma is checked too."""

from __future__ import annotations

import math
import numbers
import operator
import weakref

import torch
import torch.autograd.forward_ad as forward_ad

from ..options import CHUNK_ARG_MAX, FORMS

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [B, H, T, D], got {type(t)}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims [B, H, T, D], got {t.dim()} dims with shape {_shape(t)}"
            )
        if t.dtype not in _FLOATS:
            raise ValueError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
                + (" (complex inputs are not supported)" if t.is_complex() else "")
            )
    if q.shape[:3] != k.shape[:3] or q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k and v must agree in [B, H, T]; got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q and k must have the same head dim K; got q K={q.shape[3]}, k K={k.shape[3]}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims K and V must be >= 1; got K={q.shape[3]}, V={v.shape[3]}")


def _values_checkable(t: torch.Tensor) -> bool:
    # NOTE: nothing is checked while tracing (a value check would break the graph; the op's
    # implementation checks the real tensor at run time) or while capturing a CUDA graph.
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def gamma_range_error(values) -> str:
    return (
        f"gamma values must lie in [0, 1]; got {values} (a learnable decay must stay there: "
        "parametrise it, e.g. gamma = sigmoid(logit), which may underflow to 0: allowed)"
    )


def _gamma_shape_error(gamma: torch.Tensor, q: torch.Tensor) -> str:
    H, T = q.shape[1], q.shape[2]
    hint = ""
    if gamma.numel() == T != H:
        hint = (
            f"; q has T={T} where H is expected: the ops take [B, H, T, D] "
            "(transpose(1, 2) a [B, T, H, D] tensor)"
        )
    return f"gamma must have shape [{H}] (one decay per head), got {_shape(gamma)}{hint}"


def _check_gamma_values(gamma: torch.Tensor) -> None:
    """ValueError on CPU; on an accelerator a device-side assertion that never syncs the host.

    NOTE: the issue requires the op to do no host synchronisation on GPU (CUDA-graph safe), and
    a ValueError needs the values on the host, i.e. a sync per call (~10-50 us of stall that
    also ends any CPU/GPU overlap). On CUDA the check is therefore ``torch._assert_async``: it
    queues a tiny kernel and a bad gamma fails loudly at the next synchronising call, like an
    out-of-range index does (the CUDA context is then lost, which is acceptable for a
    programming error). CPU tensors keep the ValueError with the offending values; python
    floats are checked before any tensor exists.
    """
    if gamma.device.type == "cpu":
        # NOTE: in Python: H numbers, where four tensor ops cost ~15 us per call (the op checks
        # every compiled CPU call, whose gamma is a new tensor each time)
        values = gamma.tolist()
        if not all(0 <= x <= 1 for x in values):  # NaN compares False: rejected too
            raise ValueError(gamma_range_error(values))
        return
    assert_gamma_range(gamma, "(values on the device)")


def assert_gamma_range(gamma: torch.Tensor, values: str) -> None:
    """gamma in [0, 1] by an assertion that never syncs the host (on CPU, inside a compiled
    graph, it raises at the call); ``values`` stands for the values in the message."""
    ok = ((gamma >= 0) & (gamma <= 1)).all()
    torch._assert_async(ok, gamma_range_error(values))


def check_gamma(gamma, q) -> torch.Tensor:
    """Return gamma as a [H] floating tensor on q's device, or raise. A number becomes a tensor
    in q's accumulation dtype (float64 for float64 inputs); a tensor's values are checked by the
    op (``check_gamma_values``)."""
    H = q.shape[1]
    if isinstance(gamma, bool):
        raise ValueError(f"gamma must be a number in [0, 1] or a [{H}] tensor, got {gamma!r}")
    if isinstance(gamma, numbers.Real):
        if not 0.0 <= _as_float(gamma, "gamma must be a number in [0, 1]") <= 1.0:
            raise ValueError(gamma_range_error([float(gamma)]))
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return torch.full((H,), float(gamma), device=q.device, dtype=dtype)
    if not isinstance(gamma, torch.Tensor):
        raise ValueError(
            f"gamma must be a tensor of shape [{H}] (one decay per head), got {type(gamma)}"
        )
    if gamma.dim() == 0:
        gamma = gamma.expand(H)
    if gamma.shape != (H,):
        raise ValueError(_gamma_shape_error(gamma, q))
    if not gamma.is_floating_point():
        raise ValueError(f"gamma must be a floating tensor, got {gamma.dtype}")
    if gamma.device != q.device:
        raise ValueError(f"gamma must be on {q.device} like q, got {gamma.device}")
    return gamma


def check_gamma_values(gamma: torch.Tensor) -> None:
    """gamma in [0, 1]: a ValueError on CPU, a device-side assertion elsewhere; nothing while
    tracing or capturing.

    NOTE: on CPU at every call (H numbers in Python, ~1 us). On an accelerator once per tensor
    and version (``_CHECKED``) for a gamma that takes no gradient and is no parameter (a buffer,
    a constant); one that does is what an optimizer updates, and a fused optimizer
    (``Adam(fused=True)``) writes it in place without bumping its version: checked at every
    call, and a parameter (frozen too) never gets the weak reference the cache keeps
    (``torch.utils.swap_tensors``, which ``module.to`` uses under
    ``set_swap_module_params_on_conversion``, refuses to swap a parameter that has one)."""
    if not _values_checkable(gamma):
        return
    if gamma.device.type == "cpu" or gamma.requires_grad or isinstance(gamma, torch.nn.Parameter):
        _check_gamma_values(gamma.detach())
    elif not _checked_before(gamma):
        _check_gamma_values(gamma.detach())
        _remember_checked(gamma)  # NOTE: after the check: a gamma that failed is checked again


def _finite(value) -> bool:
    """``math.isfinite`` for a float that may be symbolic.

    NOTE: Dynamo traces a float argument as a SymFloat under dynamic=True (and under automatic
    dynamic once a second value is seen), and reports it as a plain float. ``math.isfinite`` on
    it is no graph op: a graph break, an error under fullgraph=True. Comparisons are: on a
    concrete float they are the check itself (NaN compares False), on a symbolic one they hold
    for any real value and add no guard. The op's ``float`` argument then specialises the
    scale (torch has no symbolic float schema type), and its run-time call checks the value."""
    return -math.inf < value < math.inf


def check_scale(scale, K: int) -> float:
    """The scale as a finite Python float; None is K**-0.5."""
    if scale is None:
        return K**-0.5
    if isinstance(scale, torch.Tensor):
        check_scale_tensor(scale)
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.Tensor)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    value = _as_float(scale, "scale must be a finite number")
    if not _finite(value):
        raise ValueError(f"scale must be a finite number or None, got {value}")
    return value


def _as_float(number, expected: str) -> float:
    """``float(number)``, with a ValueError for an int too large for a float (``10**400``)."""
    try:
        return float(number)
    except OverflowError:
        size = getattr(number, "bit_length", None)
        got = f"an int of {size()} bits" if size is not None else f"{number!r}"[:80]
        raise ValueError(f"{expected}, got {got}") from None


def check_scale_tensor(scale: torch.Tensor) -> None:
    """A tensor scale holds one real number with a value (not on meta) and takes no gradient."""
    if scale.dtype == torch.bool or scale.is_complex() or scale.is_meta:
        raise ValueError(
            "scale must be a finite number or None, got a "
            f"{'meta ' if scale.is_meta else ''}{scale.dtype} tensor"
        )
    if scale.requires_grad or scale.numel() != 1:
        raise ValueError(
            "scale must be a Python number (a learnable scale is not supported: scale q "
            f"instead), got a tensor of shape {_shape(scale)}"
            + (" that requires grad" if scale.requires_grad else "")
        )


def check_op_args(q, k, v, gamma, scale, form, chunk_size, initial_state=None) -> None:
    """What the rtp op itself needs beyond its schema's types (also checked on fake tensors):
    a raw call gets the public ops' messages, not an IndexError from deep inside a form."""
    # NOTE: the public ops have just run check_qkv/check_state (~5 us per decode step); here a
    # consistent call costs a few comparisons, and only a bad one pays for the full messages
    if not _consistent(q, k, v, initial_state):
        check_qkv(q, k, v)
        check_state(initial_state, q, v)
    check_form(form)
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: the planner decides), got {chunk_size}")
    if gamma.dim() > 1 or gamma.numel() != q.shape[1]:
        raise ValueError(_gamma_shape_error(gamma, q))
    if not gamma.is_floating_point():
        raise ValueError(f"gamma must be a floating tensor, got {gamma.dtype}")
    if gamma.device != q.device:
        raise ValueError(f"gamma must be on {q.device} like q, got {gamma.device}")
    if not _finite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if isinstance(scale, float) and scale and q.dtype != torch.float64:
        if not _MIN_SCALE <= abs(scale) <= _F32_MAX:
            raise ValueError(
                "scale must be 0 or of magnitude in [2**-127, 3.4e38] (float32's range, "
                f"as the kernels take it) for {q.dtype} inputs, got {scale!r}: the op applies it "
                "in float32, where it would turn the output to 0, inf or NaN; scale q instead, or "
                "use float64"
            )


# NOTE: once, not per call; the aten forms multiply float32 accumulators by the scale, and
# the kernels' smallest scale (kernels.MIN_SCALE: 1 / scale stays a float32 number) is the floor
_MIN_SCALE = 2.0**-127
_F32_MAX = torch.finfo(torch.float32).max


def _consistent(q, k, v, state) -> bool:
    """q, k, v of one 4-D shape family, dtype and device, and a state [B, H, K, V] (or none).

    NOTE: every tensor attribute read costs ~0.3 us here: each is read once."""
    qs, vs, dtype, device = q.shape, v.shape, q.dtype, q.device
    if len(qs) != 4 or len(vs) != 4 or k.shape != qs or vs[:3] != qs[:3]:
        return False
    if dtype not in _FLOATS or k.dtype != dtype or v.dtype != dtype or 0 in (qs[3], vs[3]):
        return False
    if k.device != device or v.device != device:
        return False
    if state is None:
        return True
    shape = (qs[0], qs[1], qs[3], vs[3])
    return state.shape == shape and state.is_floating_point() and state.device == device


# NOTE: id(gamma) -> (weak reference, version counter) of the accelerator gammas without a
# gradient already checked. A decode loop passes the same gamma every step; re-checking it costs
# ~5 small kernel launches per call. An in-place change bumps the version (a write through
# ``.data`` does not, like autograd's own checks; a learnable gamma, which a fused optimizer
# writes without a new version, is not cached at all). Keyed by id with the weak reference
# confirming identity: a WeakKeyDictionary would compare tensors with ==.
_CHECKED: dict[int, tuple[weakref.ref, int]] = {}
_CHECKED_MAX = 256


def _checked_before(gamma: torch.Tensor) -> bool:
    if gamma.is_inference():  # NOTE: no version counter; checked every call
        return False
    entry = _CHECKED.get(id(gamma))
    return entry is not None and entry[0]() is gamma and entry[1] == gamma._version


def _remember_checked(gamma: torch.Tensor) -> None:
    if gamma.is_inference():
        return
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[id(gamma)] = (weakref.ref(gamma), gamma._version)


def check_no_forward_ad(*tensors) -> None:
    """Forward-mode AD (``torch.func.jvp``, ``forward_ad.dual_level``) is not supported: torch's
    custom ops have no forward-mode formula and would return a zero tangent, so refuse it."""
    # NOTE: _current_level is -1 outside any dual level (a module attribute: free to read)
    if forward_ad._current_level < 0 or torch.compiler.is_compiling():
        return
    if any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            "rtpcompile ops support reverse-mode autograd only: forward-mode AD (torch.func.jvp, "
            "forward_ad) would give a zero tangent; use .backward() or torch.autograd.grad"
        )


def check_state(state, q, v, name: str = "initial_state") -> None:
    if state is None:
        return
    B, H, _, K = q.shape
    V = v.shape[-1]
    if not isinstance(state, torch.Tensor):
        raise ValueError(
            f"{name} must be a tensor of shape [{B}, {H}, {K}, {V}], got {type(state)}"
        )
    if tuple(state.shape) != (B, H, K, V):
        raise ValueError(
            f"{name} must have shape [B, H, K, V] = [{B}, {H}, {K}, {V}], got {_shape(state)}"
        )
    if not state.is_floating_point():
        raise ValueError(f"{name} must be floating (float32 expected), got {state.dtype}")
    if state.device != q.device:
        raise ValueError(f"{name} must be on {q.device} like q, got {state.device}")


def check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")


@torch.compiler.disable(
    reason="rtpcompile: chunk_size is a tensor (its value is not known while tracing), so it is "
    "read eagerly at a graph break; pass a Python int (int(chunk_size)) to compile the call whole"
)
def _tensor_chunk_size(chunk_size: torch.Tensor) -> int:
    """A tensor chunk size read on the host, outside the trace: one graph break, after which
    the trace goes on with the int (a break inside the check resumed there and broke again)."""
    return check_chunk_size(chunk_size)


def check_chunk_size(chunk_size) -> int:
    """A positive integer up to 2**63 - 1 (the op's int64; a Python int, or a numpy/torch integer
    scalar: ``operator.index``) or None (0: the planner decides)."""
    if chunk_size is None:
        return 0
    traced = torch.compiler.is_compiling() and not isinstance(chunk_size, bool)
    if traced and isinstance(chunk_size, int):
        # NOTE: traced, an int may be a size computed from T (``max(16, T // 4)``, which Dynamo
        # shows as an int): checked without a guard, so it does not specialise T (one graph
        # per length); the op checks the value again when it runs
        torch._check(chunk_size >= 1, lambda: "chunk_size must be a positive int")
        torch._check(chunk_size <= CHUNK_ARG_MAX, lambda: "chunk_size must be at most 2**63 - 1")
        return chunk_size
    if isinstance(chunk_size, torch.Tensor) and torch.compiler.is_compiling():
        # NOTE: a graph break, not a ValueError: Dynamo swallowed the error ("Observed
        # exception"), ran the call eagerly without a word, and fullgraph=True named no cause
        return _tensor_chunk_size(chunk_size)
    value = None
    # NOTE: a tensor's __index__ takes any one-element integer or bool tensor (``tensor([3])``,
    # ``tensor(True)``): only an integer scalar counts, as a numpy one does
    scalar = not isinstance(chunk_size, torch.Tensor) or (
        chunk_size.dim() == 0 and chunk_size.dtype != torch.bool
    )
    if not isinstance(chunk_size, bool) and scalar:
        try:
            value = operator.index(chunk_size)
        except TypeError:
            value = None
    if value is None or not 1 <= value <= CHUNK_ARG_MAX:
        raise ValueError(_chunk_error(chunk_size))
    return value


def _chunk_error(chunk_size) -> str:
    return (
        f"chunk_size must be a positive int or None (an int at most 2**63 - 1), got {chunk_size!r}"
    )
