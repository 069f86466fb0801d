"""The ``rtpcompile`` command line (also ``python -m rtpcompile``).

Sub-commands live in ``rtpcompile/commands/``: every module there that defines
``add_parser(subparsers)`` contributes its sub-command(s), each setting ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import __version__, commands
from .commands._common import UsageError

# NOTE: the order shown in --help; modules not listed here follow alphabetically.
_ORDER = ("demo", "bench", "tune", "cache", "export")


def _command_modules():
    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
    for name in names:
        module = importlib.import_module(f"{commands.__name__}.{name}")
        if hasattr(module, "add_parser"):
            yield module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtpcompile",
        description="A torch.compile backend for Retention-Transformer hybrid models.",
    )
    parser.add_argument("--version", action="version", version=f"rtpcompile {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `rtpcompile cache list | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # NOTE: writing the output failed (`>/dev/full`, a full disk)
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
