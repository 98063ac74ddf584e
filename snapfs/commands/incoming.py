"""``snapfs incoming``: read a QEMU migration stream from stdin.

``--name NAME`` stores it as a snapshot (works as the target of QEMU's ``migrate "exec:..."``);
``--pid PID`` restores a process's memory from it (``--dry-run`` validates only).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

from snapfs.commands.common import add_store_argument, store_path
from snapfs.errors import UsageError
from snapfs.units import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``incoming`` command."""
    p = subparsers.add_parser(
        "incoming",
        help="read a QEMU migration stream on stdin: store it, or restore a process from it",
        description="Read a QEMU migration stream (a snapshot's vmstate, or QEMU's own "
        "`migrate` output) from stdin. With --name, store it as a new snapshot; with --pid, "
        "validate the whole stream, then stop the process, write its memory and resume it.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--name", metavar="NAME", help="store the stream as snapshot NAME")
    what.add_argument("--pid", metavar="PID", type=int, help="restore the memory of process PID")
    p.add_argument("--dry-run", action="store_true", help="with --pid: validate and match only")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_store_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to ingest or restore; the stream is stdin."""
    if sys.stdin.isatty():
        raise UsageError("snapfs incoming reads a migration stream on stdin: pipe one in "
                         "(e.g. `snapfs cat NAME vmstate | snapfs incoming --pid PID`)")
    src = sys.stdin.buffer
    if args.pid is not None:
        from snapfs.stream.restore import restore_process

        result = restore_process(src, args.pid, dry_run=args.dry_run)
        if args.json:
            print(json.dumps(result.to_json(), sort_keys=True))
        elif result.dry_run:
            print(f"stream OK: {result.blocks} blocks, {result.pages_sent} pages match process "
                  f"{result.pid} (dry run: nothing written)")
        else:
            print(f"process {result.pid}: restored {result.blocks} blocks, "
                  f"{result.pages_written} of {result.pages_sent} pages differed and were written")
        return 0
    if args.dry_run:
        raise UsageError("--dry-run goes with --pid")
    return _ingest(args)


def _ingest(args: argparse.Namespace) -> int:
    """``--name``: drain a piped stream at once (QEMU must not wait for our start-up), then store it."""
    from snapfs.stream.spool import PipeCapture

    path = store_path(args)
    capture = PipeCapture(0, _capture_dir(path)) if stat.S_ISFIFO(os.fstat(0).st_mode) else None
    try:
        from snapfs.store import Store
        from snapfs.stream.ingest import ingest_stream

        with Store.open(path, create=True) as store:
            info = ingest_stream(capture or sys.stdin.buffer, store, args.name)
    finally:
        if capture is not None:
            capture.close()
    if args.json:
        print(json.dumps(info.to_json(), sort_keys=True))
    else:
        print(f"{info.name}: {info.kind} snapshot of {info.region_count} RAMBlocks, "
              f"{format_bytes(info.resident_bytes)} RAM, {format_bytes(info.stored_bytes)} stored")
    return 0


def _capture_dir(store: Path) -> Path | None:
    """Where the raw stream goes while it arrives: the store's disk (the store may not exist yet)."""
    for d in (store, store.parent):
        if d.is_dir() and os.access(d, os.W_OK):
            return d
    return None
