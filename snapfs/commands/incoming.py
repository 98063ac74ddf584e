"""``snapfs incoming``: read a QEMU migration stream from stdin.

``--name NAME`` stores it as a snapshot (works as the target of QEMU's ``migrate "exec:..."``);
``--pid PID`` rewinds a live process to it — memory, layout, every thread's registers — or
refuses naming what differs (``--dry-run`` reports without writing, ``--force`` restores
despite differences in kernel state a restore cannot rewind).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys

from snapfs.commands.common import add_store_argument, store_path
from snapfs.errors import RestoreRefused, UsageError
from snapfs.units import count_of, format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``incoming`` command."""
    p = subparsers.add_parser(
        "incoming",
        help="read a QEMU migration stream on stdin: store it, or restore a process from it",
        description="Read a QEMU migration stream (a snapshot's vmstate, or QEMU's own "
        "`migrate` output) from stdin. With --name, store it as a new snapshot; with --pid, "
        "validate the whole stream, compare the process with the snapshot (fd table, epoll "
        "registrations, threads, signal dispositions, mappings), then stop it, restore its "
        "layout, memory and every thread's registers, and resume it — or refuse, naming "
        "what differs, and touch nothing.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--name", metavar="NAME", help="store the stream as snapshot NAME")
    what.add_argument("--pid", metavar="PID", type=int, help="restore the memory of process PID")
    p.add_argument("--dry-run", action="store_true",
                   help="with --pid: validate, compare and report everything; write nothing")
    p.add_argument("--force", action="store_true",
                   help="with --pid: restore although the process's kernel state (fds, threads, "
                   "signals) differs from the snapshot's, or was not recorded; says what may break")
    p.add_argument("--hang-up", action="store_true",
                   help="with --pid: sockets closed since the snapshot are re-created (same fd, same "
                   "epoll registrations) as connections whose peer hung up, sockets opened since are "
                   "closed: the process sees those connections end instead of a refusal")
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
        from snapfs.stream.restore import restore_process  # numpy: only for --pid

        result = restore_process(src, args.pid, dry_run=args.dry_run, force=args.force,
                                 hang_up=args.hang_up)
        if args.json:
            print(json.dumps(result.to_json(), sort_keys=True))
        else:
            _print_restore(result)
        if result.dry_run and (result.problems or (result.differences and not args.force)):
            return RestoreRefused.exit_code
        return 0
    if args.dry_run or args.force or args.hang_up:
        raise UsageError("--dry-run, --force and --hang-up go with --pid")
    return _ingest(args)


def _print_restore(r) -> None:
    """The human report of ``incoming --pid`` (everything with --dry-run)."""
    what = f"snapshot {r.snapshot}" if r.snapshot else "the stream"
    print(f"{what}: {count_of(r.blocks, 'block')}, {count_of(r.pages_sent, 'page')}, registers of {count_of(r.threads, 'thread')}")
    if r.dry_run or r.layout:
        print(f"layout: {len(r.layout)} syscalls to inject" + "".join(f"\n  {op}" for op in r.layout))
    if r.fd_changes:
        print("fd table:" + "".join(f"\n  {x}" for x in r.fd_changes))
    for title, items in (("cannot restore", r.problems), ("differs from the snapshot", r.differences)):
        if items and (r.dry_run or not r.restored):
            print(f"{title}:" + "".join(f"\n  {x}" for x in items))
    if r.dry_run:
        verdict = ("would refuse" if r.problems else
                   "would refuse (--force restores anyway)" if r.differences else "would restore")
        print(f"dry run, nothing written: {verdict} process {r.pid}")
        return
    print(f"process {r.pid}: restored {count_of(r.blocks, 'block')} ({r.pages_written} of {count_of(r.pages_sent, 'page')} "
          f"differed and were written), {count_of(len(r.layout), 'layout syscall')}, registers of {count_of(r.threads, 'thread')}")
    if r.forced:
        print("--force: restored although the process differs from the snapshot; the restored "
              "memory may disagree with the kernel and the process may misbehave where it does:"
              + "".join(f"\n  not rewound: {x}" for x in r.forced), file=sys.stderr)


def _ingest(args: argparse.Namespace) -> int:
    """``--name``: drain a piped stream at once (QEMU must not wait for our start-up), then store it."""
    from snapfs.stream.spool import PipeCapture, spool_dir

    path = store_path(args)
    capture = PipeCapture(0, spool_dir(path)) if stat.S_ISFIFO(os.fstat(0).st_mode) else None
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
