"""Hypothesis over random combinations of retention spellings (tests/zoo/generator.py).

Properties:
- every generated positive computes retention (checked against the float64 reference);
- every generated positive is claimed by ``rtpcompile.explain`` (one region);
- claimed implies ``torch.compile(backend="rtp")`` equals eager, outputs and gradients;
- a generated negative is never claimed.
Example counts are small: compiling dominates (a few seconds per example on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_zoo import BACKEND, assert_close, run_with_grads
from zoo.generator import (
    BREAKS,
    LAYOUTS,
    MASKS,
    MAX_LEN,
    PRODUCTS,
    SCALES,
    TRANSPOSES,
    WRAPPERS,
    GeneratedRetention,
    Recipe,
)

import rtpcompile
from rtpcompile.lowering import reference


def _recipes(negative: bool) -> st.SearchStrategy[Recipe]:
    breaks = st.sampled_from(BREAKS) if negative else st.none()
    return st.builds(
        Recipe,
        product=st.sampled_from(PRODUCTS),
        transpose=st.sampled_from(TRANSPOSES),
        scale=st.sampled_from(SCALES),
        mask=st.sampled_from(MASKS),
        layout=st.sampled_from(LAYOUTS),
        wrapper=st.sampled_from(WRAPPERS),
        commuted=st.booleans(),
        negative=breaks,
    )


def _shapes(min_T: int) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {
            "B": st.integers(1, 2),
            "H": st.integers(1, 3),
            "T": st.integers(min_T, MAX_LEN - 8),
            "K": st.sampled_from([3, 8, 12, 16]),
            "V": st.sampled_from([3, 8, 12, 16]),
            "seed": st.integers(0, 2**16),
        }
    )


shapes = _shapes(1)
# NOTE: at T = 1 every mask is one number: a bidirectional or anti-causal "negative" is then
# exactly retention for that (static) shape, so negatives are drawn with T >= 2.
negative_shapes = _shapes(2)


def _build(recipe: Recipe, shape: dict) -> tuple[GeneratedRetention, tuple[torch.Tensor, ...]]:
    model = GeneratedRetention(recipe, shape["B"], shape["H"], shape["K"], shape["V"])
    return model, model.make_inputs(shape["seed"], shape["T"])


@settings(max_examples=40, deadline=None)
@given(recipe=_recipes(negative=False), shape=shapes)
def test_generated_positive_is_retention(recipe, shape):
    model, inputs = _build(recipe, shape)
    assert_close(model(*inputs), model.oracle(reference, *inputs).float())


@settings(max_examples=12, deadline=None)
@given(recipe=_recipes(negative=False), shape=shapes)
def test_generated_positive_is_claimed(recipe, shape):
    model, inputs = _build(recipe, shape)
    torch._dynamo.reset()
    report = rtpcompile.explain(model, *inputs)
    assert len(report.claimed) == 1, f"{recipe}\n{report}"


@settings(max_examples=4, deadline=None)
@given(recipe=_recipes(negative=False), shape=shapes)
def test_claimed_implies_compiled_equals_eager(recipe, shape):
    model, inputs = _build(recipe, shape)
    torch._dynamo.reset()
    expected = run_with_grads(model, model, inputs)
    actual = run_with_grads(torch.compile(model, backend=BACKEND, fullgraph=True), model, inputs)
    assert_close(actual[0], expected[0], f"output of {recipe}")
    assert_close(actual[1], expected[1], f"input grads of {recipe}")


@settings(max_examples=12, deadline=None)
@given(recipe=_recipes(negative=True), shape=negative_shapes)
def test_generated_negative_is_never_claimed(recipe, shape):
    model, inputs = _build(recipe, shape)
    torch._dynamo.reset()
    report = rtpcompile.explain(model, *inputs)
    assert report.claimed == [], f"{recipe} was claimed\n{report}"


@pytest.mark.parametrize("product", PRODUCTS)
def test_every_product_spelling_compiles_fullgraph(product):
    """One fixed example per product spelling, so each is exercised even with few examples."""
    torch._dynamo.reset()
    model, inputs = _build(
        Recipe(product=product), {"B": 2, "H": 2, "T": 11, "K": 8, "V": 12, "seed": 0}
    )
    expected = model(*inputs)
    assert_close(torch.compile(model, backend=BACKEND, fullgraph=True)(*inputs), expected)


class _Checkpointed(torch.nn.Module):
    """The model's whole forward under torch.utils.checkpoint."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs):
        return torch.utils.checkpoint.checkpoint(self.inner, *inputs, use_reentrant=False)


def _build_needing_grads(recipe: Recipe, shape: dict):
    """The model and inputs of ``_build``, the floating inputs requiring grad (training, where
    checkpoints are used), with Dynamo reset."""
    model, inputs = _build(recipe, shape)
    torch._dynamo.reset()
    return model, tuple(x.requires_grad_() if x.is_floating_point() else x for x in inputs)


def _verdicts(report) -> list[tuple[bool, str]]:
    return [(r.claimed, r.decay_text() if r.claimed else "") for r in report.regions]


@settings(max_examples=6, deadline=None)
@given(recipe=_recipes(negative=False), shape=shapes)
def test_a_checkpoint_around_a_positive_changes_no_verdict(recipe, shape):
    """Detection searches checkpoint bodies: the same claims, now inside the body."""
    model, inputs = _build_needing_grads(recipe, shape)
    plain = rtpcompile.explain(model, *inputs)
    wrapped = rtpcompile.explain(_Checkpointed(model), *inputs)
    assert _verdicts(wrapped) == _verdicts(plain), f"{recipe}\n{plain}\n{wrapped}"
    assert all(r.scope for r in wrapped.claimed), f"{recipe}\n{wrapped}"


@settings(max_examples=6, deadline=None)
@given(recipe=_recipes(negative=True), shape=negative_shapes)
def test_a_checkpoint_around_a_negative_claims_nothing(recipe, shape):
    model, inputs = _build_needing_grads(recipe, shape)
    report = rtpcompile.explain(_Checkpointed(model), *inputs)
    assert report.claimed == [], f"{recipe} was claimed inside a checkpoint\n{report}"
