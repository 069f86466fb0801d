"""The mask proof's memory: a bounded budget at long static T, capped lengths under dynamic T."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rtpcompile.detect import find_regions, mask_eval, mask_growth, mask_proof


class Retention(nn.Module):
    """The paper's parallel form with its decay mask rebuilt from a buffer at every call."""

    def __init__(self, heads: int = 2):
        super().__init__()
        self.register_buffer(
            "gamma", 1.0 - 2.0 ** (-2.0 - torch.arange(heads, dtype=torch.float32))
        )

    def forward(self, q, k, v):
        t = q.shape[2]
        idx = torch.arange(t)
        diff = idx[:, None] - idx[None, :]
        mask = torch.where(diff >= 0, self.gamma[:, None, None] ** diff.clamp(min=0), 0.0)
        return (q @ k.transpose(-1, -2) * mask) @ v


def _regions(t: int, dynamic: bool, mark: bool = False):
    q, k, v = (torch.randn(1, 2, t, 8) for _ in range(3))
    if mark:
        for x in (q, k, v):
            torch._dynamo.mark_dynamic(x, 2)
    found = []

    def collect(gm, example_inputs, **_):
        found.extend(find_regions(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(Retention(), backend=collect, dynamic=dynamic, fullgraph=True)(q, k, v)
    return found


def test_static_mask_over_the_budget_is_declined_with_the_way_out(monkeypatch):
    monkeypatch.setenv("RTP_PROOF_MAX_GB", str(2**-20))  # 1 KiB: a 2 x 64 x 64 mask is over
    (region,) = _regions(64, dynamic=False)
    assert not region.claimed
    assert "needs about" in region.reason and "dynamic=True" in region.reason


def test_static_mask_within_the_budget_is_claimed(monkeypatch):
    monkeypatch.setenv("RTP_PROOF_MAX_GB", "1")
    (region,) = _regions(64, dynamic=False)
    assert region.claimed, region.reason


def test_symbolic_length_is_proven_at_capped_lengths(monkeypatch):
    seen: list[int] = []
    real = mask_proof.fit_decay

    def spy(m, t, rtol):
        seen.append(t)
        return real(m, t, rtol)

    # NOTE: the cap is read where the lengths are chosen (mask_eval), where the long
    # length is checked (mask_proof) and by the overflow and precision rules (mask_growth)
    monkeypatch.setattr(mask_eval, "MAX_SYMBOLIC_T", 16)
    monkeypatch.setattr(mask_proof, "MAX_SYMBOLIC_T", 16)
    monkeypatch.setattr(mask_growth, "MAX_SYMBOLIC_T", 16)
    monkeypatch.setattr(mask_proof, "fit_decay", spy)
    (region,) = _regions(40, dynamic=True, mark=True)
    assert region.claimed, region.reason
    assert seen and max(seen) == 16 and 1 in seen


@pytest.mark.parametrize("bad", ["lots", "inf", "nan", "0", "-2"])
def test_bad_budget_setting_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv("RTP_PROOF_MAX_GB", bad)
    with pytest.raises(ValueError, match="RTP_PROOF_MAX_GB must be a positive number of GiB"):
        mask_proof.proof_budget()


def test_default_budget_is_half_the_ram_at_most_16_gib(monkeypatch):
    monkeypatch.delenv("RTP_PROOF_MAX_GB", raising=False)
    assert 0 < mask_proof.proof_budget() <= 16 * 2**30
