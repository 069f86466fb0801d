"""End to end on a GPU: the default hybrid model compiled with backend "rtp" on CUDA tensors."""

from __future__ import annotations

import pytest
import torch

import rtpcompile
from rtpcompile.nn import default_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_training_matches_eager(dtype):
    torch.manual_seed(0)
    model = default_model().to("cuda", dtype)
    ids = torch.randint(0, 256, (2, 700), device="cuda")
    report = rtpcompile.explain(model, ids)
    assert len(report.claimed) == 4, str(report)
    compiled = torch.compile(model, backend="rtp")
    grads = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        logits = fn(ids)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        loss.backward()
        grads.append((logits.float(), [p.grad.float().clone() for p in model.parameters()]))
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    (want, want_g), (got, got_g) = grads
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)
    for g_got, g_want in zip(got_g, want_g, strict=True):
        g_scale = max(g_want.abs().max().item(), 1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=5 * tol, atol=5 * tol * g_scale)


def test_compiled_prefill_and_decode_match_full_forward():
    torch.manual_seed(0)
    model = default_model().to("cuda").eval()
    compiled = torch.compile(model, backend="rtp")
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1)
        steps = [compiled(ids[:, :290], cache=cache)[:, -1]]
        for t in range(290, 299):
            steps.append(compiled(ids[:, t : t + 1], cache=cache)[:, -1])
    got = torch.stack(steps, dim=1)
    torch.testing.assert_close(got, full[:, 289:299], rtol=2e-3, atol=2e-3)
