"""``snapfs snapshot --qmp SOCKET``: the command line side of a VM snapshot.

The snapshot itself is :func:`snapfs.stream.qmp_snapshot.snapshot_vm`; this module checks
the options, shows its progress on a terminal and prints the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import trio

from snapfs.commands.common import ProgressLine, store_path
from snapfs.errors import UsageError, reported_error
from snapfs.stream.qmp_snapshot import VmProgress, snapshot_vm
from snapfs.units import format_bytes, format_rate


def run(args: argparse.Namespace) -> int:
    """``snapfs snapshot --qmp SOCK [--name N] [--store DIR] [--json]``."""
    for option in ("every", "rate", "pid"):
        if getattr(args, option, None):
            raise UsageError(f"--{option} does not apply to --qmp (QEMU's background snapshot "
                             "runs unthrottled, once)" if option != "pid" else "give either a PID or --qmp")
    name = args.name or time.strftime("vm-%Y%m%d-%H%M%S")
    line = ProgressLine() if sys.stderr.isatty() and not args.json else None
    try:
        result = trio.run(partial(snapshot_vm, number_if_taken=args.name is None), str(args.qmp),
                          store_path(args), name, None if line is None else lambda p: line.show(progress_text(p)))
    except BaseExceptionGroup as group:
        raise reported_error(group) from None
    finally:
        if line is not None:
            line.clear()
    info = result["info"]
    if args.json:
        print(json.dumps({**info.to_json(), "qemu": result["qemu"]}, indent=2, sort_keys=True))
    else:
        q = result["qemu"]
        print(
            f"{info.name}: VM snapshot, {format_bytes(info.resident_bytes)} RAM in "
            f"{info.region_count} RAMBlocks, {format_bytes(info.stored_bytes)} stored; "
            f"QEMU downtime {q['downtime_ms']} ms, total {q['total_time_ms']} ms"
        )
    return 0


def progress_text(p: VmProgress) -> str:
    """The progress line for a VM snapshot."""
    if p.storing:
        return "snapshot: QEMU done, storing the stream..."
    rate = p.transferred_bytes / p.elapsed_s if p.elapsed_s > 0 else 0.0
    return (f"snapshot: {format_bytes(p.done_bytes)} of {format_bytes(p.total_bytes)} RAM, "
            f"{format_rate(rate)}")
