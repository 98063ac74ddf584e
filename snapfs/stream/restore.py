"""``snapfs incoming --pid PID``: rewind a live process to a snapshot, exactly, or refuse.

The stream is a process snapshot's ``vmstate``: its RAMBlocks are the memory, and its
VMDESCRIPTION carries the process's description (:mod:`snapfs.stream.procdesc`: where each
block lives, every mapping of the instant, each thread's registers, XSAVE area and signal
mask, and the kernel state recorded then). Order of operations — the target is touched
last, and only if everything checks out:

1. the whole stream is read and validated into a page spool (:mod:`snapfs.stream.spool`);
2. the target is compared with the snapshot (:func:`assess`): the kernel state a restore
   cannot rewind (fd table, epoll registrations, thread set, signal dispositions, cwd,
   identity; shared memory other processes map), the layout (what to ``munmap``/``brk``/
   ``mprotect``/``mmap`` to get the snapshot's mappings back, or why that is impossible),
   and where each block goes. Differences refuse the restore (one line naming them) unless
   ``force``; an impossible layout always refuses. ``dry_run`` stops here and reports;
3. every thread is stopped, and the comparison is made again on the stopped process (the
   authoritative one; nothing has been written yet);
4. every thread is parked (:mod:`snapfs.capture.rewind`): if snapfs dies from here on, the
   threads wait in ``pause()`` with every signal blocked, and running the same command
   again finishes the restore;
5. the layout is restored by injected syscalls (:mod:`snapfs.capture.layout`), the pages
   that differ are written, and each thread gets its recorded XSAVE area, registers (a
   syscall it was blocked in is issued again) and signal mask; then every thread is
   detached — all of it while no thread of the target runs.

Pages the stream never sent are left alone (QEMU semantics); pages sent as ZERO are zeroed,
except never-populated pages of file-backed regions, which get the file's content.
Streams without a process description (QEMU streams, snapfs before this format) and
snapshots without the recorded state restore memory only, with ``force`` (the threads keep
their registers: the process may crash).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from snapfs.capture import fdtable, layout, procstate, threadstate
from snapfs.capture.freeze import stopped
from snapfs.capture.maps import Vma, classify, huge_page_sizes, read_maps
from snapfs.capture.memory import read_memory, write_memory
from snapfs.capture.ptrace import StoppedProcess, check_target, find_syscall_insn, list_tids
from snapfs.capture.rewind import Parked
from snapfs.capture.target_info import shared_with_others
from snapfs.errors import RestoreRefused, TargetError
from snapfs.stream import format as F
from snapfs.stream.procdesc import ProcessImage, RegionDesc, parse
from snapfs.stream.reader import Limits, RamBlock
from snapfs.stream.spool import NOT_SENT, SpooledStream, spool_stream

TARGET_PAGE = F.TARGET_PAGE_SIZE  # the stream's page: the spool's and the snapshot's unit
_SHOWN = 6  # differences named in the one-line refusal (--dry-run lists all)


@dataclass
class RestoreResult:
    """What ``incoming --pid`` did (or, with ``dry_run``, would do)."""

    pid: int
    blocks: int
    pages_sent: int
    pages_written: int
    bytes_read: int
    dry_run: bool
    snapshot: str | None = None
    threads: int = 0  # threads whose registers are (would be) restored
    differences: list[str] = field(default_factory=list)  # kernel state not rewound (--force)
    problems: list[str] = field(default_factory=list)  # what makes a restore impossible
    layout: list[str] = field(default_factory=list)  # injected syscalls (described)
    fd_changes: list[str] = field(default_factory=list)  # epoll rewinds; --hang-up sockets
    forced: list[str] = field(default_factory=list)  # what --force let through: may break
    restored: bool = False

    @property
    def refused(self) -> bool:
        return bool(self.problems or self.differences)

    def to_json(self) -> dict:
        return {**self.__dict__, "refused": self.refused}


@dataclass
class _Assessment:
    """:func:`assess`'s answer: where each block goes, what to inject, what differs."""

    starts: list[int]  # address of each block
    ops: list[layout.Op]
    differences: list[str]
    problems: list[str]
    holes: dict[int, tuple[RegionDesc, int]]  # block -> (its region, an fd of its file)
    fds: fdtable.FdChanges = field(default_factory=fdtable.FdChanges)


