"""``snapfs snapshot --tree PID`` / ``--cgroup PATH``: one snapshot of a whole process tree.

Every process is frozen at one instant and its shared memory is stored once (see
:mod:`snapfs.capture.tree`). With ``--every``, each later snapshot is a child of the previous
one: the store keeps only the pages whose content changed.
"""

from __future__ import annotations

import argparse
import sys

from snapfs.commands.common import ProgressLine, run_interruptible, store_path
from snapfs.commands.snapshot import check_name, default_name, interrupted_exit, progress_text, reporter
from snapfs.errors import TargetError, UsageError
from snapfs.units import count_of, format_bytes, format_rate


def summary(result) -> str:
    """The two human lines for a finished tree snapshot."""
    rate = result.resident_bytes / result.duration_s if result.duration_s > 0 else 0.0
    exited = f" · {len(result.exited)} exited during the capture" if result.exited else ""
    return (
        f"snapshot {result.name}: {result.processes} processes, "
        f"{format_bytes(result.resident_bytes)} resident ({format_bytes(result.shared_bytes)} shared, "
        f"stored once, in {result.shared_objects} objects)\n"
        f"paused {result.pause_ms:.1f} ms (+{result.attach_pause_ms:.1f} ms to attach) · captured "
        f"{format_bytes(result.resident_bytes)} in {result.duration_s:.1f} s ({format_rate(rate)}) · "
        f"{count_of(result.faults, 'write fault')} served first · stored "
        f"{format_bytes(result.stored_bytes)}{exited}"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``snapfs snapshot --tree/--cgroup``; returns the exit code."""
    if args.tree is not None and args.cgroup is not None:
        raise UsageError("give either --tree PID or --cgroup PATH, not both")
    if args.pid is not None or args.qmp:
        raise UsageError("--tree/--cgroup take the place of PID and --qmp: give one of them")
    if args.name is not None:
        check_name(args.name)

    import trio

    from snapfs.capture.engine import CaptureOptions
    from snapfs.capture.processes import cgroup_dir, proc_stat
    from snapfs.capture.tree import TreeTarget, capture_tree
    from snapfs.store import Store

    if args.tree is not None:
        st = proc_stat(args.tree)
        if st is None or not st.capturable:
            raise TargetError(f"no process with PID {args.tree}: check the PID (ps -p {args.tree})")
        target = TreeTarget(pid=args.tree)
        label, ident = st.comm, args.tree
    else:
        cg = cgroup_dir(args.cgroup)
        target = TreeTarget(cgroup=str(cg))
        label, ident = cg.name.removesuffix(".service") or "cgroup", "tree"
    line = ProgressLine() if sys.stderr.isatty() and not args.json else None
    progress = None if line is None else (lambda p: line.show(progress_text(p)))
    store = Store.open(store_path(args), create=True)
    taken: list[str] = []

    report = reporter(args, line, summary)

    async def series() -> None:
        n = 0
        while True:
            started = trio.current_time()
            n += 1
            name = args.name or default_name(f"{label}-tree", ident)
            if args.every is not None:
                name = f"{args.name}-{n}" if args.name else default_name(f"{label}-tree", ident)
            opts = CaptureOptions(rate=args.rate, rate_deadline=args.rate_deadline,
                                  include_readonly=args.include_readonly, parent=taken[-1] if taken else None,
                                  number_if_taken=args.name is None)
            try:
                result = await capture_tree(target, store, name, opts, progress=progress)
            except TargetError:
                if not taken:
                    raise
                print(f"snapfs: the tree ended; stopped after {count_of(len(taken), 'snapshot')} (last: {taken[-1]})",
                      file=sys.stderr)
                return
            taken.append(result.name)
            report(result)
            if args.every is None:
                return
            await trio.sleep_until(started + args.every)

    try:
        _, interrupted = run_interruptible(series)
    finally:
        if line is not None:
            line.clear()
        store.close()
    return interrupted_exit(taken, "every process released") if interrupted else 0
