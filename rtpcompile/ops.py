"""Public retention ops. Layout [B, H, T, D]; K = q/k head dim, V = v head dim.

    o_t = scale * sum_{s <= t} gamma^(t - s) (q_t . k_s) v_s              (per head)
    S_t = gamma * S_{t-1} + k_t^T v_t ,   o_t = scale * q_t S_t

Every form computes the same function; they differ in cost. Low-precision inputs accumulate in
float32 and states are float32 (float64 for float64 inputs). ``gamma`` is a per-head tensor in
[0, 1] (0 included: 0**0 = 1) and receives a gradient. Each op is one
``torch.ops.rtp.retention_fwd`` call, so it composes with ``torch.compile`` without graph breaks;
an eager call with nothing tracing or watching it runs the op's implementation directly, without
the custom op's dispatch (``lowering/eager.py``: the same results, less host time).
"""

from __future__ import annotations

import numbers

import torch

from .lowering import (
    custom_ops,  # noqa: F401  (registers torch.ops.rtp.*)
    eager,
    validate,
)

Tensor = torch.Tensor


def retention_init_decay(num_heads: int, device=None, dtype=torch.float32) -> Tensor:
    """The RetNet multi-scale decay: gamma_h = 1 - 2**(-5 - h), shape [num_heads].

    ``dtype`` float32 or float64: a 16-bit decay rounds to 1.0 (no decay) from head 4 in
    bfloat16 and head 7 in float16, so it is refused; the ops take a float32 gamma with 16-bit
    q, k, v (as ``nn.MultiScaleRetention`` keeps its decays)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"dtype must be torch.float32 or torch.float64, got {dtype}: gamma = 1 - 2**(-5 - h) "
            "rounds to 1.0 (no decay) from head 4 in bfloat16 and head 7 in float16; keep the "
            "decay in float32 (the ops accept a float32 gamma with 16-bit q, k, v)"
        )
    exponents = -5.0 - torch.arange(int(num_heads), dtype=torch.float64, device=device)
    return (1.0 - torch.pow(2.0, exponents)).to(dtype)


def retention_init_state(batch: int, num_heads: int, k_dim: int, v_dim: int, device=None) -> Tensor:
    """A zero recurrent state, float32 [batch, num_heads, k_dim, v_dim]; batch and num_heads may
    be 0 (the ops take B = 0 and H = 0), k_dim and v_dim are at least 1."""
    for name, n, least in (
        ("batch", batch, 0),
        ("num_heads", num_heads, 0),
        ("k_dim", k_dim, 1),
        ("v_dim", v_dim, 1),
    ):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < least:
            wanted = "a positive int" if least else "an int >= 0"
            raise ValueError(f"{name} must be {wanted}, got {n!r}")
    sizes = (int(batch), int(num_heads), int(k_dim), int(v_dim))
    return torch.zeros(*sizes, dtype=torch.float32, device=device)


def _call(q, k, v, gamma, scale, initial_state, form, chunk_size, state_out=True):
    validate.check_qkv(q, k, v)
    gamma = validate.check_gamma(gamma, q)
    if gamma.device.type != "cpu":  # NOTE: CPU gammas are checked by the op itself
        validate.check_gamma_values(gamma)
    validate.check_state(initial_state, q, v)
    validate.check_no_forward_ad(q, k, v, gamma, initial_state)
    validate.check_form(form)
    chunk = validate.check_chunk_size(chunk_size)
    if isinstance(scale, Tensor) and torch.compiler.is_compiling():
        # NOTE: traced, a tensor's value is data the op's float argument cannot take (an error
        # under fullgraph and torch.export): q carries it instead (retention is linear in q)
        validate.check_scale_tensor(scale)
        torch._assert_async(torch.isfinite(scale).all(), "scale must be a finite number")
        q, scale = q * scale.reshape(()).to(q.dtype), 1.0
    scale = validate.check_scale(scale, q.shape[-1])
    # NOTE: a state nobody asked for is not computed (the parallel form skips a whole pass)
    # NOTE: eagerly, with nothing tracing or watching, the op's implementation without its
    # dispatch (host cost: eager.py); traced, always the op
    return eager.retention_fwd(q, k, v, gamma, scale, initial_state, form, chunk, state_out)


def retention_parallel(
    q: Tensor, k: Tensor, v: Tensor, gamma, scale: float | None = None
) -> Tensor:
    """Whole-sequence form ``scale * ((Q K^T) * D) V``: O(T^2) memory, best for short T."""
    o, _ = _call(q, k, v, gamma, scale, None, "parallel", None, state_out=False)
    return o


def retention_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    scale: float | None = None,
):
    """Parallel inside chunks, recurrent across them: O(T) memory. Returns (o, final_state|None).

    With ``initial_state`` it continues a sequence exactly; the final state equals the
    recurrent state after the same tokens.
    """
    o, s = _call(q, k, v, gamma, scale, initial_state, "chunkwise", chunk_size, output_final_state)
    return o, (s if output_final_state else None)


def retention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, gamma, state: Tensor | None, scale: float | None = None
):
    """Token-by-token form for decoding (any T >= 1). Returns (o, new_state); state float32."""
    return _call(q, k, v, gamma, scale, state, "recurrent", None)


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma,
    form: str = "auto",
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
):
    """Retention in the given form; "auto" lets the planner pick from the real shapes at run time.

    Returns ``o``, or ``(o, final_state)`` when ``output_final_state`` is True.
    """
    o, s = _call(q, k, v, gamma, scale, initial_state, form, chunk_size, output_final_state)
    return (o, s) if output_final_state else o
