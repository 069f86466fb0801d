"""Prove that a learnable mask's gradient is the one the op gives it.

The rewritten graph reads gamma = M[1, 0] / M[1, 1] and the row scale c_i = M[i, i] from the
mask's own nodes (rewrite.py), so the op differentiates every entry as c_i * gamma^(i - j):
d M[i, j] = M[i, j] * ((i - j) d gamma / gamma + d c_i / c_i), through the distance-1 pair and
the diagonal only. The value proof (mask_proof.py) shows the entries have that form, also once
trainable parameters move, but values cannot show a detach or a ``no_grad`` span on some
entries: ``where(d == 1, g.detach(), g ** d)`` has the values of ``g ** d`` and no gradient at
distance 1, so the op's gamma gradient was 0 where eager's was not.

Here the mask is evaluated with its trainable inputs as leaves, each node in the grad mode the
graph gives it, at every proof length from 3 on (and once with the parameters moved), and
eager's vector-Jacobian product for one random positive cotangent is compared, per parameter
element, with the op's: the same weighted sum with the mask's own values as coefficients, so no
power is recomputed and long masks compare to rounding. A positive cotangent keeps the terms of
one head and parameter of one sign (a decay's entries all move the same way), so an entry whose
gradient is cut cannot cancel against another.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .graph_view import GraphView, target_name
from .mask_eval import Sizes, evaluate, lengths_for, proof_bytes, subgraph
from .memory_budget import proof_budget
from .region_checks import grad_modes

# NOTE: evaluating with gradients keeps the subgraph's intermediates alive
_GRAD_BYTES_FACTOR = 4
_CUTS = {"detach", "detach_", "_get_data_attr", "requires_grad_", "data"}


def gradient_reason(
    view: GraphView,
    masks: list[fx.Node],
    transform,
    inputs: list,
    seq,
    row_scale: bool,
    fit_rtol: float,
) -> str | None:
    """Why the op's gradient of the mask would differ from eager's, or None. ``row_scale``: the
    op multiplies its rows by the diagonal (else it reads gamma alone); ``fit_rtol``: the value
    fit's tolerance, which says the least precise float the mask is computed in."""
    # NOTE: all float64: 1e-8; a float32 step (a float32 parameter): 1e-3, as the value fit,
    # which still sees a head whose far entries are cut (0.36% at d >= 7, gamma 0.3); 16-bit 5e-2
    rtol = 1e-8 if fit_rtol < 1e-6 else (5e-2 if fit_rtol >= 1e-2 else 1e-3)
    entry = torch.is_grad_enabled()  # NOTE: the mode the graph was entered with (Dynamo's)
    lengths = [t for t in lengths_for(seq) if t >= 3]  # NOTE: at T <= 2 gamma's ratio is exact
    for n, t in enumerate(lengths):
        sizes = Sizes(seq, t)
        if proof_bytes(view, masks, sizes) * _GRAD_BYTES_FACTOR > proof_budget():
            return _cut_reason(view, masks, entry)
        for perturb in (None, torch.Generator().manual_seed(t)) if n == 0 else (None,):
            leaves: dict[str, torch.Tensor] = {}
            try:
                with unset_fake_temporarily(), torch.enable_grad():
                    values = evaluate(
                        view, masks, inputs, sizes, perturb, leaves=leaves, entry=entry
                    )
                    reason = _compare(transform(values), list(leaves.items()), row_scale, rtol)
            except Exception as exc:  # noqa: BLE001 - a gradient we cannot check is declined
                return f"the mask's gradient could not be checked ({type(exc).__name__}: {exc})"
            if reason is not None:
                return f"{reason} at T={t}"
    return None


def _cut_reason(view: GraphView, masks: list[fx.Node], entry: bool) -> str | None:
    """Too large to evaluate with gradients: declined when the mask's subgraph cuts a gradient
    anywhere (a detach, ``.data``, a node under no_grad while the graph runs with grad)."""
    modes = grad_modes(view, entry)
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in values:
            cut = node.op in ("call_function", "call_method") and target_name(node) in _CUTS
            if cut or (entry and not modes.get(node, entry)):
                return (
                    "the mask cuts its gradient at some node (a detach, .data or no_grad: "
                    f"{node.name}) and is too large to check that the op's gradient is eager's "
                    "(raise RTP_PROOF_MAX_GB)"
                )
    return None


def _compare(mask: torch.Tensor, leaves: list, row_scale: bool, rtol: float) -> str | None:
    if not leaves or not mask.requires_grad:
        return None  # NOTE: detached whole: the op's gamma takes no gradient either
    m = mask.double()
    t = m.shape[-1]
    i = torch.arange(t, device=m.device)
    d = (i[:, None] - i[None, :]).clamp(min=0).to(m.dtype)
    gen = torch.Generator().manual_seed(0)
    cot = (torch.rand(m.shape, generator=gen, dtype=torch.float64) + 0.5).to(m.device)
    params = [leaf for _, leaf in leaves]
    eager = torch.autograd.grad((m * cot).sum(), params, retain_graph=True, allow_unused=True)
    weighted = (cot * m).detach()
    num, den = m[..., 1, 0], m[..., 1, 1]
    gamma = num / torch.where(den != 0, den, torch.ones_like(den))
    g0 = gamma.detach()
    # d/dθ of W γ / γ0 is Σ cot M (i - j) / γ dγ: the op's gamma term (W = 0 where γ = 0)
    surrogate = ((weighted * d).sum((-2, -1)) * gamma / torch.where(g0 != 0, g0, 1.0)).sum()
    if row_scale:
        diag = m.diagonal(dim1=-2, dim2=-1)
        surrogate = surrogate + (weighted.sum(-1) * diag / diag.detach()).sum()
    op = torch.autograd.grad(surrogate, params, allow_unused=True)
    for (name, leaf), a, b in zip(leaves, eager, op, strict=True):
        a = torch.zeros_like(leaf, dtype=torch.float64) if a is None else a.double()
        b = torch.zeros_like(leaf, dtype=torch.float64) if b is None else b.double()
        tiny = 1e-12 * max(float(a.abs().max()), float(b.abs().max()), 1e-30)
        if bool(((a - b).abs() > rtol * torch.maximum(a.abs(), b.abs()) + tiny).any()):
            return (
                f"the mask's gradient with respect to {name} is not gamma's (the op "
                "differentiates every entry as c_i * gamma^(i - j), through its distance-1 "
                "entries; a detach or no_grad on some entries only changes eager's)"
            )
    return None
