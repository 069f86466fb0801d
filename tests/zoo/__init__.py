"""The retention zoo: many independent ways people write retention, and look-alikes that are not.

Every entry is a small ``nn.Module`` subclass of :class:`ZooModule` whose one-line docstring
names its spelling. ``make_inputs(seed, T=None)`` returns the positional arguments of
``forward`` (float32, CPU, awkward sizes: T=13, K=8 != V=12). Class attributes say what the
backend must do with it:

- ``expected_claims``: how many retention regions ``rtpcompile.explain`` must claim (positives);
- ``has_candidate``: a negative that contains a score-product chain, so ``explain`` should list
  at least one declined region with a reason;
- ``negative_modes``: the module modes ("train"/"eval") in which a negative must not be claimed.

The zoo is test data: it imports nothing from rtpcompile except the optional reference module
(see ``native``), so it describes user code, not the compiler.
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor

POSITIVES: list[type[ZooModule]] = []
NEGATIVES: list[type[ZooModule]] = []


def zoo_gamma(num_heads: int) -> Tensor:
    """Strong per-head decays (0.75, 0.875, ...) so a wrong exponent shows up in the output."""
    return 1.0 - 2.0 ** (-2.0 - torch.arange(num_heads, dtype=torch.float32))


def randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


class ZooModule(nn.Module):
    """Base class: default sizes and [B, H, T, D] q, k, v inputs."""

    expected_claims: int = 1
    has_candidate: bool = True
    negative_modes: tuple[str, ...] = ("train", "eval")
    decay_param: str | None = None  # name of a learnable decay parameter, if any
    B, H, K, V = 2, 3, 8, 12
    default_T = 13

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gamma", zoo_gamma(self.H))
        self.scale = self.K**-0.5

    def make_inputs(self, seed: int, T: int | None = None) -> tuple[Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        T = self.default_T if T is None else T
        q = randn(gen, self.B, self.H, T, self.K)
        k = randn(gen, self.B, self.H, T, self.K)
        v = randn(gen, self.B, self.H, T, self.V)
        return q, k, v

    def oracle(self, ref, *inputs: Tensor) -> Tensor | tuple[Tensor, ...] | None:
        """The expected output from the float64 reference module ``ref`` (None: no oracle)."""
        q, k, v = inputs
        return ref.reference_parallel(q, k, v, self.gamma, self.scale)[0]


def positive(cls: type[ZooModule]) -> type[ZooModule]:
    POSITIVES.append(cls)
    return cls


def negative(cls: type[ZooModule]) -> type[ZooModule]:
    cls.expected_claims = 0
    NEGATIVES.append(cls)
    return cls


def spelling(cls: type[nn.Module]) -> str:
    """The one-line docstring of a zoo class: the spelling it exercises."""
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0]


# NOTE: imported last so that the submodules can use the registry defined above.
from . import masks, native, negatives, products, steps  # noqa: E402, F401
