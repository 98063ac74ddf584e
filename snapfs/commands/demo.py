"""``snapfs demo``: start a built-in demo target, snapshot it live, show how to browse it."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys

from snapfs.commands.common import ProgressLine, add_store_argument, store_path
from snapfs.commands.snapshot import EXIT_INTERRUPTED, progress_text, snapshot_process, summary
from snapfs.errors import SnapfsError
from snapfs.units import format_bytes, format_count

MARKER = b"snapfs-demo-marker"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    p = sub.add_parser(
        "demo",
        help="snapshot a built-in demo target that keeps writing memory",
        description="Start a demo process that fills memory (zero, text and random pages) and keeps "
        "writing it, take a live snapshot of it, verify it, and show how to browse it.",
    )
    p.add_argument("--mib", type=int, default=256, help="demo target size in MiB (default 256)")
    p.add_argument("--rate", type=int, default=20000, help="page writes per second by the target")
    add_store_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the snapshot command's exit code."""
    from snapfs.capture.types import CaptureOptions
    from snapfs.store import Store

    store = store_path(args)
    target = subprocess.Popen(
        [sys.executable, "-m", "snapfs.demo_target", "--mib", str(args.mib), "--rate", str(args.rate)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = target.stdout.readline().split() if target.stdout else []
        if len(line) != 3 or line[0] != "ready":
            raise SnapfsError("the demo target did not start (see its error above)")
        addr, length = int(line[1], 16), int(line[2])
        name = "demo-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        print(f"demo target: pid {target.pid}, {format_bytes(length)} buffer at {addr:#x}, "
              f"writing {format_count(args.rate)} pages/s\n")
        line = ProgressLine() if sys.stderr.isatty() else None
        try:
            with Store.open(store, create=True) as opened:
                result = snapshot_process(target.pid, opened, name, CaptureOptions(number_if_taken=True),
                                          progress=None if line is None
                                          else lambda p: line.show(progress_text(p)))
        finally:
            if line is not None:
                line.clear()
        if result is None:
            print("snapfs: interrupted: demo target released, snapshot discarded", file=sys.stderr)
            return EXIT_INTERRUPTED
        name = result.name  # numbered if a demo of the same second took the name
        print(summary(result))
        block = _verify(store, name, addr, length, result.resident_bytes)
        gdb_core = _show_core(store, name)
    finally:
        target.kill()
        target.wait()
    snapfs, st, marker = snapfs_command(), shlex.quote(str(store)), MARKER.decode()
    data = f"/tmp/snaps/{name}/ramblocks/{block}/data"
    print(
        f"\nBrowse it (store {store}):\n"
        f"  {snapfs} list --store {st}\n"
        f"  mkdir -p /tmp/snaps && {snapfs} mount /tmp/snaps --store {st}\n"
        f"  ls /tmp/snaps/{name}/ramblocks\n"
        f"  grep -ao {marker} {data} | wc -l      # counts the markers (grep -c would count lines)\n"
        f"  {gdb_core} /tmp/snaps/{name}/core -batch -ex 'thread apply all bt'\n"
        f"  {snapfs} umount /tmp/snaps\n"
        f"Without FUSE: {snapfs} cat {name} ramblocks/{block}/data --store {st} | grep -ao {marker} | wc -l"
    )
    return 0


def snapfs_command() -> str:
    """This snapfs as a command that runs as printed: ``snapfs`` when that is on PATH and is
    this one, else the script's absolute path (``./tools/demo`` runs ``.venv/bin/snapfs``,
    which is not on PATH), else ``python -m snapfs`` with this interpreter."""
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script) == "snapfs" and os.access(script, os.X_OK):
        found = shutil.which("snapfs")
        if found and os.path.realpath(found) == os.path.realpath(script):
            return "snapfs"
        return shlex.quote(script)
    return f"{shlex.quote(sys.executable)} -m snapfs"


def _show_core(store_dir, name: str) -> str:
    """Open the snapshot's ``core`` with gdb (when installed) and print the innermost frames
    of the main thread; return the gdb command line to put before a core's path."""
    import shlex
    import shutil
    import tempfile

    from snapfs.commands.mount import write_sparse
    from snapfs.fs.core import CoreView
    from snapfs.store import Store

    with Store.open(store_dir) as store:
        view = CoreView(store.open_snapshot(name))
        exe = view.state.exe
        gdb = f"gdb {shlex.quote(exe)}" if exe else "gdb -c"
        if shutil.which("gdb") is None:
            print(f"core: `{view.describe()['open']}` opens the snapshot in gdb (not installed here)")
            return gdb
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/core"
            with open(path, "wb") as f:
                write_sparse(f.fileno(), view, view.size, view.data_extents())
            res = subprocess.run(["gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off",
                                  "-ex", "bt 6", *([exe] if exe else []), path],
                                 capture_output=True, text=True, timeout=120)
    # gdb prints the innermost frame once on loading the core, then again in the backtrace.
    frames = list(dict.fromkeys(line for line in res.stdout.splitlines() if line.startswith("#")))
    print(f"core: `{view.describe()['open']}` shows every thread at the snapshot instant; "
          "the main thread's innermost frames:")
    for line in frames or ["(gdb printed no frames)"]:
        print(f"  {line[:110]}")
    return gdb


def _verify(store_dir, name: str, addr: int, length: int, resident: int) -> str:
    """Read the demo buffer back from the store; print what was found and why the snapshot's
    resident size is not the buffer's; return the buffer's block name."""
    from snapfs.store import HOLE, Store
    from snapfs.store.model import STORE_PAGE as PAGE

    store = Store.open(store_dir)
    try:
        reader = store.open_snapshot(name)
        region = next(r for r in reader.regions if r.start <= addr < r.start + r.length)
        found, chunk = 0, 8 << 20
        first = addr - region.start
        for off in range(first, min(first + length, region.length), chunk):
            found += reader.read(region.index, off, min(chunk, first + length - off)).count(MARKER)
        print(f"verified: block {region.name} read back from the store, {format_count(found)} "
              f"marker strings found in the demo buffer")
        # Resident counts the pages the process has: the buffer's zero pages were never
        # written, so they have no memory and nothing is copied for them.
        lo, hi = first // PAGE, (first + length) // PAGE
        held = sum(max(0, min(p + n, hi) - max(p, lo)) for p, n, kind in reader.runs(region.index)
                   if kind != HOLE) * PAGE
        print(f"resident {format_bytes(resident)}: {format_bytes(held)} of the {format_bytes(length)} buffer "
              f"(its other {format_bytes(length - held)} are zero pages the target never wrote: no "
              f"memory, nothing to copy) + {format_bytes(max(0, resident - held))} of the Python "
              "interpreter's own memory")
        return region.name
    finally:
        store.close()