def target_regions(pid: int) -> dict[str, Vma]:
    """The target's regions by block name (every readable mapping, capture naming)."""
    maps = read_maps(pid)
    vmas = classify(maps, include_readonly=True, huge_sizes=huge_page_sizes(pid, maps))
    return {v.name: v for v in vmas}


def match_blocks(pid: int, blocks: list[RamBlock], regions: dict[str, Vma]) -> list[Vma]:
    """The region for each block, or TargetError listing every block that does not match
    (streams without a process description: blocks are found by name)."""
    out: list[Vma] = []
    problems: list[str] = []
    for b in blocks:
        v = regions.get(b.name)
        if v is None:
            problems.append(f"block {b.name!r} has no region in the process")
        elif v.length != b.length:
            problems.append(f"block {b.name!r} is 0x{b.length:x} bytes but the region is 0x{v.length:x}")
        else:
            out.append(v)
    if problems:
        raise TargetError(f"stream does not match process {pid}: {_join(problems)}")
    return out


def _join(items: list[str], shown: int = 8) -> str:
    return "; ".join(items[:shown]) + (f"; and {len(items) - shown} more" if len(items) > shown else "")


def assess(pid: int, image: ProcessImage | None, blocks: list[RamBlock], tids: list[int],
           hang_up: bool = False) -> _Assessment:
    """Compare the target (threads ``tids``) with the snapshot; read-only. Differences are
    what remains once the fd changes (:mod:`snapfs.capture.fdtable`: epoll registrations,
    and with ``hang_up`` sockets that came or went) have run."""
    if image is None:
        starts = [v.start for v in match_blocks(pid, blocks, target_regions(pid))]
        return _Assessment(starts, [], ["the stream carries no process description (a QEMU stream, or "
                                        "from a snapfs before registers were recorded)"], [], {})
    problems: list[str] = []
    differences: list[str] = []
    if len(image.regions) != len(blocks) or any(r.block != b.name for r, b in zip(image.regions, blocks)):
        raise TargetError("the stream's process description does not match its RAMBlocks")
    current = [layout.Mapping.from_vma(v) for v in read_maps(pid)]
    ops: list[layout.Op] = []
    if image.has_state:
        plan = layout.plan([layout.Mapping.from_record(m) for m in image.maps], current)
        ops, problems = plan.ops, plan.problems
        state = procstate.read_state(pid)
        fds = fdtable.plan(image.kernel, state["fds"], hang_up)
        after = dict(state, fds=fds.applied_to(image.kernel, state["fds"]))
        differences += procstate.differences(image.kernel, after)
        then = sorted(t.tid for t in image.threads)
        if then != sorted(tids):
            gone = sorted(set(then) - set(tids))
            new = sorted(set(tids) - set(then))
            differences.append(f"threads differ: {len(then)} at the snapshot, {len(tids)} now"
                               + (f"; gone: {_ids(gone)}" if gone else "") + (f"; new: {_ids(new)}" if new else ""))
    else:
        differences.append("the snapshot has no recorded registers or kernel state (taken by an "
                           "older snapfs)")
        problems += _unmapped(image.regions, current)
    differences += _shared_memory(pid, image.regions)
    holes = {}
    for i, r in enumerate(image.regions):
        if r.holes and not problems:
            fd, why = _open_backing(pid, r)
            if why:
                problems.append(f"the never-populated pages of {r.path} ({r.start:#x}) need its content: {why}")
            else:
                holes[i] = (r, fd)
    out = _Assessment([r.start for r in image.regions], ops, differences, problems, holes)
    if image.has_state:
        out.fds = fds
    return out


def _ids(tids: list[int]) -> str:
    return ",".join(map(str, tids[:8])) + (f",... ({len(tids)})" if len(tids) > 8 else "")


def _unmapped(regions: list[RegionDesc], current: list[layout.Mapping]) -> list[str]:
    """Without recorded maps: every block must lie in one current mapping of the same kind."""
    out = []
    for r in regions:
        m = next((m for m in current if m.start <= r.start and r.end <= m.end), None)
        if m is None or m.perms[3] != r.perms[3] or (m.inode or 0) != (r.inode or 0):
            out.append(f"region {r.block} ({r.start:#x}-{r.end:#x}) is not mapped as at the snapshot")
    return out


