"""What the timing commands (``bench``, ``demo``) share: device/thread options and list parsers."""

from __future__ import annotations

import argparse
import warnings

import torch


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def int_list(example: str):
    """An argparse type for comma-separated positive integers; errors quote ``example``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"expected positive integers like {example}, got {text!r}"
            )
        return values

    return parse


def names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def prepare(args) -> str:
    """Quiet Inductor's deprecation noise, apply ``--threads``; returns the device to use."""
    # NOTE: torch's own FutureWarnings from inside Inductor are not actionable by a user.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
    if args.threads:
        # NOTE: on a CPU shared with other busy processes, fewer threads than cores avoids
        # OpenMP oversubscription, which can slow small ops down by 10-50x.
        torch.set_num_threads(args.threads)
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")
