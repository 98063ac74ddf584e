"""``snapfs snapshot PID``: a live point-in-time snapshot of a running process.

(``--qmp SOCKET`` snapshots a QEMU VM instead: :mod:`snapfs.commands.vm`.)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from snapfs.commands.common import ProgressLine, add_store_argument, run_interruptible, store_path
from snapfs.errors import TargetError, UsageError
from snapfs.units import count_of, format_bytes, format_rate, parse_duration, parse_size

EXIT_INTERRUPTED = 130


def _arg(parse):
    """Wrap a snapfs.units parser for argparse (which reports ArgumentTypeError on one line)."""

    def convert(text: str):
        try:
            return parse(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def register(subparsers) -> None:
    """Add the ``snapshot`` command."""
    p = subparsers.add_parser(
        "snapshot",
        help="take a live snapshot of a running process (or of a QEMU VM with --qmp)",
        description="Take a live point-in-time snapshot of process PID: the target is paused "
        "only while its memory is write-protected, then keeps running while its pages are "
        "saved (pages it writes meanwhile are saved first).",
    )
    p.add_argument("pid", nargs="?", type=int, metavar="PID", help="process to snapshot")
    p.add_argument("--name", help="snapshot name (default: <comm>-<pid>-<UTC timestamp>, "
                   "numbered -2, -3, ... when a snapshot of the same second has it)")
    add_store_argument(p)
    p.add_argument(
        "--rate",
        metavar="BYTES_PER_S",
        type=_arg(_parse_rate),
        default=None,
        help="limit the background copy (e.g. 200M; at least 1M); write faults are always "
        "served at once. After --rate-deadline the rest is copied at full speed",
    )
    p.add_argument(
        "--rate-deadline",
        metavar="DURATION",
        type=_arg(parse_duration),
        default=600.0,
        help="how long --rate may stretch the copy (default 10m): the target stays "
        "write-protected until it ends, and each of its writes meanwhile is a fault",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    p.add_argument(
        "--include-readonly",
        action="store_true",
        help="also capture read-only file-backed mappings (default: skipped)",
    )
    p.add_argument("--qmp", metavar="SOCKET", help="snapshot the QEMU VM behind this QMP socket")
    p.add_argument(
        "--tree",
        metavar="PID",
        type=int,
        default=None,
        help="snapshot PID and all its descendants at one instant, shared memory stored once",
    )
    p.add_argument(
        "--cgroup",
        metavar="PATH",
        default=None,
        help="snapshot every process of a cgroup (e.g. system.slice/postgresql.service) at "
        "one instant, shared memory stored once",
    )
    p.add_argument(
        "--every",
        metavar="DURATION",
        type=_arg(parse_duration),
        default=None,
        help="keep taking snapshots every DURATION (e.g. 30s) until interrupted: writes are "
        "tracked in between, so each later snapshot copies only what changed and is an "
        "incremental child of the previous one",
    )
    p.set_defaults(func=run)


MIN_RATE = 1 << 20


def _parse_rate(text: str) -> int:
    """--rate: a size per second, at least MIN_RATE."""
    rate = parse_size(text)
    if rate < MIN_RATE:
        raise UsageError(
            f"--rate {text} is too low: at least 1M (1 MiB/s); the target stays write-protected "
            "until the copy ends"
        )
    return rate


def check_name(name: str) -> str:
    """Reject names that cannot be a directory entry."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise UsageError(f"bad snapshot name {name!r}: it must not contain '/' or NUL, nor be '.' or '..'")
    return name


