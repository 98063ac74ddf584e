"""``snapfs incoming --name``: store a migration stream as a snapshot.

The stream is read to its end and validated into a page spool first (see
:mod:`snapfs.stream.spool`; QEMU may send a page several times), then each RAMBlock becomes a
``ramblock`` region and its pages go to the store. The configuration and the device state
are kept verbatim as blobs so the snapshot's ``vmstate`` view is a stream QEMU restores.
Nothing is published unless everything succeeded: any error aborts the writer.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any, BinaryIO

from snapfs.store import RegionSpec, SnapshotInfo, Store
from snapfs.stream.reader import Limits
from snapfs.stream.spool import SENT_DATA, SENT_ZERO, SpooledStream, capture_pipe, spool_stream
from snapfs.stream.vmstate import BLOB_CONFIGURATION, BLOB_DEVICES, META_KEY


def drain(src: BinaryIO, chunk: int = 1 << 20) -> None:
    """Read ``src`` to its end, discarding it (so a writer such as QEMU never blocks)."""
    try:
        while src.read(chunk):
            pass
    except OSError:
        pass


def ingest_stream(
    src: BinaryIO,
    store: Store,
    name: str,
    meta: dict[str, Any] | None = None,
    limits: Limits = Limits(),
    progress: Callable[[int], None] | None = None,
) -> SnapshotInfo:
    """Read the stream ``src`` and commit it to ``store`` as snapshot ``name``.

    The name is reserved first (NameInUse before any input is consumed). On any error the
    rest of ``src`` is drained, the writer aborted and the error re-raised.
    """
    writer = store.begin_snapshot(name, {})
    raw = None
    try:
        if _is_pipe(src):
            # A writer such as QEMU's `migrate exec:` is drained as fast as `cat > file`;
            # the stream is parsed afterwards.
            raw = src = capture_pipe(src.fileno(), spool_dir(store))
        spooled = spool_all(src, store, limits, progress)
    except BaseException:
        writer.abort()
        raise
    finally:
        if raw is not None:
            raw.close()
    return commit_spooled(writer, spooled, meta or {})


def _is_pipe(src: BinaryIO) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(src.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):
        return False


def spool_all(
    src: BinaryIO, store: Store, limits: Limits = Limits(), progress: Callable[[int], None] | None = None
) -> SpooledStream:
    """Spool and validate the whole stream next to ``store``; on error drain ``src`` and raise."""
    try:
        return spool_stream(src, directory=spool_dir(store), limits=limits, progress=progress)
    except BaseException:
        drain(src)
        raise


def commit_spooled(writer: Any, spooled: SpooledStream, meta: dict[str, Any]) -> SnapshotInfo:
    """Write a spooled stream's RAMBlocks and blobs through ``writer`` and commit it.

    The writer is aborted on any error; the spool is closed in every case.
    """
    try:
        _write_pages(writer, spooled)
        if spooled.header.raw:
            writer.put_blob(BLOB_CONFIGURATION, spooled.header.raw)
        if spooled.devices is not None:
            writer.put_blob(BLOB_DEVICES, spooled.devices)
        return writer.commit(_snapshot_meta(spooled, meta))
    except BaseException:
        writer.abort()
        raise
    finally:
        spooled.close()


def spool_dir(store: Store) -> str | None:
    """Spool next to the store (same disk, not RAM-backed /tmp), else the default temp dir."""
    path = getattr(store, "path", None)
    return str(path) if path is not None and os.access(path, os.W_OK) else None


def _snapshot_meta(s: SpooledStream, extra: dict[str, Any]) -> dict[str, Any]:
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
    if s.header.machine:
        meta["comm"] = f"qemu ({s.header.machine})"
    meta.update(extra)
    return meta


def _write_pages(writer: Any, s: SpooledStream) -> None:
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
        idx = writer.add_region(
            RegionSpec(name=block.name, start=start, length=block.length, perms="rw-p",
                       kind="ramblock", meta=region_meta)
        )
        start += block.length
        for first, states, pages in s.spool.batches(bi):
            mask = (states == SENT_DATA) | (states == SENT_ZERO)
            writer.put_pages(idx, first, pages, mask)
