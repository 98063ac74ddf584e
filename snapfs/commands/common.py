"""Options shared by several commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def default_store_path() -> Path:
    """``$SNAPFS_STORE``, else ``/var/lib/snapfs`` for root, else ``$XDG_DATA_HOME/snapfs``."""
    env = os.environ.get("SNAPFS_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/snapfs")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "snapfs"


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--store DIR`` (resolved with :func:`store_path`)."""
    parser.add_argument(
        "--store",
        metavar="DIR",
        type=Path,
        default=None,
        help="page store directory (default: $SNAPFS_STORE, /var/lib/snapfs as root, "
        "else $XDG_DATA_HOME/snapfs)",
    )


def store_path(args: argparse.Namespace) -> Path:
    """The store directory chosen by ``--store`` or the defaults."""
    return args.store if getattr(args, "store", None) else default_store_path()
