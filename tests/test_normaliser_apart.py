"""torchscale's normaliser ``scores / clamp(|sum_j A_ij|, min=1).detach()`` on the Triton kernels.

The normaliser is the retention of a column of ones. Appended to v it made the kernels see V + 1
value columns: V = 64 padded to 128 in every forward and backward pass (the column takes no
gradient), and V = 256 passed the kernels' limit (aten on CUDA; forced, an error about "V=257").
When the column would cost a block it now runs as its own forward call on detached inputs
(``rewrite.normaliser_apart``). Checked under the interpreter against float64 eager, outputs and
gradients, with the kernels launched counted by their V.
"""

from __future__ import annotations

import pytest
import torch
from zoo.masks import TorchscaleNormalised

from rtpcompile import rewrite

pytest.importorskip("triton", reason="the Triton kernels need triton")


def _model(v_dim: int) -> torch.nn.Module:
    model = TorchscaleNormalised()
    model.V = v_dim
    return model


@pytest.mark.parametrize("v_dim, apart", [(16, True), (20, False), (256, True)])
def test_normalised_retention_on_the_kernels(kernel_launches, v_dim, apart):
    torch._dynamo.reset()
    model = _model(v_dim)
    q, k, v = (x.requires_grad_() for x in model.make_inputs(0, T=9 if v_dim < 256 else 5))
    reference = _model(v_dim).double()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = reference(q64, k64, v64)
    want.pow(2).sum().backward()
    compiled = torch.compile(model, backend="rtp", options={"kernels": "triton", "strict": True})
    got = compiled(q, k, v)
    got.pow(2).sum().backward()
    for a, b in ((got, want), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < 1e-5, err
    # NOTE: the passes' value widths: V (or V + 1), the ones apart (1), and K (the dk pass)
    widths = {spec.V for spec in kernel_launches}
    assert (1 in widths, v_dim + 1 in widths, v_dim in widths) == (apart, not apart, apart), widths


def test_the_rule():
    q = torch.zeros(1, 1, 2, 4)
    cases = ((16, True), (15, False), (20, False), (32, True), (64, True), (255, False))
    for v_dim, apart in cases:
        assert rewrite.normaliser_apart(q, torch.zeros(1, 1, 2, v_dim), "kernels=triton") == apart
    # NOTE: aten pays no block for the column: on CPU (kernels auto) it stays a column
    assert not rewrite.normaliser_apart(q, torch.zeros(1, 1, 2, 64), "")


@pytest.mark.parametrize("v_dim, apart", [(16, True), (20, False)])
def test_explain_lists_the_normalisers_call(v_dim, apart):
    """``Report.kernels`` (what a GPU runs) lists the normaliser's own forward (V = 1) when it
    runs apart, the V + 1 columns otherwise."""
    import rtpcompile

    model = _model(v_dim)
    report = rtpcompile.explain(model, *model.make_inputs(0, T=9))
    widths = [(k.spec.direction, k.spec.V) for k in report.kernels(0, backward=True)]
    assert (("fwd", 1) in widths, ("fwd", v_dim + 1) in widths) == (apart, not apart), widths


class _Learnable(torch.nn.Module):
    """A learnable decay (sigmoid), its row-normalised mask (a row scale) or a learnable
    temperature (a tensor score factor), then torchscale's normaliser."""

    def __init__(self, rows: bool):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.tensor([2.0, 3.0]))
        self.temp = torch.nn.Parameter(torch.tensor(0.7))
        self.rows = rows

    def forward(self, q, k, v):
        g = torch.sigmoid(self.logit)
        i = torch.arange(q.shape[2], device=q.device).to(g)
        d = i[:, None] - i[None, :]
        mask = torch.tril(torch.exp(d.clamp(min=0) * torch.log(g)[:, None, None]))
        if self.rows:
            mask = mask / mask.sum(-1, keepdim=True).sqrt()
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 * mask
        if not self.rows:
            scores = scores * self.temp
        scores = scores / scores.detach().sum(-1, keepdim=True).abs().clamp(min=1)
        return scores @ v


# NOTE: every pair of the three choices once (4 compiles instead of 8: ~35 s of CI)
@pytest.mark.parametrize(
    ("v_dim", "rows", "dynamic"),
    [(16, True, False), (16, False, True), (20, True, True), (20, False, False)],
    ids=[
        "16-row-scale-static",
        "16-temperature-dynamic",
        "20-row-scale-dynamic",
        "20-temperature-static",
    ],
)
def test_gradients_of_a_learnable_decay_and_temperature(kernel_launches, v_dim, rows, dynamic):
    """The normaliser is detached whole: apart, the row scale and the temperature took a
    gradient through it (d temperature 34% wrong; with a row scale, d decay 78%). With
    dynamic=True the head dim is symbolic and is decided on its example value, without a guard
    (it ran as V + 1 columns: at V = 256 past the kernels' limit)."""
    torch._dynamo.reset()
    model = _Learnable(rows)
    reference = _Learnable(rows).double()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, d, generator=gen) for d in (8, 8, v_dim))
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    x64 = [x.double().requires_grad_() for x in (q, k, v)]
    reference(*x64).pow(2).sum().backward()
    options = {"kernels": "triton", "strict": True}
    compiled = torch.compile(model, backend="rtp", options=options, dynamic=dynamic)
    # NOTE: no compiled-graph cache: with dynamic=True the graphs of V = 16 and 20 are the same
    # symbolic graph, and the choice made at the first V compiled would be reused (both ways
    # compute the same values; only the kernels launched, checked below, differ)
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        compiled(*xs).pow(2).sum().backward()
    pairs = [(a.grad, b.grad) for a, b in zip(xs, x64, strict=True)]
    params = zip(model.parameters(), reference.parameters(), strict=True)
    pairs += [(a.grad, b.grad) for a, b in params if b.grad is not None]
    for a, b in pairs:
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-5
    widths = {spec.V for spec in kernel_launches}
    apart = v_dim == 16
    assert (1 in widths, v_dim + 1 in widths) == (apart, not apart), widths
