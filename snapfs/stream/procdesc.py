"""A process snapshot's description, carried in its migration stream where QEMU ignores it.

A RAM-only stream names each RAMBlock and nothing else, but restoring a process
(``snapfs incoming --pid``) needs where each block lives, what backs it, every mapping of the
instant, each thread's registers and the kernel state recorded then; re-ingesting a stream as
a snapshot (``incoming --name``) needs the addresses and kinds. They travel in the stream's
VMDESCRIPTION JSON (after EOF), under the key ``"snapfs"``: QEMU skips the whole
description when loading, and analyze-migration.py ignores keys it does not know. So
``snapfs cat NAME vmstate | snapfs incoming --pid P`` carries everything, and the same stream
still loads into QEMU.

``"snapfs"`` object (format 1)::

    snapshot, machine, format: 1, restore (a QEMU command line hint, single-block streams)
    process: {pid, comm, exe, cmdline, created}
    regions: [{block, start, length, perms, offset, path, kind, page_size, dev, inode,
               mode, holes}]            one per RAMBlock, in the stream's block order;
                                        holes: [first_page, npages] never populated in a
                                        file-backed region (their content is the file's)
    state:   {kernel, maps, threads}    absent for snapshots taken before snapfs recorded it
             threads: [{tid, comm, regs: {name: int}, xstate: base64, sigmask}] in tid order

Everything in it is validated on parse (:func:`parse`): a malformed description is a
malformed stream.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from snapfs.capture.procstate import STATE_BLOB
from snapfs.errors import StreamError

FORMAT = 1
KEY = "snapfs"
# A stream ingested as a snapshot (``incoming --name``) keeps its description in this blob
# (the JSON of the "snapfs" object): its own vmstate then carries it on unchanged.
DESC_BLOB = "snapfs.description"


@dataclass
class RegionDesc:
    """Where a RAMBlock of a process snapshot lives and what backs it."""

    block: str
    start: int
    length: int
    perms: str
    offset: int
    path: str | None
    kind: str
    page_size: int = 4096
    dev: str | None = None
    inode: int = 0
    mode: str | None = None
    holes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class ThreadDesc:
    """One thread as recorded at the snapshot instant."""

    tid: int
    regs: dict[str, int]
    xstate: bytes | None
    sigmask: int | None
    comm: str = ""


@dataclass
class ProcessImage:
    """The parsed ``"snapfs"`` object of a process stream."""

    snapshot: str | None
    process: dict[str, Any]
    regions: list[RegionDesc]
    kernel: dict[str, Any] | None = None  # snapfs.capture.procstate record of the instant
    maps: list[list] | None = None  # every mapping: [start, end, perms, offset, dev, inode, path]
    threads: list[ThreadDesc] = field(default_factory=list)

    @property
    def has_state(self) -> bool:
        """True when registers and kernel state were recorded (snapfs >= this format)."""
        return self.kernel is not None and self.maps is not None and bool(self.threads)


# ----------------------------------------------------------------------------- writing
def describe(reader: Any, block_names: list[str]) -> dict[str, Any]:
    """The ``"snapfs"`` object for a process snapshot open in ``reader`` (a SnapshotReader);
    ``block_names`` are the RAMBlock idstrs of its regions, in order."""
    from snapfs.store import HOLE

    info = reader.info
    meta = info.meta or {}
    doc: dict[str, Any] = {
        "snapshot": info.name,
        "format": FORMAT,
        "process": {"pid": info.pid, "comm": info.comm, "exe": info.exe, "cmdline": info.cmdline,
                    "created": info.created},
    }
    regions = []
    for region, block in zip(reader.regions, block_names):
        rmeta = region.meta or {}
        r = {"block": block, "start": region.start, "length": region.length, "perms": region.perms,
             "offset": region.offset, "path": region.path, "kind": region.kind,
             "page_size": region.page_size, "dev": rmeta.get("dev"), "inode": rmeta.get("inode", 0),
             "mode": rmeta.get("mode")}
        if region.kind == "file":
            r["holes"] = [[p, n] for p, n, kind in reader.runs(region.index) if kind == HOLE]
        regions.append(r)
    doc["regions"] = regions
    blob = reader.blob(STATE_BLOB)
    threads = meta.get("threads")
    if blob is not None and threads:
        record = json.loads(blob)
        extra = record.get("threads", {})
        doc["state"] = {
            "kernel": record["kernel"],
            "maps": record["maps"],
            "threads": [
                {"tid": int(tid), "comm": t.get("comm", ""), "regs": t["regs"],
                 "xstate": extra.get(tid, {}).get("xstate"), "sigmask": extra.get(tid, {}).get("sigmask")}
                for tid, t in sorted(threads.items(), key=lambda kv: int(kv[0]))
            ],
        }
    return doc


def carried(vmdesc: bytes | None) -> bytes | None:
    """The JSON of a stream's process description (to keep as :data:`DESC_BLOB` when the
    stream is ingested), or None when it has none."""
    if not vmdesc:
        return None
    try:
        doc = json.loads(vmdesc)
    except (ValueError, UnicodeDecodeError):
        return None
    desc = doc.get(KEY) if isinstance(doc, dict) else None
    if not isinstance(desc, dict) or "regions" not in desc:
        return None
    return json.dumps(desc).encode()


# ----------------------------------------------------------------------------- reading
def _need(cond: bool, what: str) -> None:
    if not cond:
        raise StreamError(f"the stream's snapfs description is malformed: {what}")


def _int(v: Any, what: str) -> int:
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{what} is not a non-negative integer")
    return v


def parse(vmdesc: bytes | None) -> ProcessImage | None:
    """The process description in a stream's VMDESCRIPTION, or None when it has none
    (a QEMU stream, or a process stream from a snapfs that did not write one)."""
    if not vmdesc:
        return None
    try:
        doc = json.loads(vmdesc)
    except (ValueError, UnicodeDecodeError):
        raise StreamError("the stream's VMDESCRIPTION is not valid JSON") from None
    desc = doc.get(KEY) if isinstance(doc, dict) else None
    if not isinstance(desc, dict) or "regions" not in desc:
        return None
    _need(desc.get("format") == FORMAT, f"unknown format {desc.get('format')!r}")
    _need(isinstance(desc["regions"], list), "regions is not a list")
    regions = []
    for r in desc["regions"]:
        _need(isinstance(r, dict), "a region is not an object")
        perms = r.get("perms")
        _need(isinstance(perms, str) and len(perms) == 4, "a region has bad perms")
        holes = r.get("holes") or []
        _need(isinstance(holes, list) and all(isinstance(h, list) and len(h) == 2 for h in holes),
              "a region has bad holes")
        regions.append(RegionDesc(
            block=str(r.get("block")), start=_int(r.get("start"), "region start"),
            length=_int(r.get("length"), "region length"), perms=perms,
            offset=_int(r.get("offset", 0), "region offset"), path=r.get("path"),
            kind=str(r.get("kind")), page_size=_int(r.get("page_size", 4096), "page size"),
            dev=r.get("dev"), inode=_int(r.get("inode") or 0, "inode"), mode=r.get("mode"),
            holes=[(_int(a, "hole"), _int(b, "hole")) for a, b in holes]))
    image = ProcessImage(snapshot=desc.get("snapshot"), process=dict(desc.get("process") or {}), regions=regions)
    state = desc.get("state")
    if state is not None:
        _need(isinstance(state, dict) and isinstance(state.get("kernel"), dict)
              and isinstance(state.get("maps"), list) and isinstance(state.get("threads"), list),
              "state lacks kernel, maps or threads")
        image.kernel = state["kernel"]
        image.maps = state["maps"]
        for m in image.maps:
            _need(isinstance(m, list) and len(m) == 7, "a mapping is not [start, end, perms, offset, dev, inode, path]")
        for t in state["threads"]:
            _need(isinstance(t, dict) and isinstance(t.get("regs"), dict), "a thread has no registers")
            regs = {str(k): _int(v, f"register {k}") for k, v in t["regs"].items()}
            xstate = None
            if t.get("xstate"):
                try:
                    xstate = base64.b64decode(t["xstate"], validate=True)
                except (binascii.Error, ValueError, TypeError):
                    raise StreamError("the stream's snapfs description is malformed: bad xstate") from None
            mask = t.get("sigmask")
            image.threads.append(ThreadDesc(tid=_int(t.get("tid"), "tid"), regs=regs, xstate=xstate,
                                            sigmask=None if mask is None else _int(mask, "sigmask"),
                                            comm=str(t.get("comm", ""))))
    return image
