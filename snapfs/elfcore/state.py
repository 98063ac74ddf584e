"""What a snapshot holds for its core file besides memory: :class:`CoreState`.

The capture records it around the freeze (see :mod:`snapfs.capture.coreinfo`): every
thread's general and FXSAVE registers go into ``meta["threads"]`` as they always did; the
rest (the auxiliary vector, the process status, every mapping at the snapshot instant, the
XSAVE area and caught signal of each thread, the CPU's XSAVE layout) is one store blob,
:data:`BLOB` (JSON, compressed by the store): kilobytes per thread that ``snapfs list`` has no
reason to parse.

Snapshots taken before the blob existed still get a core: :meth:`CoreState.from_snapshot`
builds what the metadata and the regions say (no auxv, no XSAVE, mappings = captured regions);
those before the XSAVE layout was recorded get their XSAVE areas as recorded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

BLOB = "core.state"
FORMAT = 1


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps`` at the snapshot instant."""

    start: int
    end: int
    perms: str
    offset: int  # bytes into the file
    inode: int
    path: str  # "" for anonymous memory; "[heap]", "/usr/lib/... (deleted)" as maps shows them

    @property
    def is_file(self) -> bool:
        """Backed by a file (what the kernel lists in NT_FILE: also memfd, SysV shm, ...)."""
        return self.inode != 0 and self.path.startswith("/")


@dataclass
class ProcessStatus:
    """Process-wide fields of NT_PRPSINFO and NT_PRSTATUS, read before the freeze."""

    state: str = "R"  # /proc/PID/stat state letter
    ppid: int = 0
    pgrp: int = 0
    sid: int = 0
    nice: int = 0
    flags: int = 0  # task flags (PF_*)
    uid: int = 0  # real uid, gid
    gid: int = 0


@dataclass
class ThreadState:
    """One thread at the snapshot instant."""

    tid: int
    regs: dict[str, int]  # general registers by name (the arch module's REG_NAMES)
    fpregs: bytes = b""  # the FXSAVE-style area (NT_PRFPREG); empty if not recorded
    regsets: dict[int, bytes] = field(default_factory=dict)  # PTRACE_GETREGSET by note type
    siginfo: bytes | None = None  # siginfo_t of a signal being delivered when it stopped
    comm: str = ""


@dataclass
class CoreState:
    """Everything the ``core`` view writes besides the memory."""

    arch: str
    pid: int
    comm: str
    args: list[str]
    exe: str | None
    status: ProcessStatus
    auxv: bytes | None
    mappings: list[Mapping] | None  # None: not recorded (older snapshot): use the regions
    threads: list[ThreadState]  # the main thread first
    # The arch module's own record of the CPU (x86_64: "xsave_layout"); {} if not recorded.
    arch_state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, info: Any, blob: bytes | None) -> CoreState:
        """From a snapshot's :class:`~snapfs.store.SnapshotInfo` and its :data:`BLOB` (or None)."""
        meta = info.meta or {}
        extra = json.loads(blob) if blob else {}
        per_thread = extra.get("threads", {})
        threads = []
        for tid, t in (meta.get("threads") or {}).items():
            x = per_thread.get(tid, {})
            threads.append(ThreadState(
                tid=int(tid),
                regs={k: int(v) for k, v in (t.get("regs") or {}).items()},
                fpregs=bytes.fromhex(t.get("fpregs") or ""),
                regsets={int(k): bytes.fromhex(v) for k, v in x.get("regsets", {}).items()},
                siginfo=bytes.fromhex(x["siginfo"]) if x.get("siginfo") else None,
                comm=t.get("comm", ""),
            ))
        pid = int(info.pid or 0)
        threads.sort(key=lambda t: (t.tid != pid, t.tid))
        mappings = None
        if "mappings" in extra:
            mappings = [Mapping(*m) for m in extra["mappings"]]
        auxv = extra.get("auxv")
        return cls(
            arch=extra.get("arch", meta.get("arch", "x86_64")),
            pid=pid,
            comm=info.comm or "",
            args=list(info.cmdline or []),
            exe=info.exe,
            status=ProcessStatus(**extra.get("status", {})),
            auxv=bytes.fromhex(auxv) if auxv is not None else None,
            mappings=mappings,
            threads=threads,
            arch_state=extra.get("arch_state", {}),
        )


def encode_blob(arch: str, auxv: bytes | None, status: ProcessStatus, mappings: list[Mapping],
                threads: dict[int, ThreadState], arch_state: dict[str, Any] | None = None) -> bytes:
    """The :data:`BLOB` bytes: what :meth:`CoreState.from_snapshot` reads beside the metadata
    (the threads' ``regsets`` and ``siginfo``; their registers are in ``meta["threads"]``) and
    ``arch_state`` (JSON-able, the arch module's)."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "arch": arch,
        "status": asdict(status),
        "mappings": [[m.start, m.end, m.perms, m.offset, m.inode, m.path] for m in mappings],
        "threads": {
            str(tid): {
                "regsets": {str(nt): data.hex() for nt, data in t.regsets.items()},
                **({"siginfo": t.siginfo.hex()} if t.siginfo else {}),
            }
            for tid, t in threads.items()
        },
    }
    if auxv is not None:
        doc["auxv"] = auxv.hex()
    if arch_state:
        doc["arch_state"] = arch_state
    return json.dumps(doc, separators=(",", ":")).encode()
