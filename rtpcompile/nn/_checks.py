"""Argument checks shared by the modules and ``RTPConfig``: errors name the expected and the
actual value, so a module built on its own refuses what the config refuses."""

from __future__ import annotations

import math

import torch


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_divisible(dim: int, num_heads: int) -> None:
    if dim % num_heads:
        raise ValueError(
            f"dim must be divisible by num_heads (expected a multiple of {num_heads}, "
            f"got dim={dim})"
        )


def check_positive_number(name: str, value: float) -> None:
    """A finite int or float > 0 (``norm_eps``, ``rope_base``, ``ffn_mult``): ``rope_base`` <= 0
    gives NaN angles, a negative ``norm_eps`` NaN norms."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_bool(name: str, value: bool) -> None:
    """True or False only: a string such as "no" would otherwise be taken as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_offset(offset: int) -> None:
    """A position: an int >= 0 (a SymInt under torch.compile is let through unchecked: comparing
    it would install a guard)."""
    if isinstance(offset, torch.SymInt):
        return
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset (the tokens already seen) must be an int >= 0, got {offset!r}")
