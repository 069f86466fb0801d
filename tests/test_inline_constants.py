"""The spec's constants are literals in the generated kernels (``kernels/inline_constants.py``):
Triton compares every constexpr global a kernel reads with its compile-time copy at each launch,
so a generated kernel must read none."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

pytest.importorskip("triton", reason="the generated kernels need triton")

from rtpcompile.kernels import codegen  # noqa: E402
from rtpcompile.kernels.inline_constants import inline  # noqa: E402
from rtpcompile.kernels.spec import choose, render  # noqa: E402


def _specs():
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for form, direction, dtype, state in itertools.product(
        ("chunkwise", "parallel", "recurrent"), ("fwd", "bwd"), dtypes, (False, True)
    ):
        yield choose(form, direction, 48, 80, dtype, dtype, 64, state_in=state, state_out=state)
    fused = choose("chunkwise", "fwd", 128, 128, torch.bfloat16, torch.bfloat16, 64)
    for stage in ("states", "output"):
        yield dataclasses.replace(fused, stage=stage, BKC=64)
    bwd = choose("chunkwise", "bwd", 128, 128, torch.bfloat16, torch.bfloat16, 64)
    yield dataclasses.replace(bwd, stage="dqk", BKC=64)


@pytest.mark.parametrize("spec", list(_specs()), ids=lambda s: s.short())
def test_generated_kernels_read_no_global_constant(spec):
    module = codegen.load(spec)
    kernel = module.kernel
    kernel.cache_key  # noqa: B018 - walks the kernel and its helpers, filling used_global_vals
    assert kernel.used_global_vals == {}
    assert "= tl.constexpr(" not in render(spec)


def test_literals_replace_reads_only():
    source = (
        "import triton.language as tl\n"
        "BT = tl.constexpr(64)  # the chunk\n"
        "OFF = tl.constexpr(-1)\n"
        "ACC = tl.constexpr(tl.float32)\n"
        'PREC = tl.constexpr("ieee")\n'
        "def kernel(x):\n"
        '    """BT rows; OFF stays in a docstring."""\n'
        "    y = x.BT + BT * OFF ** 2  # BT in a comment\n"
        "    return tl.dot(y, y, out_dtype=ACC, input_precision=PREC)\n"
    )
    out = inline(source)
    assert "# BT = 64  # the chunk\n" in out and "# OFF = -1\n" in out
    assert "    y = x.BT + 64 * (-1) ** 2  # BT in a comment\n" in out
    assert 'tl.dot(y, y, out_dtype=tl.float32, input_precision="ieee")' in out
    assert '"""BT rows; OFF stays in a docstring."""' in out
    namespace = {}
    exec(compile(out, "<inline>", "exec"), namespace)  # the result is still valid Python
    assert "BT" not in namespace and "OFF" not in namespace


@pytest.mark.parametrize(
    "code",
    [
        "def f(BT):\n    return BT\n",
        "def f(x):\n    return g(BT=x)\n",
        "def f(x):\n    BT = x\n",
        "def BT(x):\n    return x\n",
        "def f(x):\n    global BT\n    return BT\n",
        "import numpy as BT\n",
        "def f(x):\n    try:\n        return x\n    except ValueError as BT:\n        return 0\n",
    ],
)
def test_a_bound_constant_is_refused(code):
    with pytest.raises(ValueError, match="BT is bound in the kernel source, not read"):
        inline("BT = tl.constexpr(64)\n" + code)


def test_lines_are_counted_as_tokenize_counts_them():
    """A form feed in a comment is no line break to tokenize (str.splitlines would split there
    and put the edits on the wrong lines)."""
    out = inline("BT = tl.constexpr(64)\n# a\x0cb\ndef f(x):\n    return x + BT\n")
    assert out.endswith("# a\x0cb\ndef f(x):\n    return x + 64\n")


def test_a_constant_defined_twice_is_refused():
    with pytest.raises(ValueError, match="BT is defined twice"):
        inline("BT = tl.constexpr(64)\nBT = tl.constexpr(32)\n")


def test_a_constant_that_is_no_literal_is_refused():
    with pytest.raises(ValueError, match=r"W = tl.constexpr\(f\(2\)\) is no literal"):
        inline("W = tl.constexpr(f(2))\n")
    assert inline("x = 1\n") == "x = 1\n"


def test_module_constants_renders_the_templates_as_written_while_active():
    """The benchmarks' switch: inside, kernels keep their module-level constants (other modules);
    after, the literals again."""
    from rtpcompile.kernels import inline_constants

    spec = choose("recurrent", "fwd", 48, 80, torch.float32, torch.float32, 64)
    inlined = render(spec)
    with inline_constants.module_constants():
        plain = render(spec)
        assert "K = tl.constexpr(48)" in plain
        module = codegen.load(spec)
        module.kernel.cache_key  # noqa: B018
        assert len(module.kernel.used_global_vals) > 10
    assert render(spec) == inlined and codegen.info(spec).module != codegen.module_name(plain)