def _shared_memory(pid: int, regions: list[RegionDesc]) -> list[str]:
    """Shared mappings whose restore reaches beyond the process: other processes' memory,
    or a file on disk."""
    out = []
    shared = [r for r in regions if r.perms[3] == "s"]
    if not shared:
        return out
    vmas = [v for v in read_maps(pid) if v.shared]
    others = shared_with_others(pid, vmas)
    for r in shared:
        v = next((v for v in vmas if v.start <= r.start < v.end), None)
        if r.kind == "file" and "w" in r.perms:
            out.append(f"region {r.block} is a shared mapping of {r.path}: restoring it rewrites the file")
        elif v is not None and (v.dev, v.inode) in others:
            out.append(f"shared memory {r.path or r.block} is also mapped by other processes: "
                       "restoring it rewinds it for them too")
    return out


def _open_backing(pid: int, r: RegionDesc) -> tuple[int, str | None]:
    """An fd on the file behind region ``r`` (its never-populated pages read as the file)."""
    path = (r.path or "").removesuffix(" (deleted)")
    for candidate in (f"/proc/{pid}/map_files/{r.start:x}-{r.end:x}", path):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        st = os.fstat(fd)
        if f"{os.major(st.st_dev):x}:{os.minor(st.st_dev):x}" == r.dev and st.st_ino == r.inode:
            return fd, None
        os.close(fd)
    return -1, f"{path or r.block} is gone or was replaced since the snapshot"


def _close_holes(a: _Assessment) -> None:
    for _, fd in a.holes.values():
        os.close(fd)
    a.holes = {}


def restore_process(
    src: BinaryIO,
    pid: int,
    dry_run: bool = False,
    force: bool = False,
    hang_up: bool = False,
    limits: Limits = Limits(),
    progress: Callable[[int], None] | None = None,
) -> RestoreResult:
    """Validate the stream ``src`` completely, then rewind process ``pid`` to it (see the
    module docstring). Raises RestoreRefused (nothing written) when the process differs
    from the snapshot and not ``force``, or when its layout cannot be re-created; with
    ``dry_run`` returns the report (``refused`` says whether a restore would go ahead).
    ``hang_up``: sockets closed or opened since the snapshot are settled as connections that
    ended (:mod:`snapfs.capture.fdtable`) instead of counting as differences."""
    check_target(pid)  # fail fast (TargetError) before consuming the stream
    spooled = spool_stream(src, limits=limits, progress=progress)
    try:
        image = parse(spooled.vmdesc)
        sent = sum(spooled.spool.sent_pages(i) for i in range(len(spooled.blocks)))
        result = RestoreResult(pid, len(spooled.blocks), sent, 0, spooled.stream_bytes, dry_run,
                               snapshot=image.snapshot if image else None)
        pre = assess(pid, image, spooled.blocks, list_tids(pid), hang_up)
        _close_holes(pre)
        _report(result, pre, image)
        if dry_run:
            return result
        _refuse_unless(result, force)
        insn = find_syscall_insn(pid)
        with stopped(pid) as proc:
            # Nothing moves while stopped: compare again against this instant.
            now = assess(pid, image, spooled.blocks, list(proc.tids), hang_up)
            try:
                _report(result, now, image)
                _refuse_unless(result, force)
                result.pages_written = threadstate.in_tracer(proc, _rewind, proc, insn, image,
                                                             spooled, now)
            finally:
                _close_holes(now)
        result.restored = True
        return result
    finally:
        spooled.close()


def _report(result: RestoreResult, a: _Assessment, image: ProcessImage | None) -> None:
    result.differences = a.differences
    result.problems = a.problems
    result.layout = [op.describe() for op in a.ops]
    result.fd_changes = a.fds.describe()
    result.threads = len(image.threads) if image else 0


def _refuse_unless(result: RestoreResult, force: bool) -> None:
    """Raise RestoreRefused for problems, and for differences unless ``force`` (then record
    what may break)."""
    if result.problems:
        raise RestoreRefused(f"cannot restore process {result.pid}: {_join(result.problems, _SHOWN)} "
                             "(nothing written)")
    if result.differences and not force:
        raise RestoreRefused(
            f"refusing to restore process {result.pid}: it differs from the snapshot in what a "
            f"restore cannot rewind: {_join(result.differences, _SHOWN)} (nothing written; "
            "--dry-run lists everything, --force restores anyway)")
    result.forced = list(result.differences)


