"""The rtp custom ops: ``rtp::retention_fwd`` and its backward ``rtp::retention_bwd``.

Both are opaque ``torch.library.custom_op``s, so Dynamo, AOTAutograd and Inductor treat them as
single nodes: the backward is its own op (AOTAutograd would otherwise inline it), fake
implementations return contiguous outputs, and the lowering is planned inside the op from real
shapes, so the compiled graph installs no shape guards. Inputs may have any strides.

``output_final_state=False`` (the ops that return no state, and rewritten regions without one)
returns an empty tensor in the state's place: the parallel form then skips the state-only pass
it would otherwise launch, no kernel stores the state, and autograd saves nothing [B, H, K, V]
for it. The backward op's ``output_mask`` (from ``ctx.needs_input_grad``) skips the passes of
gradients nobody wants. Forward-mode AD is refused by the forward op's autograd kernel
(``_refusing_forward_ad``): torch would give a silent zero tangent.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as forward_ad

from .. import options as _options
from . import dispatch, plan, validate
from .aten_impl import accumulation_dtype

log = logging.getLogger("rtpcompile")

Tensor = torch.Tensor


def _planned(
    form, q: Tensor, v: Tensor, initial_state: Tensor | None, chunk_size: int, phase,
    state_out=True, scale: float = 1.0,
):  # fmt: skip
    # NOTE: forward and backward are planned separately: every form computes the same function,
    # so the backward may use another form than the forward if that is faster.
    return plan.choose(
        form,
        T=q.shape[2],
        has_state=initial_state is not None,
        chunk_size=chunk_size,
        q=q,
        v=v,
        phase=phase,
        state_out=state_out,
        scale=scale,
    )


# NOTE: the least shared memory a kernel can be launched with: BV 16, one stage (the float64
# parallel kernel at K = 256 takes 155,648-196,608 B by default, more than an A100 or an sm_86
# GPU gives a block; 98,304 B so, measured by kernels.aot for sm_80)
SMALLEST_CONFIG = (("BV", 16), ("num_stages", 1))


def _with_config(run, p: plan.Plan):
    """``run(config)`` with ``p``'s block configuration; one that Triton cannot launch
    (OutOfResources: the tuner's resource rule is an estimate, a default sized for Hopper) runs
    once more with the kernels' defaults, then with ``SMALLEST_CONFIG``, with a warning naming
    each. Other errors propagate, and so does the smallest configuration's."""
    # NOTE: () is the defaults; a plan tuned to the defaults or to the smallest tries each once
    tries = list(dict.fromkeys((p.config, (), SMALLEST_CONFIG)))
    for i, config in enumerate(tries):
        try:
            return run(config)
        except Exception as exc:
            out_of = "OutOfResources" in {c.__name__ for c in type(exc).__mro__}
            if not out_of or i == len(tries) - 1:
                raise
            then = dict(tries[i + 1]) or "the kernels' defaults"
            warnings.warn(
                f"rtpcompile: {plan.describe(p)} ran out of GPU resources ({exc}) with "
                f"{dict(config) or 'the defaults'}; running it with {then} "
                "(re-tune: rtpcompile tune --force)",
                RuntimeWarning,
                stacklevel=3,
            )
    raise AssertionError("unreachable")


def _no_state(q: Tensor) -> Tensor:
    """The state output of a call with ``output_final_state=False``: empty, the state's dtype."""
    return q.new_empty((0,), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("rtp::retention_fwd", mutates_args=())
def retention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    scale: float,
    initial_state: Tensor | None,
    form: str,
    chunk_size: int,
    output_final_state: bool = True,
    runtime_options: str = "",
) -> tuple[Tensor, Tensor]:
    """o[b,h,t] = scale * sum_{s<=t} gamma_h^(t-s) (q_t . k_s) v_s (+ state); returns (o, S_T),
    or (o, an empty tensor) with ``output_final_state=False``. ``runtime_options``: the
    compiling backend's explicit run-time options (``options.runtime_text``), applied over the
    environment for this call and its backward."""
    return forward_impl(
        q, k, v, gamma, scale, initial_state, form, chunk_size, output_final_state, runtime_options
    )


def forward_impl(
    q, k, v, gamma, scale, initial_state, form, chunk_size, output_final_state=True,
    runtime_options="",
):  # fmt: skip
    """The forward op's implementation (also what an eager public call runs, ``eager.py``)."""
    validate.check_op_args(q, k, v, gamma, scale, form, chunk_size, initial_state)
    if gamma.device.type == "cpu":
        # NOTE: here, so compiled CPU calls are checked too; off the CPU the public ops check
        # (a device assertion per new gamma tensor would add launches to every compiled call)
        validate.check_gamma_values(gamma)
    scope = _options.scoped(runtime_options) if runtime_options else contextlib.nullcontext()
    with scope, _own_precision(q):
        return _forward(q, k, v, gamma, scale, initial_state, form, chunk_size,
                        output_final_state)  # fmt: skip


def _own_precision(q: Tensor):
    """Autocast off inside the implementations: the op keeps its state and accumulates in
    float32 whatever the caller's autocast (its aten products ran in bfloat16 under an eager
    ``torch.autocast`` until 2026-11-25, state error 3e-3 instead of 4e-7); the inputs' own
    dtypes are what the op computes in, as under ``torch.compile``."""
    if torch._C._is_any_autocast_enabled():
        return torch.autocast(q.device.type, enabled=False)
    return contextlib.nullcontext()


def _forward(q, k, v, gamma, scale, initial_state, form, chunk_size, output_final_state):
    p = _planned(form, q, v, initial_state, chunk_size, "fwd", output_final_state, scale)
    o, final = _with_config(
        lambda config: dispatch.forward(
            p.form, q, k, v, gamma, scale, initial_state, p.chunk_size, config,
            state_out=output_final_state,
        ),
        p,
    )  # fmt: skip
    o = o.to(q.dtype).contiguous()
    if not output_final_state:
        return o, _no_state(q)
    return o, final.to(accumulation_dtype(q.dtype)).contiguous()


@retention_fwd.register_fake
def _(
    q, k, v, gamma, scale, initial_state, form, chunk_size, output_final_state=True,
    runtime_options="",
):  # fmt: skip
    validate.check_op_args(q, k, v, gamma, scale, form, chunk_size, initial_state)
    B, H, T, K = q.shape
    V = v.shape[-1]
    if not output_final_state:
        return q.new_empty((B, H, T, V)), _no_state(q)
    state = q.new_empty((B, H, K, V), dtype=accumulation_dtype(q.dtype))
    return q.new_empty((B, H, T, V)), state


@torch.library.custom_op("rtp::retention_bwd", mutates_args=())
def retention_bwd(
    do: Tensor,
    dsf: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    scale: float,
    initial_state: Tensor | None,
    final_state: Tensor,
    form: str,
    chunk_size: int,
    runtime_options: str = "",
    output_mask: Sequence[bool] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dgamma, d_initial_state); without an initial state the last is an
    empty tensor (the schema needs a tensor; a [B, H, K, V] of zeros would be a memset launch per
    backward, and autograd returns None for the absent state anyway). ``output_mask``: which of
    the five are wanted (None: all); an unwanted one is an empty tensor, and the passes only it
    needs are not run (``dispatch.backward``)."""
    return backward_impl(
        do, dsf, q, k, v, gamma, scale, initial_state, final_state, form, chunk_size,
        runtime_options, output_mask,
    )  # fmt: skip


def backward_impl(
    do, dsf, q, k, v, gamma, scale, initial_state, final_state, form, chunk_size,
    runtime_options="", output_mask=None,
):  # fmt: skip
    """The backward op's implementation (also what an eager public call's backward runs)."""
    needs = _needs(output_mask)
    scope = _options.scoped(runtime_options) if runtime_options else contextlib.nullcontext()
    with scope, _own_precision(q):
        p = _planned(form, q, v, initial_state, chunk_size, "bwd", scale=scale)
        grads = _with_config(
            lambda config: dispatch.backward(
                p.form, do, dsf, q, k, v, gamma, scale, initial_state, final_state,
                p.chunk_size, config, needs=needs,
            ),
            p,
        )  # fmt: skip
    state_dtype = final_state.dtype if initial_state is None else initial_state.dtype
    like = (q, k, v, gamma, final_state)
    dtypes = (q.dtype, k.dtype, v.dtype, gamma.dtype, state_dtype)
    out = []
    for i, grad in enumerate(grads):
        if grad is None or not needs[i]:
            out.append(like[i].new_empty((0,), dtype=dtypes[i]))
        else:
            grad = grad.reshape(gamma.shape) if i == 3 else grad
            out.append(grad.to(dtypes[i]).contiguous())
    return tuple(out)


def _needs(output_mask: Sequence[bool] | None) -> tuple[bool, ...]:
    if output_mask is None:
        return (True,) * 5
    if len(output_mask) != 5:
        raise ValueError(
            f"output_mask must have 5 entries (dq, dk, dv, dgamma, d_initial_state), got "
            f"{list(output_mask)}"
        )
    return tuple(bool(n) for n in output_mask)


@retention_bwd.register_fake
def _(
    do, dsf, q, k, v, gamma, scale, initial_state, final_state, form, chunk_size,
    runtime_options="", output_mask=None,
):  # fmt: skip
    needs = _needs(output_mask)
    state_dtype = final_state.dtype if initial_state is None else initial_state.dtype
    grads = [
        torch.empty_like(t, memory_format=torch.contiguous_format) if needs[i]
        else t.new_empty((0,))
        for i, t in enumerate((q, k, v, gamma))
    ]  # fmt: skip
    # NOTE: [B, H, K, V] from q and v: final_state is empty without a state output, and
    # a broadcastable initial_state ([1, H, K, V]) still gets a per-sequence gradient
    state = (*q.shape[:2], q.shape[3], v.shape[3])
    state = state if initial_state is not None and needs[4] else (0,)
    return (*grads, final_state.new_empty(state, dtype=state_dtype))


def _setup_context(ctx, inputs, output):
    q, k, v, gamma, scale, initial_state, form, chunk_size, output_final_state, runtime = inputs
    # NOTE: the final state is not saved (the backward reads only its dtype, q's accumulation
    # dtype): saving it kept a [B, H, K, V] alive until the backward, and made an in-place write
    # to the returned state (``state.zero_()``, a decode loop's buffer) fail the backward
    ctx.save_for_backward(q, k, v, gamma, initial_state)
    ctx.scale, ctx.form, ctx.chunk_size, ctx.runtime_options = scale, form, chunk_size, runtime
    ctx.has_state = initial_state is not None
    ctx.state_out = output_final_state


def _backward(ctx, do, dsf):
    return backward_with(torch.ops.rtp.retention_bwd, ctx, do, dsf)


def backward_with(retention_bwd, ctx, do, dsf):
    """The forward's gradients from ``ctx`` (``_setup_context``), computed by ``retention_bwd``:
    the backward op, or its implementation (an eager call, ``eager.py``)."""
    q, k, v, gamma, initial_state = ctx.saved_tensors
    final_state = _no_state(q)
    if not ctx.state_out:
        dsf = None  # NOTE: an empty output's gradient (AOTAutograd may materialise it) is nothing
    n = ctx.needs_input_grad
    needs = (n[0], n[1], n[2], n[3], n[5] and ctx.has_state)
    # NOTE: None when everything is wanted (no state: its gradient is empty anyway), so the
    # common call keeps the schema's default; otherwise the backward runs only the passes needed
    mask = None if all(needs[:4]) and (needs[4] or not ctx.has_state) else list(needs)
    grads = retention_bwd(
        do, dsf, q, k, v, gamma, ctx.scale, initial_state, final_state, ctx.form, ctx.chunk_size,
        ctx.runtime_options, mask,
    )  # fmt: skip
    dq, dk, dv, dgamma, ds0 = (g if want else None for g, want in zip(grads, needs, strict=True))
    return dq, dk, dv, dgamma, None, ds0, None, None, None, None


retention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _refusing_forward_ad(autograd_kernel):
    """The op's autograd kernel, refusing inputs that carry a forward-mode tangent.

    NOTE: torch's custom ops have no forward-mode formula: with a tangent on an input that does
    not require grad, the generated autograd kernel runs the op below autograd and the result
    has a zero tangent, silently (a tangent on an input that requires grad already raises
    torch's "implement the jvp function"). Only this kernel still sees the tangents
    (``torch.func.jvp`` unwraps its tensors before the op's implementation runs), so a raw call
    is refused here, as the public ops refuse it (``validate.check_no_forward_ad``).
    """

    def kernel(keyset, *args, **kwargs):
        if forward_ad._current_level >= 0:  # NOTE: -1 outside any dual level: one attribute read
            q, k, v, gamma, _, initial_state = args[:6]
            validate.check_no_forward_ad(q, k, v, gamma, initial_state)
        return autograd_kernel(keyset, *args, **kwargs)

    return kernel


# NOTE: registered for the per-backend autograd keys, which take precedence over the "Autograd"
# alias the custom op registered (overriding the alias itself warns at import); other devices
# keep the plain kernel: the public ops still refuse forward mode there.
_AUTOGRAD_KEYS = ("AutogradCPU", "AutogradCUDA", "AutogradXPU", "AutogradMeta")
_LIB = torch.library.Library("rtp", "IMPL")  # NOTE: module-level: registrations live with it


def _register_forward_ad_refusal() -> None:
    # NOTE: a private torch helper: on a torch where it is missing or differs, the raw op keeps
    # torch's own autograd kernel (the public ops still refuse forward mode); never an import error
    try:
        from torch._library.autograd import make_autograd_impl

        kernel = _refusing_forward_ad(make_autograd_impl(retention_fwd._opoverload, retention_fwd))
        for key in _AUTOGRAD_KEYS:
            _LIB.impl("retention_fwd", kernel, key, with_keyset=True)
    except Exception as exc:  # noqa: BLE001  # pragma: no cover - depends on the torch version
        log.debug("rtpcompile: raw rtp op calls cannot refuse forward-mode AD here (%s)", exc)


_register_forward_ad_refusal()
