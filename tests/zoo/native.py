"""The repository's own reference module, when it exists: rtpcompile.nn.MultiScaleRetention."""

from __future__ import annotations

import inspect

import torch

from . import ZooModule, positive, randn

try:  # NOTE: written by another part of the project; the zoo entry appears once it exists.
    from rtpcompile.nn import MultiScaleRetention as _MSR
except Exception:  # pragma: no cover - depends on the state of the package
    _MSR = None


def _build_msr(d_model: int, num_heads: int) -> torch.nn.Module:
    """Construct the module whatever the first two parameters are called."""
    params = list(inspect.signature(_MSR).parameters)
    return _MSR(**{params[0]: d_model, params[1]: num_heads})


if _MSR is not None:

    @positive
    class NativeMultiScaleRetention(ZooModule):
        """rtpcompile.nn.MultiScaleRetention on [B, T, C] (the repository's reference module)."""

        C = 24

        def __init__(self):
            super().__init__()
            self.inner = _build_msr(self.C, self.H)

        def make_inputs(self, seed, T=None):
            gen = torch.Generator().manual_seed(seed)
            return (randn(gen, self.B, self.default_T if T is None else T, self.C),)

        def oracle(self, ref, *inputs):
            return None

        def forward(self, x):
            out = self.inner(x)
            return out[0] if isinstance(out, tuple) else out