def _rewind(proc: StoppedProcess, insn: int, image: ProcessImage | None, spooled: SpooledStream,
            a: _Assessment) -> int:
    """Steps 4-5 of the module docstring, on the stopped process. Returns pages written."""
    parked = Parked(proc, insn)
    recorded = {t.tid: t for t in image.threads} if image else {}
    touched = False
    try:
        for tid, t in recorded.items():
            if t.xstate is not None and tid in proc.tids:
                # First, while nothing is written: a CPU that cannot load it refuses here.
                try:
                    threadstate.set_xstate(tid, t.xstate)
                except OSError as exc:
                    raise RestoreRefused(
                        f"cannot restore process {proc.pid}: this CPU does not take the FPU/AVX "
                        f"state recorded for thread {tid} ({exc.strerror}; a snapshot from "
                        "another machine?): nothing written") from None
        if a.ops or a.fds:
            inject = proc.injector()  # created parked: its "original" registers are the parked ones
            touched = True
            layout.apply(a.ops, inject, write_memory, proc.pid)
            fdtable.apply(a.fds, inject, read_memory, write_memory, proc.pid)
            inject.restore()
        touched = True
        written = _write_all(proc.pid, spooled, a)
        for tid in list(proc.tids):
            t = recorded.get(tid)
            if t is None:
                parked.unpark(tid)  # not in the snapshot (--force): keeps its own registers
            else:
                parked.resume_as(tid, t.regs, None, t.sigmask)
    except BaseException as exc:
        if not touched:
            parked.unpark()
            raise
        raise TargetError(
            f"the restore of process {proc.pid} failed half-way ({exc or type(exc).__name__}): "
            "its threads are left parked (waiting in pause() with every signal blocked, nothing "
            "of the half-written image runs); run the same command again to finish it, or kill "
            "the process") from None
    return written


def _write_all(pid: int, spooled: SpooledStream, a: _Assessment) -> int:
    written = 0
    for bi, start in enumerate(a.starts):
        holes = _hole_mask(a, bi, spooled.blocks[bi].length // TARGET_PAGE)
        for first, states, pages in spooled.spool.batches(bi):
            addr = start + first * TARGET_PAGE
            if holes is not None:
                _file_content(a.holes[bi], holes, first, states, pages)
            current = np.frombuffer(read_memory(pid, addr, len(states) * TARGET_PAGE), np.uint8)
            differ = (states != NOT_SENT) & (current.reshape(-1, TARGET_PAGE) != pages).any(axis=1)
            for lo, hi in _runs(differ):
                _write(pid, addr + lo * TARGET_PAGE, pages[lo:hi].tobytes())
                written += hi - lo
    return written


def _hole_mask(a: _Assessment, bi: int, npages: int) -> np.ndarray | None:
    if bi not in a.holes:
        return None
    mask = np.zeros(npages, bool)
    for first, n in a.holes[bi][0].holes:
        mask[first : first + n] = True
    return mask


def _file_content(hole: tuple[RegionDesc, int], mask: np.ndarray, first: int, states: np.ndarray,
                  pages: np.ndarray) -> None:
    """Never-populated pages of a file-backed region hold the file's bytes, not zeros."""
    rows = np.flatnonzero(mask[first : first + len(states)])
    if not len(rows):
        return
    region, fd = hole
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    data = os.pread(fd, (hi - lo) * TARGET_PAGE, region.offset + (first + lo) * TARGET_PAGE)
    span = np.zeros((hi - lo) * TARGET_PAGE, np.uint8)
    span[: len(data)] = np.frombuffer(data, np.uint8)
    pages[rows] = span.reshape(-1, TARGET_PAGE)[rows - lo]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) index ranges where ``mask`` is True."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _write(pid: int, addr: int, data: bytes) -> None:
    """process_vm_writev; for mappings the target may not write (text, RELRO) /proc/PID/mem."""
    try:
        write_memory(pid, addr, data)
        return
    except OSError as exc:
        if exc.errno != errno.EFAULT:
            raise
    fd = os.open(f"/proc/{pid}/mem", os.O_WRONLY)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], addr + done)
    finally:
        os.close(fd)
