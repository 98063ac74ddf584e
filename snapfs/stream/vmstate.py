"""The ``vmstate`` view: a snapshot as a QEMU migration stream, generated while it is read.

Process snapshots become a RAM-only stream for ``-machine none`` (configuration ``none``, one
RAMBlock per captured region, named like the region). VM snapshots re-emit QEMU's own
configuration and device state (kept verbatim as store blobs at ingest) around the RAM from the
page store, so ``qemu-system-x86_64 ... -incoming "exec:cat vmstate"`` restores the VM.

Layout (deterministic for a given snapshot)::

    magic version configuration
    ram START (MEM_SIZE list of every block) EOS footer
    per block: PART, first record naming the block, CONTINUE records..., EOS footer
    process: EOF VMDESCRIPTION      vm: QEMU's device FULL sections, EOF, VMDESCRIPTION

Holes and zero pages are sent as ZERO records (fill 0), everything else as PAGE records, so
loading the stream over live memory (``snapfs incoming --pid``) resets pages to zero too. The
holes of a region whose meta says ``holes: "file"`` (the changed pages of a read-only file
mapping, :mod:`snapfs.capture.relocated`) are the file's bytes: they are not sent at all.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from snapfs.store.model import HOLE
from snapfs.stream import format as F
from snapfs.stream.writer import BlockRuns, Literal, StreamLayout, merge_runs, ram_pieces

# Store blob names written by ingest (snapfs.stream.ingest) for VM snapshots.
BLOB_CONFIGURATION = "qemu.configuration"
BLOB_DEVICES = "qemu.devices"
# SnapshotInfo.meta key holding the stream parameters of a VM snapshot.
META_KEY = "qemu_stream"
PROCESS_MACHINE = "none"


def block_idstr(name: str) -> bytes:
    """The RAMBlock idstr for a region name (QEMU idstrs are at most 255 bytes)."""
    raw = name.encode("utf-8", "replace")
    if len(raw) <= 255:
        return raw
    return raw[:238] + b"~" + hashlib.sha1(raw).hexdigest()[:16].encode()


class VmstateView:
    """A snapshot as a migration stream: ``.size`` exact up front, ``.read(offset, size)``.

    Thread-safe as long as the underlying SnapshotReader is; memory use is bounded by the
    read size (records are generated per read, never cached).
    """

    streamed = True  # read once, start to end (a restore): the mount bypasses the page cache

    def __init__(self, reader: Any) -> None:
        self._reader = reader
        info = reader.info
        stream_meta = (info.meta or {}).get(META_KEY)
        if stream_meta:
            head = F.HEADER + (reader.blob(BLOB_CONFIGURATION) or b"")
            section_id = int(stream_meta.get("ram_section_id", F.DEFAULT_RAM_SECTION_ID))
            tail = reader.blob(BLOB_DEVICES) or _ram_only_tail(info, reader.regions, reader)
        else:
            head = F.HEADER + F.configuration(PROCESS_MACHINE)
            section_id = F.DEFAULT_RAM_SECTION_ID
            tail = _ram_only_tail(info, reader.regions, reader)
        blocks = []
        for region in reader.regions:
            rmeta = region.meta or {}
            # holes "file": holes hold the file's bytes, not sent (kept on restore).
            file_holes = rmeta.get("holes") == "file"
            blocks.append(
                BlockRuns(
                    region=region.index,
                    name=block_idstr(region.name),
                    length=region.length,
                    extra=bytes.fromhex(rmeta.get("ram_extra", "")),
                    # Page maps are loaded on the block's first read: a damaged one fails the
                    # reads of its block (EIO), not the whole view. One record per page sent.
                    runs=[] if rmeta.get("ignored") else _runs_of(reader, region.index, file_holes),
                    records=region.data_pages + region.zero_pages if file_holes
                    else region.length // F.TARGET_PAGE_SIZE,
                    data_pages=region.data_pages,
                )
            )
        pieces = [Literal(head), *ram_pieces(section_id, blocks), Literal(tail)]
        self._layout = StreamLayout(pieces, reader.read, reader.read_pages_into)
        self.size: int = self._layout.size

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the stream; short only at the end."""
        return self._layout.read(offset, size)

    def read_buffer(self, offset: int, size: int) -> bytes | memoryview:
        """Like :meth:`read`, but may return a read-only memoryview (one copy less: for FUSE)."""
        return self._layout.read_buffer(offset, size)

    def iter_chunks(self, chunk: int = 1 << 20):
        """The whole stream in order, ``chunk`` bytes at a time (bytes or read-only memoryviews)."""
        return self._layout.iter_chunks(chunk)


def _runs_of(reader: Any, index: int, file_holes: bool) -> Any:
    """The loader of one region's stream runs: holes and zero pages merged as ZERO records,
    or with ``file_holes`` holes left out."""
    def load() -> list[tuple[int, int, bool]]:
        runs = reader.runs(index)
        return merge_runs([r for r in runs if r[2] != HOLE] if file_holes else runs)

    return load


def _ram_only_tail(info: Any, regions: list, reader: Any = None) -> bytes:
    """EOF plus a VMDESCRIPTION saying how to load the stream into QEMU; for a process
    snapshot (``reader`` given) it also carries the process's description
    (:mod:`snapfs.stream.procdesc`: region addresses, registers, kernel state)."""
    doc: dict[str, Any] = {"page_size": F.TARGET_PAGE_SIZE, "devices": []}
    hint: dict[str, Any] = {"snapshot": info.name, "machine": PROCESS_MACHINE}
    if reader is not None:
        from snapfs.stream.procdesc import DESC_BLOB, describe

        carried = reader.blob(DESC_BLOB)  # a process stream ingested with incoming --name
        if carried is not None:
            hint = dict(json.loads(carried), snapshot=info.name)
        elif info.kind == "process" and not any(r.kind == "ramblock" for r in regions):
            # (ramblock regions: ingested without a description, addresses unknown)
            hint.update(describe(reader, [block_idstr(r.name).decode("utf-8", "replace") for r in regions]))
    if len(regions) == 1:
        r = regions[0]
        name = block_idstr(r.name).decode("utf-8", "replace")
        hint["restore"] = (
            f"qemu-system-x86_64 -machine none,memory-backend={name} -object "
            f"memory-backend-file,id={name},size={r.length},mem-path=OUT,share=on "
            "-nodefaults -display none -S -incoming 'exec:cat vmstate'"
        )
    doc["snapfs"] = hint
    return bytes([F.SEC_EOF]) + F.vmdescription(doc)
