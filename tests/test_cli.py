"""The command line: --help lists the sub-commands, and python -m rtpcompile works."""

from __future__ import annotations

import subprocess
import sys

from rtpcompile import cli


def test_help_lists_demo(capsys):
    parser = cli.build_parser()
    parser.print_help()
    out = capsys.readouterr().out
    assert "demo" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: rtpcompile" in capsys.readouterr().out


def test_python_dash_m():
    done = subprocess.run(
        [sys.executable, "-m", "rtpcompile", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "usage: rtpcompile" in done.stdout
