"""``snapfs incoming --name``: store a migration stream as a snapshot.

A pipe is drained into a file by a separate process as fast as it arrives, so the writer
(QEMU) never waits for ingest; this process parses it meanwhile at idle priority. The stream
is read to its end and validated into a page spool first (see :mod:`snapfs.stream.spool`;
QEMU may send a page several times), then each RAMBlock becomes a
``ramblock`` region and its pages go to the store. The configuration and the device state
are kept verbatim as blobs so the snapshot's ``vmstate`` view is a stream QEMU restores.
Nothing is published unless everything succeeded: any error aborts the writer.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from snapfs.capture.relocated import HOLES_META
from snapfs.errors import StreamError
from snapfs.store import RegionSpec, SnapshotInfo, Store
from snapfs.store.model import REGION_KINDS
from snapfs.stream import procdesc
from snapfs.stream.procdesc import DESC_BLOB, carried
from snapfs.stream.reader import Limits
from snapfs.stream.spool import SENT_DATA, SENT_ZERO, PipeCapture, SpooledStream, spool_dir, spool_stream
from snapfs.stream.vmstate import BLOB_CONFIGURATION, BLOB_DEVICES, META_KEY


def drain(src: BinaryIO, chunk: int = 1 << 20) -> None:
    """Read ``src`` to its end, discarding it (so a writer such as QEMU never blocks)."""
    try:
        while src.read(chunk):
            pass
    except OSError:
        pass


def ingest_stream(
    src: BinaryIO | PipeCapture,
    store: Store,
    name: str,
    meta: dict[str, Any] | None = None,
    limits: Limits = Limits(),
    progress: Callable[[int], None] | None = None,
) -> SnapshotInfo:
    """Read the stream ``src`` and commit it to ``store`` as snapshot ``name``.

    A pipe is drained by a :class:`PipeCapture` (a writer such as QEMU's ``migrate exec:``
    never waits for this process) while the stream is parsed here at idle priority; the
    caller may pass a capture it started earlier (it is closed here either way). On any error
    the rest of the stream is drained, the writer aborted and the error re-raised.
    """
    capture = src if isinstance(src, PipeCapture) else None
    try:
        if capture is None and _is_pipe(src):
            capture = PipeCapture(src.fileno(), spool_dir(store.path))
        writer = store.begin_snapshot(name, {})
        try:
            if capture is not None:
                spooled = spool_capture(capture, store, limits, progress)
            else:
                spooled = spool_all(src, store, limits, progress)  # type: ignore[arg-type]
        except BaseException:
            writer.abort()
            raise
        return commit_spooled(writer, spooled, meta or {})
    finally:
        if capture is not None:
            capture.close()


def _is_pipe(src: BinaryIO) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(src.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):
        return False


@contextmanager
def idle_while_streaming(capture: PipeCapture | None) -> Iterator[None]:
    """Run the calling thread at SCHED_IDLE until the writer has sent the whole stream.

    While the writer is still sending, parsing must not take CPU from it (on a small machine
    QEMU's vCPU and migration threads need every core). As soon as the writer closes the
    pipe — not when the parser, far behind on a busy machine, reaches the end — the normal
    policy returns so the ingest catches up (a 512 MiB VM with both CPUs busy: parsing at
    idle to the end took 15-20 s). Without a capture (a file) nothing changes.
    """
    if capture is None or capture.ended:
        yield
        return
    tid = threading.get_native_id()
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        yield
        return

    def restore() -> None:
        try:
            os.sched_setscheduler(tid, policy, param)  # a thread id: that thread only
        except OSError:
            pass  # unprivileged, RLIMIT_NICE too low to leave SCHED_IDLE: stay there

    stop_watch = capture.watch_captured(restore)
    try:
        yield
    finally:
        stop_watch()
        restore()


def spool_capture(capture: PipeCapture, store: Store, limits: Limits = Limits(),
                  progress: Callable[[int], None] | None = None) -> SpooledStream:
    """Spool a stream as its capture grows, at idle priority until the writer is done."""
    with idle_while_streaming(capture):
        return spool_all(capture, store, limits, progress)


def spool_all(
    src: BinaryIO | PipeCapture, store: Store, limits: Limits = Limits(),
    progress: Callable[[int], None] | None = None,
) -> SpooledStream:
    """Spool and validate the whole stream next to ``store``; on error drain ``src`` and raise.

    (A :class:`PipeCapture` is not drained here: closing it discards the rest.)
    """
    source, base = _stream_file(src)
    try:
        spooled = spool_stream(src, directory=spool_dir(store.path), limits=limits, progress=progress,
                               source=source, source_base=base)
        if isinstance(src, PipeCapture):
            spooled.source_owner = src  # its file holds the pages until the spool is closed
        return spooled
    except BaseException:
        if not isinstance(src, PipeCapture):
            drain(src)
        raise


def _stream_file(src: BinaryIO | PipeCapture) -> tuple[int | None, int]:
    """(fd, offset) of a file already holding ``src``'s bytes from that offset on, so the
    spool references pages there instead of copying them: a capture's file, or a regular file
    given as ``src``; (None, 0) for anything else."""
    if isinstance(src, PipeCapture):
        return src.file_fd, 0
    try:
        fd = src.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode) and src.seekable():
            return fd, src.tell()  # the logical position: read-ahead buffering accounted for
    except (AttributeError, OSError, ValueError):
        pass
    return None, 0


def commit_spooled(writer: Any, spooled: SpooledStream, meta: dict[str, Any]) -> SnapshotInfo:
    """Write a spooled stream's RAMBlocks and blobs through ``writer`` and commit it.

    The writer is aborted on any error; the spool is closed in every case.
    """
    try:
        desc = carried(spooled.vmdesc)
        image = _process_image(spooled)
        _write_pages(writer, spooled, image)
        if spooled.header.raw:
            writer.put_blob(BLOB_CONFIGURATION, spooled.header.raw)
        if spooled.devices is not None:
            writer.put_blob(BLOB_DEVICES, spooled.devices)
        if desc is not None:  # a snapfs process stream: its vmstate keeps the description
            writer.put_blob(DESC_BLOB, desc)
        return writer.commit({**_snapshot_meta(spooled, image), **meta})
    except BaseException:
        writer.abort()
        raise
    finally:
        spooled.close()


def _process_image(s: SpooledStream) -> procdesc.ProcessImage | None:
    """The process description a snapfs process stream carries (None for a QEMU stream or
    one without it); a description that does not match the stream's RAMBlocks is an error."""
    image = procdesc.parse(s.vmdesc)
    if image is None:
        return None
    bad = sorted({r.kind for r in image.regions} - set(REGION_KINDS))
    if bad:
        raise StreamError(f"the stream's snapfs description names unknown region kinds {bad}")
    blocks = [(b.name, b.length) for b in s.blocks]
    described = [(r.block, r.length) for r in image.regions]
    if blocks != described:
        raise StreamError("the stream's snapfs description does not match its RAMBlocks "
                          f"({len(described)} described, {len(blocks)} sent)")
    return image


def _snapshot_meta(s: SpooledStream, image: procdesc.ProcessImage | None) -> dict[str, Any]:
    stream = {
        "machine": s.header.machine,
        "ram_section_id": s.ram_section_id,
        "capabilities": list(s.header.capabilities),
        "stream_bytes": s.stream_bytes,
        "data_records": s.spool.data_records,
        "zero_records": s.spool.zero_records,
        "duplicate_records": s.spool.duplicates,
        "device_state_bytes": len(s.devices) if s.devices is not None else 0,
    }
    meta: dict[str, Any] = {"kind": "vm" if s.devices is not None else "process", META_KEY: stream}
    if image is not None:
        # A snapfs process stream: the process it was taken of, and its threads' registers
        # (the core view's); the instant is the original capture's.
        proc = image.process
        meta.update({k: proc[k] for k in ("pid", "comm", "exe", "cmdline", "created") if proc.get(k) is not None})
        if image.threads:
            meta["threads"] = {str(t.tid): {"comm": t.comm, "regs": t.regs} for t in image.threads}
        if image.snapshot:
            meta["ingested_from"] = image.snapshot
    elif s.header.machine:
        meta["comm"] = f"qemu ({s.header.machine})"
    return meta


def _region_spec(block: Any, start: int, desc: procdesc.RegionDesc | None, meta: dict[str, Any]) -> RegionSpec:
    """The region a RAMBlock becomes: where the description says it lived, or (a QEMU
    stream) a ``ramblock`` region laid after the previous one."""
    if desc is None:
        return RegionSpec(name=block.name, start=start, length=block.length, perms="rw-p",
                          kind="ramblock", meta=meta)
    meta.update({k: v for k, v in (("dev", desc.dev), ("inode", desc.inode), ("mode", desc.mode)) if v})
    if desc.mode == HOLES_META["mode"]:
        # Only the changed pages (and ELF header) of a read-only file mapping were sent
        # (snapfs.capture.relocated): the rest are the file's, and its vmstate again leaves
        # them unsent.
        meta["holes"] = HOLES_META["holes"]
    return RegionSpec(name=block.name, start=desc.start, length=desc.length, perms=desc.perms,
                      offset=desc.offset, path=desc.path, kind=desc.kind, page_size=desc.page_size,
                      meta=meta)


def _write_pages(writer: Any, s: SpooledStream, image: procdesc.ProcessImage | None = None) -> None:
    ignore_shared = "x-ignore-shared" in s.header.capabilities
    start = 0
    for bi, block in enumerate(s.blocks):
        region_meta: dict[str, Any] = {}
        if block.extra:
            region_meta["ram_extra"] = block.extra.hex()
        sent = s.spool.sent_pages(bi)
        if ignore_shared and sent == 0:
            # x-ignore-shared: QEMU sends no pages of a shared block; the destination maps it.
            region_meta["ignored"] = True
        idx = writer.add_region(_region_spec(block, start, image.regions[bi] if image else None, region_meta))
        start += block.length
        for first, states, pages in s.spool.batches(bi):
            mask = (states == SENT_DATA) | (states == SENT_ZERO)
            writer.put_pages(idx, first, pages, mask)
