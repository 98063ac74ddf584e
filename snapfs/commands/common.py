"""Options shared by several commands."""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from snapfs.errors import reported_error

T = TypeVar("T")


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


class ProgressLine:
    """One self-overwriting status line on stderr (callers create it only for a terminal)."""

    WIDTH = 78

    def __init__(self) -> None:
        self.shown = False

    def show(self, text: str) -> None:
        """Replace the line with ``text``."""
        sys.stderr.write("\r" + text.ljust(self.WIDTH)[:120])
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        """Erase the line (before printing results)."""
        if self.shown:
            sys.stderr.write("\r" + " " * self.WIDTH + "\r")
            sys.stderr.flush()
            self.shown = False


def run_interruptible(afn: Callable[[], Awaitable[T]]) -> tuple[T | None, bool]:
    """Run ``await afn()`` in trio, cancelled by SIGINT or SIGTERM: ``(its value, False)``,
    or ``(None, True)`` once a signal cancelled it (whatever it holds is released by the
    cancellation). Of a nursery's errors, the one :func:`reported_error` picks is raised."""
    import trio

    interrupted = False
    value: T | None = None

    async def main() -> None:
        nonlocal interrupted, value
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal interrupted
                    async for _ in signals:
                        interrupted = True
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                value = await afn()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        error = reported_error(group)
        if error is group:
            raise
        raise error from None
    return (None, True) if interrupted else (value, False)


def stdout_closed(exc: BrokenPipeError) -> bool:
    """Whether ``exc`` means our stdout's reader went away (``snapfs cat ... | head``): then
    stdout is pointed at /dev/null, so that the interpreter's last flush stays quiet, and
    the caller treats it as a normal end. False for any other broken pipe (a real error)."""
    try:
        fd = sys.stdout.fileno()
        revents = select.poll()
        revents.register(fd, select.POLLOUT)
        events = revents.poll(0)
    except (AttributeError, OSError, ValueError):
        return False
    if not any(ev & select.POLLERR for _, ev in events):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True
