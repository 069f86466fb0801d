"""The rtp custom ops: ``rtp::retention_fwd`` and its backward ``rtp::retention_bwd``.

Both are opaque ``torch.library.custom_op``s, so Dynamo, AOTAutograd and Inductor treat them as
single nodes: the backward is its own op (AOTAutograd would otherwise inline it), fake
implementations return contiguous outputs, and the lowering is planned inside the op from real
shapes, so the compiled graph installs no shape guards. Inputs may have any strides.

``output_final_state=False`` (the ops that return no state, and rewritten regions without one)
returns an empty tensor in the state's place: the parallel form then skips the state-only pass
it would otherwise launch, no kernel stores the state, and autograd saves nothing [B, H, K, V]
for it.
"""

from __future__ import annotations

import contextlib

import torch

from .. import options as _options
from . import dispatch, plan, validate
from .aten_impl import accumulation_dtype

Tensor = torch.Tensor


def _planned(
    form, q: Tensor, v: Tensor, initial_state: Tensor | None, chunk_size: int, phase, state_out=True
):
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
    )


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
    validate.check_op_args(q, k, v, gamma, scale, form, chunk_size, initial_state)
    if gamma.device.type == "cpu":
        # NOTE: here, so compiled CPU calls are checked too; off the CPU the public ops check
        # (a device assertion per new gamma tensor would add launches to every compiled call)
        validate.check_gamma_values(gamma)
    if runtime_options:
        with _options.scoped(runtime_options):
            return _forward(q, k, v, gamma, scale, initial_state, form, chunk_size,
                            output_final_state)  # fmt: skip
    return _forward(q, k, v, gamma, scale, initial_state, form, chunk_size, output_final_state)


def _forward(q, k, v, gamma, scale, initial_state, form, chunk_size, output_final_state):
    p = _planned(form, q, v, initial_state, chunk_size, "fwd", output_final_state)
    o, final = dispatch.forward(
        p.form, q, k, v, gamma, scale, initial_state, p.chunk_size, p.config,
        state_out=output_final_state,
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dgamma, d_initial_state); without an initial state the last is an
    empty tensor (the schema needs a tensor; a [B, H, K, V] of zeros would be a memset launch per
    backward, and autograd returns None for the absent state anyway)."""
    scope = _options.scoped(runtime_options) if runtime_options else contextlib.nullcontext()
    with scope:
        p = _planned(form, q, v, initial_state, chunk_size, "bwd")
        dq, dk, dv, dgamma, ds0 = dispatch.backward(
            p.form, do, dsf, q, k, v, gamma, scale, initial_state, final_state, p.chunk_size,
            p.config,
        )  # fmt: skip
    if ds0 is None:
        ds0 = final_state.new_empty((0,))
    state_dtype = final_state.dtype if initial_state is None else initial_state.dtype
    return (
        dq.to(q.dtype).contiguous(),
        dk.to(k.dtype).contiguous(),
        dv.to(v.dtype).contiguous(),
        dgamma.to(gamma.dtype).reshape(gamma.shape).contiguous(),
        ds0.to(state_dtype).contiguous(),
    )


@retention_bwd.register_fake
def _(
    do, dsf, q, k, v, gamma, scale, initial_state, final_state, form, chunk_size,
    runtime_options="",
):  # fmt: skip
    state_dtype = final_state.dtype if initial_state is None else initial_state.dtype
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        torch.empty_like(gamma, memory_format=torch.contiguous_format),
        # NOTE: [B, H, K, V] from q and v: final_state is empty without a state output, and
        # a broadcastable initial_state ([1, H, K, V]) still gets a per-sequence gradient
        final_state.new_empty(
            (*q.shape[:2], q.shape[3], v.shape[3]) if initial_state is not None else (0,),
            dtype=state_dtype,
        ),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, gamma, scale, initial_state, form, chunk_size, output_final_state, runtime = inputs
    ctx.save_for_backward(q, k, v, gamma, initial_state, output[1])
    ctx.scale, ctx.form, ctx.chunk_size, ctx.runtime_options = scale, form, chunk_size, runtime
    ctx.has_state = initial_state is not None
    ctx.state_out = output_final_state


def _backward(ctx, do, dsf):
    q, k, v, gamma, initial_state, final_state = ctx.saved_tensors
    if not ctx.state_out:
        dsf = None  # NOTE: an empty output's gradient (AOTAutograd may materialise it) is nothing
    dq, dk, dv, dgamma, ds0 = torch.ops.rtp.retention_bwd(
        do, dsf, q, k, v, gamma, ctx.scale, initial_state, final_state, ctx.form, ctx.chunk_size,
        ctx.runtime_options,
    )  # fmt: skip
    return dq, dk, dv, dgamma, None, ds0 if ctx.has_state else None, None, None, None, None


retention_fwd.register_autograd(_backward, setup_context=_setup_context)
