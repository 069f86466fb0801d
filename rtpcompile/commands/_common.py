"""What the commands share: device/thread options, argparse value types, and ``UsageError``.

A value an argparse ``type=`` rejects ends the command line as argparse does (usage, one error
line, exit code 2); a command that finds a bad input later raises ``UsageError``, which
``cli.main`` prints as one line with the same exit code.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from pathlib import Path

import torch

from .. import options


class UsageError(Exception):
    """A bad command-line input found after parsing: one line on stderr, exit code 2."""


def device(text: str) -> str:
    """An argparse type: cpu, cuda or cuda:N, and CUDA only when a device is there."""
    expected = "expected cpu, cuda or cuda:N"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"expected cpu (no CUDA device is available here), got {text!r}"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise argparse.ArgumentTypeError(f"expected cuda:0 to cuda:{count - 1}, got {text!r}")
    return text


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", type=device, default=None, help="cpu or cuda (default: cuda when available)"
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice)",
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
        return list(dict.fromkeys(values))  # NOTE: a repeated length is measured once

    return parse


def names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (what a mkdir -p would start from)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(path: Path, flag: str, what: str = "a folder") -> None:
    """A ``UsageError`` unless ``path`` is a folder, or one that can be made, and writable:
    checked before a long run, which would otherwise fail at the end and lose its results."""
    base = _existing_ancestor(path)
    if not base.is_dir():
        where = "" if base == Path(os.path.abspath(path)) else f" ({str(base)!r} is a file)"
        raise UsageError(f"{flag}: expected {what}, got {str(path)!r}{where}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write in {str(base)!r} (permission denied)")


def check_output_file(path: Path, flag: str) -> None:
    """A ``UsageError`` unless ``path`` can be written as a file (its folder may be made)."""
    what = "a file name in a folder that exists or can be made"
    if Path(path).is_dir():
        raise UsageError(f"{flag}: expected {what}, got the folder {str(path)!r}")
    base = _existing_ancestor(Path(os.path.abspath(path)).parent)
    if not base.is_dir():
        raise UsageError(f"{flag}: expected {what}, got {str(path)!r} ({str(base)!r} is a file)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write in {str(base)!r} (permission denied)")


def prepare(args) -> str:
    """Check the ``RTP_*`` variables, quiet Inductor's deprecation noise, apply ``--threads``;
    returns the device to use."""
    try:
        # NOTE: up front, as an op call checks them: a bad value failed every rtp variant of a
        # bench run, which still wrote its baselines and exited 0
        options.current()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # NOTE: torch's own FutureWarnings from inside Inductor are not actionable by a user.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
    if args.threads:
        # NOTE: on a CPU shared with other busy processes, fewer threads than cores avoids
        # OpenMP oversubscription, which can slow small ops down by 10-50x.
        torch.set_num_threads(args.threads)
    if args.device is not None:
        try:  # NOTE: the parser checked it already; a Namespace built in code may not have been
            device(args.device)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--device: {exc}") from None
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")
