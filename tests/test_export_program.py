"""export_program: repeated detection captures, dynamic sequence length, keyword arguments.

Regression tests for bugs found by testing: the 9th detection capture of a model class hit
Dynamo's recompile limit; a dynamic-T export was silently pinned to one chunk count by the
chunkwise decomposition; detection refused keyword arguments with a misleading message.
"""

from __future__ import annotations

import pytest
import torch

from rtpcompile import ops
from rtpcompile.export import export_program

pytest.importorskip("rtpcompile.backend", reason="the rtp backend is not available")


class _Paper(torch.nn.Module):
    """Retention in the paper's parallel form; gamma may come as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)
        self.register_buffer("gamma", ops.retention_init_decay(2))

    def forward(self, x, *, gamma=None):
        gamma = self.gamma if gamma is None else gamma
        B, T, _ = x.shape
        q, k, v = self.proj(x).view(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4)
        n = torch.arange(T)
        mask = gamma[:, None, None] ** (n[:, None] - n[None, :]).float()
        mask = mask.masked_fill(n[:, None] < n[None, :], 0)
        return ((q @ k.transpose(-1, -2)) * 0.5 * mask) @ v


class _Ops(torch.nn.Module):
    """Retention through rtpcompile.ops (no detection needed), K=3 != V=5."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 2 * (3 + 3 + 5))
        self.register_buffer("gamma", ops.retention_init_decay(2))

    def forward(self, x, state):
        B, T, _ = x.shape
        q, k, v = self.proj(x).view(B, T, 2, 11).transpose(1, 2).split([3, 3, 5], dim=-1)
        return ops.retention(q, k, v, self.gamma, initial_state=state, output_final_state=True)


def test_repeated_detection_exports_leave_no_dynamo_cache_entry():
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    model = _Paper().eval()
    # NOTE: a limit of 1 makes the second capture of the class fail if captures pile up cache
    # entries on its forward (with the default limit of 8 it was the 9th).
    with torch._dynamo.config.patch(recompile_limit=1):
        for T in (5, 5, 9):
            x = torch.randn(1, T, 8)
            program = export_program(model, x, form="chunkwise", chunk_size=4)
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    assert _debug_get_cache_entry_list(_Paper.forward.__code__) == []


def test_detection_accepts_keyword_arguments():
    model = _Paper().eval()
    x, gamma = torch.randn(1, 9, 8), torch.tensor([0.9, 0.7])
    program = export_program(model, x, form="chunkwise", chunk_size=4, kwargs={"gamma": gamma})
    want = model(x, gamma=gamma)
    torch.testing.assert_close(program.module()(x, gamma=gamma), want, rtol=1e-5, atol=1e-5)
    other = torch.tensor([0.5, 0.99])  # gamma is read from the argument, not frozen
    got = program.module()(x, gamma=other)
    torch.testing.assert_close(got, model(x, gamma=other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["chunkwise", "parallel"])
def test_dynamic_sequence_length_is_kept_symbolic(form):
    model = _Ops().eval()
    T = torch.export.Dim("T", min=2, max=256)
    example = (torch.randn(2, 20, 6), torch.randn(2, 2, 3, 5))
    program = export_program(model, *example, form=form, chunk_size=8,
                             dynamic_shapes={"x": {1: T}, "state": None})  # fmt: skip
    # T < C, T = C, T = C + 1, T not a multiple of C, more chunks than the example had
    for t in (2, 8, 9, 20, 37):
        x, state = torch.randn(2, t, 6), torch.randn(2, 2, 3, 5)
        for got, want in zip(program.module()(x, state), model(x, state), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dynamic_sequence_length_errors_say_what_to_do():
    T = torch.export.Dim("T", min=2, max=256)
    example = (torch.randn(1, 9, 6), torch.randn(1, 2, 3, 5))
    with pytest.raises(ValueError, match="fixed sequence length.*form='chunkwise'"):
        export_program(_Ops().eval(), *example, form="recurrent",
                       dynamic_shapes={"x": {1: T}, "state": None})  # fmt: skip
    with pytest.raises(ValueError, match="dynamic_shapes cannot be used with detection"):
        export_program(_Paper().eval(), torch.randn(1, 9, 8), dynamic_shapes={"x": {1: T}})


@pytest.mark.parametrize("N", [1, 2, 7])
def test_chunk_decay_matrix_equals_the_unrolled_recurrence(N):
    from rtpcompile.export.decompose import _matrix_states, _unrolled_states

    g = torch.Generator().manual_seed(N)
    state = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    chunk_kv = torch.randn(2, 3, N, 4, 5, generator=g, dtype=torch.float64)
    lg = torch.log(torch.tensor([0.5, 0.9, 0.999], dtype=torch.float64))
    want = _unrolled_states(state, chunk_kv, lg, 6, N)
    got = _matrix_states(state, chunk_kv, lg, 6, N)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_quadratic_check_reads_a_dynamic_program_without_specialising_it(tmp_path):
    """quadratic_node_shapes compared each SymInt dim with the int given, which guarded T to it:
    the program then refused every other length after save/load (until 2026-11-24)."""
    from rtpcompile.export import quadratic_node_shapes

    class Scores(torch.nn.Module):
        def forward(self, x):
            return (x @ x.transpose(-1, -2)).softmax(-1) @ x

    x = torch.randn(1, 40, 8)
    T = torch.export.Dim("T", min=2, max=4096)
    program = torch.export.export(Scores(), (x,), dynamic_shapes=({1: T},))
    found = quadratic_node_shapes(program, 40)
    assert found and all("s" in shape for shape in found)  # the [1, T, T] scores, symbolic
    assert quadratic_node_shapes(program, 41) == []
    torch.export.save(program, tmp_path / "p.pt2")
    longer = torch.randn(1, 77, 8)
    out = torch.export.load(tmp_path / "p.pt2").module()(longer)
    torch.testing.assert_close(out, Scores()(longer))


def test_the_names_the_docs_use_are_attributes_of_the_package():
    """README's `rtpcompile.export_program` was an AttributeError until 2026-11-24, as were the
    `rtpcompile.export` and `rtpcompile.distributed` subpackages before an explicit import."""
    import subprocess
    import sys

    code = (
        "import rtpcompile; from rtpcompile.export import export_program; "
        "assert rtpcompile.export_program is export_program; "
        "rtpcompile.export.quadratic_node_shapes; "
        "rtpcompile.distributed.context_parallel_retention"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
