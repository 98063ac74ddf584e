"""The ``snapfs`` command line: one sub-command per module in :mod:`snapfs.commands`.

Each command module exposes ``register(subparsers)``, which adds its parser(s) and sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
Expected failures are :class:`snapfs.errors.SnapfsError`: printed as one line, never a
traceback (set ``SNAPFS_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from snapfs import __version__
from snapfs.commands.common import stdout_closed
from snapfs.errors import SnapfsError

# Order = order in --help.
COMMAND_MODULES = ("snapshot", "catalog", "maintenance", "mount", "incoming", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every command module registered."""
    parser = argparse.ArgumentParser(
        prog="snapfs",
        description="Live memory snapshots of running processes and QEMU VMs, browsable as files.",
    )
    parser.add_argument("--version", action="version", version=f"snapfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"snapfs.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``snapfs`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SnapfsError as exc:
        if os.environ.get("SNAPFS_DEBUG"):
            raise
        print(f"snapfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("snapfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        # `snapfs cat ... | head`: the reader went away; that is not an error for us.
        if stdout_closed(exc):
            return 0
        raise
