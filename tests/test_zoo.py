"""The zoo against the public API: every positive is claimed and exact, no negative is claimed.

For each positive (tests/zoo): ``rtpcompile.explain`` claims exactly ``expected_claims``
regions, and ``torch.compile(m, backend="rtp")`` matches eager in outputs and in the gradients
of inputs and parameters (a learnable decay included) in train mode with ``fullgraph=True``,
in eval mode under ``no_grad``, and with ``dynamic=True`` over two sequence lengths.
For each negative: nothing is claimed, every declined candidate carries a reason, and the
compiled module still matches eager.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from zoo import NEGATIVES, POSITIVES, spelling

import rtpcompile
from rtpcompile.lowering import reference

Tensor = torch.Tensor

# NOTE: RTP_ZOO_BACKEND=inductor runs the compile tests against plain Inductor, to validate the
# zoo itself (fullgraph, gradients) independently of the rtp backend.
BACKEND = os.environ.get("RTP_ZOO_BACKEND", "rtp")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # NOTE: every test compiles new module instances; without a reset Dynamo's recompile limit
    # would silently fall back to eager after a few tests and hide backend failures.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ids(classes) -> list[str]:
    return [c.__name__ for c in classes]


def _as_tuple(x) -> tuple[Tensor, ...]:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def assert_close(actual, expected, what: str = "output") -> None:
    """float32 comparison with an absolute tolerance of 1e-4 relative to the output scale."""
    for i, (a, e) in enumerate(zip(_as_tuple(actual), _as_tuple(expected), strict=True)):
        atol = 1e-4 * max(1.0, e.detach().abs().max().item()) if e.numel() else 1e-4
        label = f"{what}[{i}]"
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-4, msg=lambda m, at=label: f"{at}: {m}")


def _leaves(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    out = []
    for x in inputs:
        x = x.detach().clone()
        out.append(x.requires_grad_() if x.is_floating_point() else x)
    return tuple(out)


def _loss(outputs: tuple[Tensor, ...]) -> Tensor:
    """A fixed random projection of every output, so each gradient entry matters."""
    gen = torch.Generator().manual_seed(99)
    total = outputs[0].new_zeros(())
    for o in outputs:
        total = total + (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    return total


def run_with_grads(fn, model: torch.nn.Module, inputs: tuple[Tensor, ...]):
    """Outputs, input gradients and parameter gradients (by name) of one forward/backward."""
    model.zero_grad(set_to_none=True)
    leaves = _leaves(inputs)
    outputs = _as_tuple(fn(*leaves))
    _loss(outputs).backward()
    input_grads = tuple(x.grad for x in leaves if x.requires_grad)
    param_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return tuple(o.detach() for o in outputs), input_grads, param_grads


def claimed_counter() -> int | None:
    """The backend's running count of claimed regions (``counters["regions_claimed"]``)."""
    if BACKEND != "rtp":
        return None
    counters = getattr(importlib.import_module("rtpcompile.backend"), "counters", None)
    return None if counters is None else int(counters["regions_claimed"])


# --------------------------------------------------------------------------- the zoo itself


def test_zoo_is_big_enough():
    assert len(POSITIVES) >= 15 and len(NEGATIVES) >= 8
    assert len({spelling(c) for c in POSITIVES + NEGATIVES}) == len(POSITIVES + NEGATIVES)


@pytest.mark.parametrize("cls", POSITIVES, ids=_ids(POSITIVES))
def test_positive_is_retention(cls):
    """The zoo entry really computes retention (float64 reference), where an oracle exists."""
    model = cls()
    inputs = model.make_inputs(0)
    expected = model.oracle(reference, *inputs)
    if expected is None:
        pytest.skip("no closed-form oracle (learned projections or a normaliser)")
    actual = model(*inputs)
    assert_close(_as_tuple(actual), tuple(e.float() for e in _as_tuple(expected)))


# --------------------------------------------------------------------------- positives


