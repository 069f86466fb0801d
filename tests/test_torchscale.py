"""Third-party code: torchscale 0.3.0's RetNetDecoder under torch.compile(backend="rtp").

torchscale is optional (``pip install --no-deps torchscale==0.3.0``); its module-level imports of
timm and fairscale are satisfied by tests/stubs when those packages are missing. A tiny decoder
(2 layers, 2 heads, K=16, V=24, vocab 64) runs in its three modes; the compiled model must equal
eager in every mode. Claims (see docs/zoo.md for how torchscale writes retention):

- parallel: one region per layer MUST be claimed (decay mask exp(masked_fill(i-j, inf) * log g)
  with rows divided by sqrt(row sum), scores divided by clamp(|sum_j A_ij|, min=1).detach());
- chunkwise: the intra-chunk product normalises by clamp(sum_j |A_ij|) and that normaliser is
  used again outside the region (to merge with the cross-chunk term): claiming it (parallel form
  only) is allowed, not required;
- recurrent: the state is rescaled by a factor computed from another state tensor
  (sqrt(prev_scale) * g / sqrt(prev_scale * g + 1)), not by a constant decay: a claim is allowed
  only if the detector proves that form; declining is fine.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from test_zoo import BACKEND, assert_close, run_with_grads

import rtpcompile

if importlib.util.find_spec("torchscale") is None:
    pytest.skip(
        "torchscale is not installed (pip install --no-deps torchscale==0.3.0)",
        allow_module_level=True,
    )

_STUBS = str(Path(__file__).parent / "stubs")
sys.path.append(_STUBS)  # NOTE: appended, so real timm / fairscale win when installed
try:
    from torchscale.architecture.config import RetNetConfig
    from torchscale.architecture.retnet import RetNetDecoder
finally:
    sys.path.remove(_STUBS)

LAYERS, VOCAB, CHUNK = 2, 64, 4
# mode -> the claim counts that are acceptable (see the module docstring)
ALLOWED_CLAIMS = {"parallel": {LAYERS}, "chunkwise": {0, LAYERS}, "recurrent": {0, LAYERS}}


class LogitsOnly(torch.nn.Module):
    """RetNetDecoder returning only its logits (the second output is a dict of extras)."""

    def __init__(self, chunkwise: bool):
        super().__init__()
        torch.manual_seed(0)
        cfg = RetNetConfig(
            decoder_embed_dim=32,
            decoder_value_embed_dim=48,
            decoder_retention_heads=2,
            decoder_ffn_embed_dim=64,
            decoder_layers=LAYERS,
            vocab_size=VOCAB,
            chunkwise_recurrent=chunkwise,
            recurrent_chunk_size=CHUNK,
        )
        self.decoder = RetNetDecoder(cfg, embed_tokens=torch.nn.Embedding(VOCAB, 32))

    def forward(self, tokens, incremental_state=None):
        return self.decoder(tokens, incremental_state=incremental_state)[0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tokens(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def _check_report(report, mode: str) -> None:
    print(f"\n[torchscale {mode}]\n{report}")
    assert len(report.claimed) in ALLOWED_CLAIMS[mode], str(report)
    for region in report.declined:
        assert isinstance(region.reason, str) and region.reason.strip(), region


def test_parallel_claimed_and_matches_eager_with_grads():
    model = LogitsOnly(chunkwise=False).train()
    tokens = _tokens(13)
    _check_report(rtpcompile.explain(model, tokens), "parallel")
    expected = run_with_grads(model, model, (tokens,))
    actual = run_with_grads(torch.compile(model, backend=BACKEND), model, (tokens,))
    assert_close(actual[0], expected[0])
    assert actual[2].keys() == expected[2].keys()
    for name, grad in actual[2].items():
        assert_close(grad, expected[2][name], f"grad of {name}")


@pytest.mark.parametrize(
    "T",
    [
        pytest.param(12, id="T12-whole-chunks"),
        pytest.param(13, id="T13-padded", marks=pytest.mark.slow),
    ],
)
def test_chunkwise_matches_eager(T):
    model = LogitsOnly(chunkwise=True).eval()
    tokens = _tokens(T, seed=T)
    _check_report(rtpcompile.explain(model, tokens), "chunkwise")
    with torch.no_grad():
        assert_close(torch.compile(model, backend=BACKEND)(tokens), model(tokens))


def _decode(fn, tokens: torch.Tensor, steps: int):
    """Feed growing prefixes with an incremental state, as torchscale's generation loop does."""
    state: dict = {}
    outs = []
    with torch.no_grad():
        for t in range(steps):
            outs.append(fn(tokens[:, : t + 1], incremental_state=state))
    return torch.cat(outs, dim=1), state


def test_recurrent_matches_eager():
    model = LogitsOnly(chunkwise=False).eval()
    tokens = _tokens(5, seed=1)
    expected, eager_state = _decode(model, tokens, 5)
    actual, state = _decode(torch.compile(model, backend=BACKEND), tokens, 5)
    assert_close(actual, expected)
    for layer in range(LAYERS):
        assert_close(state[layer]["prev_key_value"], eager_state[layer]["prev_key_value"])
    # one more step from a warm state, explained: the step graph that decoding runs
    probe = copy.deepcopy(eager_state)
    _check_report(rtpcompile.explain(model, tokens, incremental_state=probe), "recurrent")


def test_recurrent_agrees_with_parallel_after_group_norm():
    """torchscale's own invariant, checked in eager: a guard that the harness drives it right."""
    model = LogitsOnly(chunkwise=False).eval()
    tokens = _tokens(6, seed=2)
    stepped, _ = _decode(model, tokens, 6)
    with torch.no_grad():
        whole = model(tokens)
    torch.testing.assert_close(stepped, whole, atol=1e-3, rtol=1e-3)
