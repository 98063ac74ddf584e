"""``snapfs mount``, ``snapfs umount`` and ``snapfs cat``: the snapshots as files."""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import stat
import sys
from pathlib import Path

from snapfs.commands.common import add_store_argument, store_path
from snapfs.errors import SnapfsError, UsageError

CAT_CHUNK = 4 << 20


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``mount``, ``umount`` and ``cat`` commands."""
    p = subparsers.add_parser(
        "mount", help="present every snapshot as files under MOUNTPOINT (read-only, FUSE)",
        description="Mount the store read-only: MOUNTPOINT/<snapshot>/{info.json,mem,ramblocks/"
        "<block>/{data,info.json},vmstate}. Returns once the mount is usable; the daemon serves "
        "in the background until `snapfs umount MOUNTPOINT`.")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="an empty directory")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="serve in the foreground (Ctrl-C unmounts)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="FUSE mount options, comma separated (e.g. allow_other); repeatable")
    p.add_argument("--log-file", type=Path, metavar="FILE", help="log of the mount daemon")
    add_store_argument(p)
    p.set_defaults(func=run_mount)

    u = subparsers.add_parser("umount", help="unmount a snapfs mount (also after its daemon died)",
                              description="Unmount MOUNTPOINT with fusermount3 -u; lazily if the "
                              "daemon is gone.")
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    u.set_defaults(func=run_umount)

    c = subparsers.add_parser(
        "cat", help="write a file of a snapshot to stdout, without mounting",
        description="Write SNAPSHOT/PATH (as laid out by `snapfs mount`) to stdout, e.g. "
        "`snapfs cat app ramblocks/heap/data` or `snapfs cat app vmstate`.")
    c.add_argument("snapshot", metavar="SNAPSHOT")
    c.add_argument("path", metavar="PATH", help="a file inside the snapshot: info.json, mem, "
                   "vmstate, ramblocks/<block>/data, ramblocks/<block>/info.json")
    add_store_argument(c)
    c.set_defaults(func=run_cat)


def run_mount(args: argparse.Namespace) -> int:
    """Mount (daemonized unless -f)."""
    from snapfs.fs.mount import mount

    return mount(store_path(args), args.mountpoint, foreground=args.foreground,
                 options=args.options, log_file=args.log_file)


def run_umount(args: argparse.Namespace) -> int:
    """Unmount."""
    from snapfs.fs.mount import unmount

    unmount(args.mountpoint)
    return 0


def run_cat(args: argparse.Namespace) -> int:
    """Stream one file of the layout to stdout in large chunks."""
    from snapfs.fs.model import FsError, SnapshotFS
    from snapfs.fs.names import encode_name
    from snapfs.store import Store

    path = store_path(args)
    with Store.open(path, create=False) as store:
        store.info(args.snapshot)  # SnapshotNotFound, with the store's message
        fs = SnapshotFS(store, store_dir=path, max_open=1)
        try:
            view = fs.file_view(fs.resolve(f"{encode_name(args.snapshot)}/{args.path}"))
        except FsError as exc:
            if exc.errno == errno.EISDIR:
                raise UsageError(f"{args.snapshot}/{args.path} is a directory: name a file in it") from None
            raise UsageError(f"no file {args.path!r} in snapshot {args.snapshot!r}: see "
                             f"`snapfs cat {args.snapshot} info.json` for its regions") from None
        return _copy_out(view)


def _copy_out(view: object) -> int:
    out = sys.stdout.buffer
    size = int(view.size)  # type: ignore[attr-defined]
    extents = getattr(view, "data_extents", None)
    # A closed stdout (`| head`) raises BrokenPipeError: cli.main ends quietly then.
    try:
        if extents is not None and _seekable_file(out.fileno()):
            out.flush()
            write_sparse(out.fileno(), view, size, extents())
        else:
            for offset in range(0, size, CAT_CHUNK):
                out.write(view.read(offset, min(CAT_CHUNK, size - offset)))  # type: ignore[attr-defined]
            out.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EFBIG:
            hint = (f": the file is {size} bytes (in `mem` an offset is a virtual address), more than "
                    "the destination filesystem allows; pipe it, or cat a region's data instead")
        raise SnapfsError(f"cannot write the output ({exc.strerror}){hint}") from None
    return 0


def _seekable_file(fd: int) -> bool:
    """Whether ``fd`` is a regular file we may seek in (not opened for appending)."""
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
    except OSError:
        return False


def write_sparse(fd: int, view: object, size: int, extents) -> None:
    """Write only the parts of ``view`` that may hold data, each at its offset from the file
    position; the rest stays a hole (reads as zeros), so `snapfs cat NAME core > file` takes
    the space of the stored pages, not of the address space. Extents close together are read
    in one request of at most CAT_CHUNK bytes (a region of scattered pages has one extent per
    run of pages: read one by one, 512 MiB took 30 s)."""
    base = os.lseek(fd, 0, os.SEEK_CUR)
    read = getattr(view, "read_buffer", None) or view.read  # type: ignore[attr-defined]
    batch: list[tuple[int, int]] = []  # [lo, hi) pieces within one CAT_CHUNK window

    def flush() -> None:
        lo = batch[0][0]
        data = memoryview(read(lo, batch[-1][1] - lo))
        for a, b in batch:
            done = a
            while done < b:
                done += os.pwrite(fd, data[done - lo : b - lo], base + done)
        batch.clear()

    for start, length in extents:
        for pos in range(start, start + length, CAT_CHUNK):
            end = min(pos + CAT_CHUNK, start + length)
            if batch and end - batch[0][0] > CAT_CHUNK:
                flush()
            batch.append((pos, end))
    if batch:
        flush()
    if os.fstat(fd).st_size < base + size:
        os.ftruncate(fd, base + size)
    os.lseek(fd, base + size, os.SEEK_SET)
