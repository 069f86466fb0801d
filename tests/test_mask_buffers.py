"""A claimed region's compiled code never allocates a T x T buffer for its mask.

The glue reads gamma (and a row scale) from a handful of mask entries; Inductor computes those
lazily only while the mask has one reader. A mask read twice (a slice and a gather) was
realised whole, an [H, T, T] buffer filled on every call (0.9 s and +512 MB per call per layer
at T = 8192 on CPU), with no error. The backward of a learnable mask must not allocate one either.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_backend import Retention, inputs
from torch._inductor.utils import run_and_get_code

T = 300
_ALLOC = re.compile(r"empty_strided_\w+\(\(([0-9, ]+)\)")


def _square_buffers(codes: list[str]) -> list[str]:
    """The shapes of the buffers the compiled code allocates with at least T * T elements."""
    found = []
    for code in codes:
        for dims in _ALLOC.findall(code):
            numel = 1
            for d in dims.split(","):
                numel *= int(d) if d.strip() else 1
            if numel >= T * T:
                found.append(dims)
    return found


def _compiled_codes(model, learnable: bool):
    from rtpcompile import backend

    torch._dynamo.reset()
    backend.counters.clear()
    q, k, v = inputs(T, grad=learnable)

    def run():
        out = torch.compile(model, backend="rtp")(q, k, v)
        if learnable:
            out.sum().backward()
        return out

    out, codes = run_and_get_code(run)
    assert backend.counters["regions_claimed"] == 1
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    return codes


class RowScaled(Retention):
    """A torchscale-style mask, rows divided by sqrt(row sum): gamma and a row scale are read."""

    def forward(self, q, k, v):
        T = q.shape[2]
        idx = torch.arange(T, device=q.device)
        diff = idx[:, None] - idx[None, :]
        log_gamma = torch.nn.functional.logsigmoid(self.decay_logit)[:, None, None]
        mask = torch.exp(log_gamma * diff.clamp(min=0)) * (diff >= 0)
        mask = mask / mask.sum(-1, keepdim=True).sqrt()
        return (q @ k.transpose(-1, -2) * mask) @ v


@pytest.mark.parametrize("learnable", [False, True], ids=["buffer", "learnable"])
def test_no_square_buffer_in_the_compiled_region(learnable):
    codes = _compiled_codes(Retention(learnable=learnable), learnable)
    assert not _square_buffers(codes)


def test_a_row_normalised_mask_is_built_once():
    """The model's own row normaliser needs its whole mask (sum over each row, then a division:
    two readers), so Inductor builds that [H, T, T] once; the glue's reads add none."""
    codes = _compiled_codes(RowScaled(), learnable=False)
    assert len(_square_buffers(codes)) == 1
