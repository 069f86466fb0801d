"""A generated kernel declares only the arguments its spec reads (``kernels/arguments.py``), and
a launch passes exactly those, picked by name from the full list."""

from __future__ import annotations

import ast
import builtins
import dataclasses
import itertools

import pytest
import torch

pytest.importorskip("triton", reason="the generated kernels need triton")

from test_inline_constants import _specs  # noqa: E402

from rtpcompile.kernels import arguments, codegen  # noqa: E402
from rtpcompile.kernels.spec import choose, render  # noqa: E402

BF16 = torch.bfloat16


# NOTE: the dq/dk kernel (chunk_dqk.jinja) writes its own signature
@pytest.mark.parametrize("spec", [s for s in _specs() if s.stage != "dqk"], ids=lambda s: s.short())
def test_a_kernel_declares_what_its_spec_reads(spec):
    declared = codegen.load(spec).kernel.arg_names
    buffers = ["h", "hp"] if spec.stage in ("states", "output") else []
    assert declared == [*arguments.names(spec), *buffers]


def test_the_flags_decide_the_groups():
    plain = choose("chunkwise", "fwd", 64, 64, BF16, BF16, 64)
    assert "B" not in arguments.names(plain)  # programs index batch * heads: B is never read
    assert set(arguments.names(plain)).isdisjoint({"s0", "sf", "rs", "r", "rd", "state_scale"})
    decode = choose("recurrent", "fwd", 128, 128, BF16, BF16, 1, state_in=True, state_out=True)
    assert len(arguments.names(decode)) == 27 < len(arguments.ARGUMENTS) == 38
    every = dataclasses.replace(decode, row_scale=True, row_dot=True)
    assert set(arguments.ARGUMENTS) - set(arguments.names(every)) == {"B"}
    # a states stage keeps its d gamma terms in hp: r and rd are not its arguments
    states = dataclasses.replace(plain, stage="states", BKC=64, row_dot=True)
    assert {"r", "rd", "s_rb", "q", "s_qt", "o"}.isdisjoint(arguments.names(states))


def test_a_launch_picks_the_declared_arguments_by_name():
    class Kernel:
        arg_names = ["q", "s_qt", "T", "state_scale", "h"]

    kernel = Kernel()
    full = tuple(f"value of {name}" for name in arguments.ARGUMENTS)
    picked = arguments.picker(kernel)(full)
    assert picked == ("value of q", "value of s_qt", "value of T", "value of state_scale")
    assert arguments.picker(kernel) is kernel._rtp_picker  # worked out once per kernel


def _live_names(statements, found: set) -> None:
    """Names loaded by ``statements``, through the taken branch of an ``if`` on literals only
    (the constants are inlined: a dead branch reads ``if False:``, which Triton never visits)."""

    def loads(node):
        found.update(
            n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        )

    for s in statements:
        if isinstance(s, ast.If):
            names = (ast.Name, ast.Call, ast.Attribute)
            if not any(isinstance(n, names) for n in ast.walk(s.test)):
                taken = eval(compile(ast.Expression(s.test), "<test>", "eval"))  # noqa: S307
                _live_names(s.body if taken else s.orelse, found)
                continue
            loads(s.test)
            _live_names(s.body, found)
            _live_names(s.orelse, found)
        elif isinstance(s, ast.For | ast.While):
            loads(s.iter if isinstance(s, ast.For) else s.test)
            _live_names(s.body, found)
            _live_names(s.orelse, found)
        else:
            loads(s)


def _flag_specs():
    for form, dtype, flags in itertools.product(
        ("chunkwise", "parallel", "recurrent"),
        (torch.float16, torch.float32),
        itertools.product((False, True), repeat=4),
    ):
        state_in, state_out, row_scale, row_dot = flags
        stages = ("fused", "states", "output") if form == "chunkwise" else ("fused",)
        for stage in stages:
            yield choose(
                form, "fwd", 64, 64, dtype, dtype, 64, state_in=state_in, state_out=state_out,
                row_scale=row_scale, row_dot=row_dot, stage=stage,
            )  # fmt: skip


def test_no_live_branch_reads_an_undeclared_argument():
    """Every flag combination of every form and stage: a name the kernel or a helper reads in a
    branch its spec takes is a parameter, a local, a function of the module or a builtin (a
    template reading an argument its spec does not declare fails here, without a GPU)."""
    checked = 0
    for spec in _flag_specs():
        tree = ast.parse(render(spec))
        functions = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
        for f in (f for f in tree.body if isinstance(f, ast.FunctionDef)):
            params = {a.arg for a in f.args.args}
            stored = {
                n.id
                for n in ast.walk(f)
                if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)
            }
            read: set = set()
            _live_names(f.body, read)
            known = params | stored | functions | {"triton", "tl"} | set(dir(builtins))
            assert read <= known, (spec.short(), f.name, sorted(read - known))
        checked += 1
    assert checked > 150


def test_a_single_declared_argument_is_still_a_tuple():
    class Kernel:
        arg_names = ["q", "h"]

    assert arguments.picker(Kernel())(tuple(range(len(arguments.ARGUMENTS)))) == (0,)