@pytest.mark.parametrize("cls", POSITIVES, ids=_ids(POSITIVES))
def test_explain_claims_positive(cls):
    model = cls()
    report = rtpcompile.explain(model, *model.make_inputs(0))
    assert len(report.claimed) == cls.expected_claims, f"{spelling(cls)}\n{report}"
    assert str(report)


@pytest.mark.parametrize("cls", POSITIVES, ids=_ids(POSITIVES))
def test_positive_train_fullgraph_matches_eager(cls):
    model = cls().train()
    inputs = model.make_inputs(1)
    expected = run_with_grads(model, model, inputs)
    before = claimed_counter()
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    out, in_grads, p_grads = run_with_grads(compiled, model, inputs)
    assert_close(out, expected[0])
    assert_close(in_grads, expected[1], "input grad")
    assert p_grads.keys() == expected[2].keys()
    for name, grad in p_grads.items():
        assert_close(grad, expected[2][name], f"grad of {name}")
    if cls.decay_param is not None:
        assert p_grads[cls.decay_param].abs().sum() > 0, "the learnable decay got no gradient"
    if before is not None:
        assert claimed_counter() - before == cls.expected_claims


@pytest.mark.parametrize("cls", POSITIVES, ids=_ids(POSITIVES))
def test_positive_eval_no_grad_matches_eager(cls):
    model = cls().eval()
    inputs = model.make_inputs(2)
    with torch.no_grad():
        expected = model(*inputs)
        actual = torch.compile(model, backend=BACKEND)(*inputs)
    assert_close(actual, expected)


# NOTE: dynamic shapes compile slowly; a representative subset runs by default, the rest is slow.
_DYNAMIC_FAST = {
    "MatmulOperator",
    "Einsum2",
    "PermuteBTHD",
    "LearnableLogDecay",
    "TorchscaleNormalised",
    "FusedQKVSliceLearnable",
    "ChunkStep",
}
_VARIABLE_T = [
    pytest.param(c, id=c.__name__, marks=() if c.__name__ in _DYNAMIC_FAST else pytest.mark.slow)
    for c in POSITIVES
    if c.default_T > 1
]


@pytest.mark.parametrize("cls", _VARIABLE_T)
def test_positive_dynamic_two_lengths(cls):
    model = cls()
    compiled = torch.compile(model, backend=BACKEND, dynamic=True)
    for seed, T in ((3, cls.default_T), (4, cls.default_T + 8)):
        inputs = model.make_inputs(seed, T)
        expected = run_with_grads(model, model, inputs)
        actual = run_with_grads(compiled, model, inputs)
        assert_close(actual[0], expected[0], f"output at T={T}")
        assert_close(actual[1], expected[1], f"input grad at T={T}")


# --------------------------------------------------------------------------- negatives


def _negative_cases():
    return [
        pytest.param(cls, mode, id=f"{cls.__name__}-{mode}")
        for cls in NEGATIVES
        for mode in cls.negative_modes
    ]


@pytest.mark.parametrize(("cls", "mode"), _negative_cases())
def test_negative_never_claimed(cls, mode):
    model = cls().train(mode == "train")
    report = rtpcompile.explain(model, *model.make_inputs(0))
    assert report.claimed == [], f"{spelling(cls)} was claimed:\n{report}"
    if cls.has_candidate:
        assert report.declined, f"{spelling(cls)}: the candidate was not reported\n{report}"
    for region in report.declined:
        assert isinstance(region.reason, str) and region.reason.strip(), region


@pytest.mark.parametrize("cls", NEGATIVES, ids=_ids(NEGATIVES))
def test_negative_compiled_matches_eager(cls):
    model = cls().train()
    inputs = model.make_inputs(5)
    before = claimed_counter()
    # NOTE: fallback_random makes Inductor draw dropout masks from the eager generator.
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(0)
        expected = model(*inputs)
        torch.manual_seed(0)
        actual = torch.compile(model, backend=BACKEND)(*inputs)
    assert_close(actual, expected)
    if before is not None:
        assert claimed_counter() == before
