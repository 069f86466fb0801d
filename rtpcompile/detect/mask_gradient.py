"""Prove that a learnable mask's gradient is the one the op gives it.

The rewritten graph reads gamma = M[1, 0] / M[1, 1] and the row scale c_i = M[i, i] from the
mask's own nodes (rewrite.py), so the op differentiates every entry as c_i * gamma^(i - j):
through the distance-1 pair and the diagonal only. The value proof (mask_proof.py) shows the
entries have that form, also once trainable parameters move, but values cannot show a detach
or a ``no_grad`` span on some entries: ``where(d == 1, g.detach(), g ** d)`` has the values of
``g ** d`` and no gradient at distance 1, so the op's gamma gradient was 0 where eager's was
not. Here the mask is evaluated with its trainable inputs as leaves, in the grad mode the graph
gives each node, and eager's vector-Jacobian product is compared with the op's model of it for
one random cotangent on the first rows (a random cotangent tells two different linear maps
apart almost surely; the first rows keep the powers short, so float32 masks compare well).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .graph_view import GraphView
from .mask_eval import Sizes, evaluate, lengths_for, proof_bytes
from .memory_budget import proof_budget

# NOTE: rows and columns the cotangent covers; gamma^(i - j) for i - j < ROWS
ROWS = 16
# NOTE: evaluating with gradients keeps the subgraph's intermediates alive
_GRAD_BYTES_FACTOR = 4


def gradient_reason(
    view: GraphView, masks: list[fx.Node], transform, inputs: list, seq, row_scale: bool
) -> str | None:
    """Why the op's gradient of the mask would differ from eager's, or None. ``row_scale``: the
    op multiplies its rows by the diagonal (else it reads gamma alone)."""
    if not torch.is_grad_enabled():  # NOTE: a graph entered without grad takes no gradient
        return None
    # the shortest proof length with a distance of 2 (at T <= 2 gamma's ratio is exact)
    lengths = [t for t in lengths_for(seq) if t >= 3]
    if not lengths:
        return None
    sizes = Sizes(seq, lengths[0])
    if proof_bytes(view, masks, sizes) * _GRAD_BYTES_FACTOR > proof_budget():
        return None  # NOTE: too large to check; the value proof alone decided (docs/backend.md)
    leaves: dict[str, torch.Tensor] = {}
    try:
        with unset_fake_temporarily(), torch.enable_grad():
            mask = transform(evaluate(view, masks, inputs, sizes, leaves=leaves))
            return _compare(mask, list(leaves.items()), row_scale)
    except Exception as exc:  # noqa: BLE001 - a gradient we cannot check is declined
        return f"the mask's gradient could not be checked ({type(exc).__name__}: {exc})"


def _compare(mask: torch.Tensor, leaves: list, row_scale: bool) -> str | None:
    if not leaves or not mask.requires_grad:
        return None  # NOTE: detached whole: the op's gamma takes no gradient either
    m = mask.double()
    t = min(m.shape[-1], ROWS)
    m = m[..., :t, :t]
    i = torch.arange(t, device=m.device)
    d = i[:, None] - i[None, :]
    num, den = m[..., 1, 0], m[..., 1, 1]
    gamma = num / torch.where(den != 0, den, torch.ones_like(den))
    diag = m.diagonal(dim1=-2, dim2=-1) if row_scale else torch.ones_like(m[..., 0])
    model = torch.where(d >= 0, diag[..., :, None] * gamma[..., None, None] ** d.clamp(min=0), 0.0)
    gen = torch.Generator().manual_seed(0)
    cot = torch.randn(m.shape, generator=gen, dtype=torch.float64).to(m.device)
    params = [leaf for _, leaf in leaves]
    eager = torch.autograd.grad((m * cot).sum(), params, retain_graph=True, allow_unused=True)
    op = torch.autograd.grad((model * cot).sum(), params, allow_unused=True)
    for (name, leaf), a, b in zip(leaves, eager, op, strict=True):
        a = torch.zeros_like(leaf) if a is None else a.double()
        b = torch.zeros_like(leaf) if b is None else b.double()
        size = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
        rtol = 1e-3 if mask.dtype in (torch.float32, torch.float64) else 5e-2
        if float((a - b).abs().max()) > rtol * size:
            return (
                f"the mask's gradient with respect to {name} is not gamma's (the op "
                "differentiates every entry as c_i * gamma^(i - j), through its distance-1 "
                "entries; a detach or no_grad on some entries only changes eager's)"
            )
    return None
