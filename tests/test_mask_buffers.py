"""A claimed region's compiled code never allocates a T x T buffer for its mask.

The glue reads gamma (and a row scale) from a handful of mask entries; Inductor computes those
lazily only while the mask has one reader. A mask read twice (a slice and a gather) was
realised whole, an [H, T, T] buffer filled on every call (0.9 s and +512 MB per call per layer
at T = 8192 on CPU), with no error. The backward of a learnable product mask allocates none
either; a learnable where() mask's backward keeps its [T, T] condition (a strict xfail).
"""

from __future__ import annotations

import re

import pytest
import torch
from test_backend import Retention, inputs
from torch._inductor.utils import run_and_get_code

T = 300
_ALLOC = re.compile(r"empty_strided_\w+\(\(([^)]*)\)")
_SYMBOL = re.compile(r"\bs\d+\b")


def _square_buffers(codes: list[str]) -> list[str]:
    """The shapes of the buffers the compiled code allocates with at least T * T elements."""
    found = []
    for code in codes:
        for dims in _ALLOC.findall(code):
            parts = [d.strip() for d in dims.split(",") if d.strip()]
            if not all(d.isdigit() for d in parts):
                # a dynamic T: a buffer with two symbolic dims is T x T (B, H are static here)
                if sum(bool(_SYMBOL.search(d)) for d in parts) >= 2:
                    found.append(dims)
                continue
            numel = 1
            for d in parts:
                numel *= int(d)
            if numel >= T * T:
                found.append(dims)
    return found


def _compiled_codes(model, learnable: bool, dynamic: bool = False):
    from rtpcompile import backend

    torch._dynamo.reset()
    backend.counters.clear()
    q, k, v = inputs(T, grad=learnable)

    def run():
        out = torch.compile(model, backend="rtp", dynamic=dynamic)(q, k, v)
        if learnable:
            out.sum().backward()
        return out

    out, codes = run_and_get_code(run)
    assert backend.counters["regions_claimed"] == 1
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    return codes


class _Spelled(Retention):
    """Retention whose mask ``_mask(exp(log_gamma * clamp(i - j, 0)), i - j)`` spells."""

    def forward(self, q, k, v):
        T = q.shape[2]
        idx = torch.arange(T, device=q.device)
        diff = idx[:, None] - idx[None, :]
        log_gamma = torch.nn.functional.logsigmoid(self.decay_logit)[:, None, None]
        mask = self._mask(torch.exp(log_gamma * diff.clamp(min=0)), diff)
        return (q @ k.transpose(-1, -2) * mask) @ v


class RowScaled(_Spelled):
    """A torchscale-style mask, rows divided by sqrt(row sum): gamma and a row scale are read."""

    @staticmethod
    def _mask(decay, diff):
        mask = decay * (diff >= 0)
        return mask / mask.sum(-1, keepdim=True).sqrt()


class WhereMask(_Spelled):
    """rtpcompile.nn's spelling: where(i >= j, exp(log_gamma * clamp(i - j, 0)), 0)."""

    @staticmethod
    def _mask(decay, diff):
        return torch.where(diff >= 0, decay, 0.0)


_SAVED_CONDITION = pytest.mark.xfail(
    strict=True,
    reason="documented (docs/backend.md): a learnable mask's gradient goes through its T x T "
    "subgraph, and for a where() mask the partitioner saves the [T, T] condition",
)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize(
    "model_class, learnable",
    [
        pytest.param(Retention, False, id="product-buffer"),
        pytest.param(Retention, True, id="product-learnable"),
        pytest.param(WhereMask, False, id="where-buffer"),
        pytest.param(WhereMask, True, id="where-learnable", marks=_SAVED_CONDITION),
    ],
)
def test_no_square_buffer_in_the_compiled_region(model_class, learnable, dynamic):
    codes = _compiled_codes(model_class(learnable=learnable), learnable, dynamic)
    assert not _square_buffers(codes)


def test_a_row_normalised_mask_is_built_once():
    """The model's own row normaliser needs its whole mask (sum over each row, then a division:
    two readers), so Inductor builds that [H, T, T] once; the glue's reads add none."""
    codes = _compiled_codes(RowScaled(), learnable=False)
    assert len(_square_buffers(codes)) == 1
