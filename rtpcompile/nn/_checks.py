"""Argument checks shared by the modules: errors name the expected and the actual value."""

from __future__ import annotations


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
