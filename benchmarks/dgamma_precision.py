"""Relative error of d gamma against float64 autograd, per path and gamma (CPU, no GPU needed).

Usage:
    python benchmarks/dgamma_precision.py                 # the table of docs/ops.md (T = 64)
    python benchmarks/dgamma_precision.py --T 2048 --gammas 0.02 0.9

Two heads (the gamma of the column, and 0.9), B = 1, K = V = 16, seed 0, an initial state and
a final-state gradient; the error printed is the first head's |got - want| / |want|. Rows: the
aten path (``ops.retention(..., form=...)`` on CPU tensors), plain float32 eager autograd of the
chunked function (the yardstick), and the Triton kernels under the interpreter
(``TRITON_INTERPRET=1``, ``RTP_KERNELS=triton``) in float32 and float16 (float16: the inputs
rounded to float16 and the reference given the same values).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

GAMMAS = (0.5, 0.1, 0.03, 0.0101, 0.0099, 1e-3, 1e-6, 1e-20, 0.0)
FORMS = ("parallel", "chunkwise", "recurrent")


def _inputs(T: int, D: int = 16):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, T, D, generator=g) for _ in range(4))
    s0, dsf = (torch.randn(1, 2, D, D, generator=g) for _ in range(2))
    return q, k, v, do, s0, dsf


def _reference(q, k, v, do, gamma, s0, dsf) -> float:
    from rtpcompile.lowering import reference as ref

    g = gamma.double().clone().requires_grad_()
    x = [t.double() for t in (q, k, v, s0)]
    o, sf = ref.reference_chunkwise(x[0], x[1], x[2], g, None, x[3], chunk_size=64)
    loss = (o * do.double()).sum() + (sf * dsf.double()).sum()
    return torch.autograd.grad(loss, g)[0][0].item()


def _op(form, q, k, v, do, gamma, s0, dsf, dtype) -> float:
    from rtpcompile import ops

    g = gamma.to(torch.float64 if dtype == torch.float64 else torch.float32)
    g = g.clone().requires_grad_()
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    s0, dsf = s0.to(g.dtype), dsf.to(g.dtype)
    o, sf = ops.retention(q, k, v, g, form=form, initial_state=s0, output_final_state=True)
    loss = (o.to(g.dtype) * do.to(g.dtype)).sum() + (sf * dsf).sum()
    return torch.autograd.grad(loss, g)[0][0].item()


def _eager(q, k, v, do, gamma, s0, dsf) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_dgamma_precision import _eager_dgamma

    return _eager_dgamma(q, k, v, do, gamma, s0, dsf)[0].item()


def _row(name: str, value_of, gammas) -> str:
    cells = []
    for g in gammas:
        want, got = value_of(g)
        cells.append(f"{abs(got - want) / abs(want):.1e}")
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    args = parser.parse_args()
    q, k, v, do, s0, dsf = _inputs(args.T)
    half = [t.half().float() for t in (q, k, v, do)]
    cases = {}

    def value(g, fn, rounded=False):
        gamma = torch.tensor([g, 0.9])
        x = half if rounded else (q, k, v, do)
        key = (g, rounded)
        if key not in cases:
            cases[key] = _reference(*x, gamma, s0, dsf)
        return cases[key], fn(*x, gamma)

    print(f"T = {args.T}, K = V = 16, B = 1, seed 0, both states; relative error of d gamma")
    print("| path | " + " | ".join(f"{g:g}" for g in args.gammas) + " |")
    print("| --- |" + " --- |" * len(args.gammas))
    for form in args.forms:
        fn = lambda *a, f=form: _op(f, *a[:4], a[4], s0, dsf, torch.float32)  # noqa: E731
        print(_row(f"aten float32, {form}", lambda g, fn=fn: value(g, fn), args.gammas))
    eager = lambda *a: _eager(*a[:4], a[4], s0, dsf)  # noqa: E731
    print(_row("eager float32 autograd", lambda g: value(g, eager), args.gammas))
    os.environ.update(TRITON_INTERPRET="1", RTP_KERNELS="triton")
    for dtype in (torch.float32, torch.float16):
        for form in args.forms:
            fn = lambda *a, f=form, d=dtype: _op(f, *a[:4], a[4], s0, dsf, d)  # noqa: E731
            rounded = dtype == torch.float16
            name = f"Triton {str(dtype)[6:]} (interpreter), {form}"
            print(_row(name, lambda g, fn=fn, r=rounded: value(g, fn, r), args.gammas))


if __name__ == "__main__":
    main()