def default_name(comm: str, pid: int, when: float | None = None) -> str:
    """``<comm>-<pid>-<UTC timestamp>``, with characters a name cannot hold replaced."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    safe = re.sub(r"[^A-Za-z0-9._:@+-]", "_", comm).lstrip(".-") or "process"
    return f"{safe}-{pid}-{stamp}"


def progress_text(p) -> str:
    """The progress line of a capture (a :class:`snapfs.capture.Progress`): the rate of the
    last seconds and the time left at it, rounded up ("ETA 0 s" never shows while pages
    remain; once all are saved the store's last writes are "finishing")."""
    if p.done_bytes >= p.total_bytes:
        eta = "finishing"
    elif p.eta_s is None:
        eta = "ETA -"
    else:
        eta = f"ETA {math.ceil(p.eta_s)} s"
    rate = "- MB/s" if p.rate is None else format_rate(p.rate)
    return (
        f"{format_bytes(p.done_bytes)} / {format_bytes(p.total_bytes)} · "
        f"{rate} · {count_of(p.faults, 'fault')} · {eta}"
    )


def _attach(result) -> str:
    """The earlier short stop that took the uffd, when there was one."""
    ms = getattr(result, "attach_pause_ms", 0.0)
    return f" (+{ms:.1f} ms to attach)" if ms else ""


def summary(result) -> str:
    """The two human lines for a finished snapshot (for a tracked ``--every`` child: what
    it copied, what it inherited from its parent)."""
    first = (f"snapshot {result.name}: pid {result.pid} ({result.comm}), "
             f"{format_bytes(result.resident_bytes)} resident in {count_of(result.region_count, 'region')}\n"
             f"paused {result.pause_ms:.1f} ms{_attach(result)} · ")
    copied = getattr(result, "copied_bytes", None)
    if copied is not None:
        return first + (
            f"copied {format_bytes(copied)} written since {result.parent or 'the parent'} in "
            f"{result.duration_s:.1f} s · inherited {format_bytes(result.inherited_bytes)} unchanged · "
            f"stored {format_bytes(result.stored_bytes)}"
        )
    rate = result.resident_bytes / result.duration_s if result.duration_s > 0 else 0.0
    return first + (
        f"captured {format_bytes(result.resident_bytes)} in "
        f"{result.duration_s:.1f} s ({format_rate(rate)}) · "
        f"{count_of(result.faults, 'write fault')} served first · "
        f"stored {format_bytes(result.stored_bytes)}"
    )


def snapshot_process(pid: int, store, name: str, options=None, progress=None):
    """One live snapshot of process ``pid`` into ``store`` (what ``snapfs snapshot PID``
    runs; ``snapfs demo`` too): its :class:`~snapfs.capture.CaptureResult`, or None when
    SIGINT/SIGTERM interrupted it (the target released, nothing published)."""
    from snapfs.capture.engine import capture_process

    result, _ = run_interruptible(lambda: capture_process(pid, store, name, options, progress))
    return result


def run(args: argparse.Namespace) -> int:
    """Run ``snapfs snapshot``; returns the exit code."""
    if args.tree is not None or args.cgroup is not None:
        from snapfs.commands import tree_snapshot

        return tree_snapshot.run(args)
    if args.qmp:
        from snapfs.commands import vm

        return vm.run(args)
    if args.pid is None:
        raise UsageError("give the PID of the process to snapshot (or --tree PID, --cgroup PATH, "
                         "or --qmp SOCKET for a VM)")
    if args.name is not None:
        check_name(args.name)

    from snapfs.capture.engine import CaptureOptions
    from snapfs.capture.ptrace import check_target
    from snapfs.store import Store

    comm = check_target(args.pid)
    line = ProgressLine() if sys.stderr.isatty() and not args.json else None
    progress = None if line is None else (lambda p: line.show(progress_text(p)))
    options = CaptureOptions(rate=args.rate, include_readonly=args.include_readonly,
                             continuous=args.every is not None, rate_deadline=args.rate_deadline,
                             number_if_taken=args.name is None)
    store = Store.open(store_path(args), create=True)
    taken: list[str] = []  # snapshots committed (for --every)

    report = reporter(args, line, summary)

    try:
        if args.every is None:
            result = snapshot_process(args.pid, store, args.name or default_name(comm, args.pid),
                                      options, progress)
            interrupted = result is None
            if result is not None:
                report(result)
        else:
            _, interrupted = run_interruptible(
                lambda: _every(args, comm, store, options, progress, report, taken))
    finally:
        if line is not None:
            line.clear()
        store.close()
    return interrupted_exit(taken, "target released") if interrupted else 0


def reporter(args: argparse.Namespace, line: ProgressLine | None, summary_of) -> Callable[[Any], None]:
    """What prints a finished snapshot: one JSON object (``--json``) or the human lines
    (``summary_of(result)``) with the warnings on stderr, the progress line cleared first."""

    def report(result) -> None:
        if line is not None:
            line.clear()
        if args.json:
            print(json.dumps(result.to_json()), flush=True)
        else:
            print(summary_of(result), flush=True)
            for w in result.warnings:
                print(f"snapfs: warning: {w}", file=sys.stderr)

    return report


def interrupted_exit(taken: list[str], released: str) -> int:
    """The message and exit code of a snapshot command SIGINT/SIGTERM stopped: with
    ``--every`` (``taken`` non-empty) the normal way to stop; otherwise ``released`` (what
    was let go) and the snapshot in progress discarded."""
    if taken:
        print(
            f"snapfs: stopped after {count_of(len(taken), 'snapshot')} (last: {taken[-1]}); "
            "the one in progress was discarded",
            file=sys.stderr,
        )
        return 0
    print(f"snapfs: interrupted: {released}, snapshot in progress discarded", file=sys.stderr)
    return EXIT_INTERRUPTED


async def _every(args, comm: str, store, options, progress, report, taken: list[str]) -> None:
    """``--every``: a full snapshot, then one per period, each an incremental child of the
    previous one: writes are tracked in between (async write-protection), so a child copies
    only what changed, during a pause that grows with it. Until interrupted or the target
    exits."""
    import trio

    from snapfs.capture.engine import capture_process, snapshot_next

    tracking = None
    n = 0
    try:
        while True:
            started = trio.current_time()
            n += 1
            name = f"{args.name}-{n}" if args.name else default_name(comm, args.pid)
            try:
                if tracking is None:
                    result = await capture_process(args.pid, store, name, options, progress)
                    tracking = result.tracking
                else:
                    result = await snapshot_next(tracking, store, name, progress)
                    tracking = result.tracking
            except TargetError:
                if not taken:
                    raise
                # The target ended: the series is complete, not failed.
                print(f"snapfs: process {args.pid} ended; stopped after {count_of(len(taken), 'snapshot')} "
                      f"(last: {taken[-1]})", file=sys.stderr)
                return
            taken.append(result.name)
            report(result)
            await trio.sleep_until(started + args.every)
    finally:
        if tracking is not None:
            tracking.close()
