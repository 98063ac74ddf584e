"""What the ``core`` view needs besides memory, recorded around the freeze at the least
pause cost:

- before the freeze (:func:`before_freeze`): the auxiliary vector (fixed at exec) and the
  process status of NT_PRPSINFO;
- at the freeze: registers and register sets (``StoppedProcess.record_threads``) and the maps
  (the freeze reads them anyway);
- after the resume (:func:`thread_names`): thread names, which cannot change while a thread
  is stopped; reading one file per thread inside the pause cost more than its registers;
- anywhere: what the arch module records about the CPU (x86_64: the XSAVE layout, CPUID).

:func:`record` turns this into ``meta["threads"]`` and the store blob
:data:`snapfs.elfcore.state.BLOB` (see :mod:`snapfs.elfcore.state`).
"""

from __future__ import annotations

from dataclasses import dataclass

from snapfs.capture import arch
from snapfs.capture.maps import Vma
from snapfs.elfcore.state import Mapping, ProcessStatus, ThreadState, encode_blob


@dataclass
class BeforeFreeze:
    """What is read before the freeze."""

    auxv: bytes | None
    status: ProcessStatus


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def before_freeze(pid: int) -> BeforeFreeze:
    """The auxiliary vector and process status of ``pid`` (what is unreadable stays empty)."""
    status = ProcessStatus()
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        f = stat[stat.rindex(b")") + 2 :].split()
        status.state = f[0].decode()
        status.ppid, status.pgrp, status.sid = int(f[1]), int(f[2]), int(f[3])
        status.flags, status.nice = int(f[6]), int(f[16])
    for line in (_read(f"/proc/{pid}/status") or b"").splitlines():
        if line.startswith(b"Uid:"):
            status.uid = int(line.split()[1])
        elif line.startswith(b"Gid:"):
            status.gid = int(line.split()[1])
    return BeforeFreeze(auxv=_read(f"/proc/{pid}/auxv"), status=status)


def thread_names(pid: int, tids) -> dict[str, str]:
    """``comm`` of each thread, by tid ("" for one that exited meanwhile)."""
    out = {}
    for tid in tids:
        raw = _read(f"/proc/{pid}/task/{tid}/comm")
        out[str(tid)] = raw.decode(errors="replace").rstrip("\n") if raw else ""
    return out


def record(pid: int, before: BeforeFreeze, maps: list[Vma], threads: dict[str, dict]) -> tuple[dict, bytes]:
    """``(meta["threads"], blob)`` from the freeze's records: each thread's ``comm``, ``regs``
    and ``fpregs`` in the metadata as before; its register sets and siginfo, the maps, auxv
    and status in the blob. Call after the target resumed (it reads thread names)."""
    names = thread_names(pid, threads)
    meta_threads: dict[str, dict] = {}
    extra: dict[int, ThreadState] = {}
    for tid, t in threads.items():
        meta_threads[tid] = {"comm": names[tid], "regs": t["regs"], "fpregs": t["fpregs"]}
        extra[int(tid)] = ThreadState(int(tid), t["regs"], regsets=t.get("regsets", {}),
                                      siginfo=t.get("siginfo"))
    mappings = [Mapping(v.start, v.end, v.perms, v.offset, v.inode, v.path) for v in maps]
    return meta_threads, encode_blob(arch.NAME, before.auxv, before.status, mappings, extra,
                                     arch.core_arch_state())
