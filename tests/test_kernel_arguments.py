"""A generated kernel declares only the arguments its spec reads (``kernels/arguments.py``), and
a launch passes exactly those, picked by name from the full list."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="the generated kernels need triton")

from test_inline_constants import _specs  # noqa: E402

from rtpcompile.kernels import arguments, codegen  # noqa: E402
from rtpcompile.kernels.spec import choose  # noqa: E402

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
    assert {"r", "rd", "s_rb"}.isdisjoint(arguments.names(states))


def test_a_launch_picks_the_declared_arguments_by_name():
    class Kernel:
        arg_names = ["q", "s_qt", "T", "state_scale", "h"]

    kernel = Kernel()
    full = tuple(f"value of {name}" for name in arguments.ARGUMENTS)
    picked = arguments.picker(kernel)(full)
    assert picked == ("value of q", "value of s_qt", "value of T", "value of state_scale")
    assert arguments.picker(kernel) is kernel._rtp_picker  # worked out once per kernel
