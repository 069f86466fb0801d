"""Eager calls of the public ops without the custom op's dispatch.

A public op (``rtpcompile.ops``) called eagerly, outside any tracing, runs the forward op's
implementation through an ``autograd.Function`` whose backward runs the backward op's
implementation: the same code, planner and kernels as ``torch.ops.rtp.retention_fwd``, minus
torch's custom-op layers (the autograd kernel's redispatch, default filling, the aliasing check
and the Dynamo-disable wrapper around each implementation): about a third of the host time of
a chunkwise forward+backward on the CPU machine with the launches mocked
(``benchmarks/call_overhead.py`` times both ways). An eager GPU call whose kernels finish
faster than the host can launch them is bound by exactly such host time.

Whenever anything might watch the call it goes through the op instead, so what a tracer, a
transform or a tool sees is unchanged: under ``torch.compile`` / ``torch.export`` (Dynamo),
``torch.jit.trace``, any torch dispatch mode (FakeTensorMode, make_fx, FunctionalTensorMode,
selective activation checkpointing, FLOP counters), any torch function mode, functorch
transforms (vmap, grad, jvp), tensor subclasses (DTensor, fake tensors), tensors with a lazy
negation or conjugation bit (``z.conj().imag``), autocast and the profiler (whose traces then
keep the op's name). The backward asks again when it runs: compiled autograd, batched gradients
(``is_grads_batched``, vectorised jacobians) and a profiler around the backward get the backward
op. ``RTP_EAGER_BYPASS=0`` sends every call through the op. Results are bitwise the same either
way (``tests/test_eager_bypass.py``); a second backward through a call raises in both (the
backward op has no autograd formula). One difference in work, not in results: an output the
loss does not use reaches the bypass's backward as None, where the op's generated autograd
fills a zero gradient for it.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import custom_ops

Tensor = torch.Tensor
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def bypass_enabled(environ=os.environ) -> bool:
    """``RTP_EAGER_BYPASS`` (default on); "0"/"false"/"no"/"off": eager calls go through the op."""
    raw = environ.get("RTP_EAGER_BYPASS")
    if raw is None:
        return True
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on", ""):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(
        f"environment variable RTP_EAGER_BYPASS must be a boolean (1/0/true/false), got {raw!r}"
    )


@contextlib.contextmanager
def bypassing(on: bool):
    """``RTP_EAGER_BYPASS`` set to ``on`` inside the block (its old value restored after): to
    compare the two paths, or to send a block's eager calls through the op."""
    old = os.environ.get("RTP_EAGER_BYPASS")
    os.environ["RTP_EAGER_BYPASS"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RTP_EAGER_BYPASS", None)
        else:
            os.environ["RTP_EAGER_BYPASS"] = old


def _watched() -> bool:
    """Whether anything might trace or watch an op call made now."""
    return bool(
        torch._C._len_torch_dispatch_stack()  # user and infra (fake, proxy, functional) modes
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None  # vmap, grad, batched grads
        or torch._C._get_tracing_state() is not None
        or torch._C._is_any_autocast_enabled()
        or torch._C._autograd._profiler_enabled()
    )


def _plain(tensors) -> bool:
    """Tensors the implementation may read as stored: no subclass, no lazy negation,
    conjugation or zero tensor (the dispatcher materialises those before an op's kernel; the
    Triton kernels would read the stored values, without the sign), and no batched tensor of
    the legacy vmap that ``autograd.grad(..., is_grads_batched=True)`` runs a backward under."""
    for t in tensors:
        if t is not None and (
            type(t) not in _PLAIN
            or t.is_neg()
            or t.is_conj()
            or t._is_zerotensor()
            or torch._C._functorch.is_legacy_batchedtensor(t)
        ):
            return False
    return True


def bypasses(tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether a call on ``tensors`` may skip the op: plain eager execution, nothing watching."""
    # NOTE: first, so Dynamo folds it to False and traces none of the host-only checks below
    if torch.compiler.is_compiling():
        return False
    return not _watched() and _plain(tensors) and bypass_enabled()


class _Retention(torch.autograd.Function):
    """``rtp::retention_fwd`` with its registered autograd formula, called directly."""

    # NOTE: the forward takes ctx (no separate setup_context): apply would otherwise bind the
    # arguments to the signature through inspect on every call (~30 us)
    @staticmethod
    def forward(ctx, *inputs):
        output = custom_ops.forward_impl(*inputs)
        custom_ops._setup_context(ctx, inputs, output)
        # NOTE: an output the loss does not use (a returned final state, often) gets None, not a
        # zero tensor autograd fills: one launch less, and no backward pass starts from zeros
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, do, dsf):
        # NOTE: the backward is watched on its own (compiled autograd traces it, batched
        # gradients run it under vmap, a profiler may start after the forward): the backward op
        # then, as when it gets a graph to build (create_graph=True: its gradients raise "no
        # autograd formula" if differentiated, as the op's do, where the implementation's would
        # silently drop the second-order term)
        if do is None:  # only the final state reached the loss
            q, _, v = ctx.saved_tensors[:3]  # NOTE: one unpack of the saved tensors
            do = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype)
        direct = not torch.is_grad_enabled() and bypasses((do, dsf))
        bwd = custom_ops.backward_impl if direct else torch.ops.rtp.retention_bwd
        return custom_ops.backward_with(bwd, ctx, do, dsf)


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
) -> tuple[Tensor, Tensor]:
    """``torch.ops.rtp.retention_fwd(...)``'s result, through the op only where ``bypasses``
    says something may be watching the call."""
    args = (q, k, v, gamma, scale, initial_state, form, chunk_size, output_final_state)
    tensors = (q, k, v, gamma, initial_state)
    if not bypasses(tensors):
        return torch.ops.rtp.retention_fwd(*args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors):
        return _Retention.apply(*args, "")
    return custom_ops.forward_impl(*args)
