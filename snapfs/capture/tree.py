"""One consistent snapshot of a process tree or a cgroup, shared memory included.

:func:`capture_tree` is :func:`~snapfs.capture.engine.capture_process` for several processes
at one instant (docs/architecture.md, "Process trees"):

1. every member is stopped briefly, one after the other, to take its userfaultfd (asking for
   ``UFFD_FEATURE_EVENT_FORK``);
2. every member's memory is write-protected while they all run (one pre-fault server each,
   which also drops the protection of children born meanwhile: they are frozen with the
   others);
3. **the instant**: every member is stopped together (one ptrace ``StopGroup``: every thread
   interrupted before any is waited for); processes that
   appeared since (children of members, or new processes of the cgroup) are stopped and get
   a uffd too, until none appears; then each member's pages written since are re-protected
   and its populated pages recorded (:func:`~snapfs.capture.protect.protect_and_record`),
   each shared object gets its ledger (or is copied, if it cannot be protected), the fault
   paths start, and every member resumes;
4. in the background: every member's fault path, a server for the uffds of children forked
   after the instant (:class:`~snapfs.capture.shared.ChildServer`), and one scan after the
   other (shared objects first: every member writes them), all into one store snapshot of
   kind ``tree`` (:mod:`snapfs.store.tree`).

A member that exits during the capture keeps the pages saved so far; the rest of its private
memory is reported lost and the member is flagged ``exited`` (the kernel tears its memory down
without an event snapfs could wait on). Shared objects survive it: snapfs holds a descriptor
on each. If snapfs dies, the kernel closes every uffd it holds (members' and children's), so
no process stays protected or stopped, and the store never shows the half-written snapshot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from functools import partial
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from snapfs.capture import coreinfo, fastfault
from snapfs.capture import kernel as k
from snapfs.capture.context import CaptureContext
from snapfs.capture.engine import _stop_thread_on_cancel, store_chunks
from snapfs.capture.faults import FaultPath
from snapfs.capture.freeze import FrozenTarget, frozen, realtime_freeze, take_userfaultfd
from snapfs.capture.handle import ProcessHandle
from snapfs.capture.ledger import LOST, runs_of
from snapfs.capture.maps import ClassifiedMaps, Vma, huge_page_sizes, read_maps, read_maps_text
from snapfs.capture.memory import prefaulted_buffer
from snapfs.capture.preprotect import PreFaultServer, PreProtected, preprotect_regions
from snapfs.capture.priority import TREE_GIL_SWITCH_INTERVAL, background_thread_priority, fault_thread_priority
from snapfs.capture.processes import cgroup_pids, memory_owners, proc_stat, tree_pids
from snapfs.capture.protect import MINIMAL_FEATURES, Prepared, copy_buffer_for, plan_instant, protect_and_record
from snapfs.capture.inject import find_gadgets
from snapfs.capture.ptrace import StopGroup, StoppedProcess
from snapfs.capture.relocated import save_private_pages
from snapfs.capture.scan import CHUNK, Scan
from snapfs.capture.shared import (ChildServer, MemberWindows, ObjectScan, SharedObject, Window,
                                   entry_name, object_context, object_key, open_object,
                                   record_at_instant)
from snapfs.capture.target_info import process_meta
from snapfs.capture.types import CaptureOptions, Progress, region_spec
from snapfs.capture.uffd import WANTED_FEATURES, Uffd
from snapfs.elfcore.state import BLOB as CORE_BLOB
from snapfs.errors import TargetError, reported_error
from snapfs.store.tree import SHARED_PREFIX, TREE_KIND, member_entry

PAGE = k.PAGE_SIZE
TREE_FEATURES = WANTED_FEATURES | k.UFFD_FEATURE_EVENT_FORK
_SEEN_ATTEMPTS = 64  # rounds of "stop the newcomers" before giving up (a fork bomb)


@dataclass
class TreeTarget:
    """What to snapshot: a process and its descendants, or a cgroup."""

    pid: int | None = None
    cgroup: str | None = None
    _seen: set[int] = field(default_factory=set, repr=False)

    def pids(self) -> list[int]:
        """The live members now, parents first (and every process that exists now is
        remembered, so that :meth:`newcomers` looks only at processes created since)."""
        self._seen = {int(e) for e in os.listdir("/proc") if e.isdigit()}
        return tree_pids(self.pid) if self.pid is not None else cgroup_pids(self.cgroup)

    @property
    def seen(self) -> set[int]:
        """Every process that existed at the last listing."""
        return self._seen

    def newcomers(self, members: set[int]) -> list[int]:
        """Processes that joined the tree since :meth:`pids` (or the last call), parents
        first: for a tree, those whose parent is a member (or a newcomer); for a cgroup, its
        processes. Cheap inside the freeze: only processes created since are read."""
        if self.cgroup is not None:
            fresh = [p for p in cgroup_pids(self.cgroup) if p not in members]
            self._seen.update(fresh)
            return fresh
        now = sorted(int(e) for e in os.listdir("/proc") if e.isdigit())
        new = [p for p in now if p not in self._seen]
        self._seen.update(new)
        out: list[int] = []
        family = set(members)
        for _ in range(len(new)):  # a child may precede its parent when pids wrap
            added = False
            for pid in new:
                st = proc_stat(pid)
                if pid not in family and st is not None and st.capturable and st.ppid in family:
                    family.add(pid)
                    out.append(pid)
                    added = True
            if not added:
                break
        return out

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid} if self.pid is not None else {"cgroup": self.cgroup}


@dataclass
class Member:
    """One process of the tree during the capture."""

    pid: int
    comm: str
    ppid: int
    entry: str
    meta: dict[str, Any]
    huge_sizes: dict[int, int]
    handle: ProcessHandle  # pinned (a PID reused or an exec is noticed), its capture lock held
    uffd: Uffd | None = None
    features: int = 0
    attach_pause_ms: float = 0.0
    newcomer: bool = False  # appeared after the attach: protected inside the freeze
    maps: ClassifiedMaps | None = None  # read before pre-protection (followed by the freeze)
    copy_buffer: bytearray | None = None  # for its copy-mode regions, touched before the freeze
    server: PreFaultServer | None = None
    pre: PreProtected | None = None
    ft: FrozenTarget | None = None
    prep: Prepared | None = None
    ctx: CaptureContext | None = None
    faults: FaultPath | None = None
    windows: MemberWindows | None = None
    region_first: int = 0
    later_regions: list[int] = field(default_factory=list)  # added after the resume
    core_before: Any = None  # coreinfo.before_freeze
    threads: dict[str, dict] = field(default_factory=dict)  # as recorded for the core view
    exited: bool = False
    gone_before: bool = False  # exited before the instant: not part of the snapshot
    warnings: list[str] = field(default_factory=list)
    fault_scope: trio.CancelScope | None = None
    faults_done: trio.Event | None = None

    def close(self) -> None:
        if self.uffd is not None:
            self.uffd.close()
        self.handle.close()


@dataclass
class TreeResult:
    """What :func:`capture_tree` returns (the figures ``snapfs snapshot --tree`` prints)."""

    name: str
    root: dict[str, Any]
    processes: int
    pause_ms: float  # the instant: the longest any member was stopped for it
    attach_pause_ms: float  # the longest of the members' short stops to take a uffd
    duration_s: float
    resident_bytes: int
    shared_bytes: int  # of which in shared objects (stored once)
    zero_bytes: int
    stored_bytes: int
    faults: int
    shared_objects: int
    exited: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    members: list[dict[str, Any]] = field(default_factory=list)
    info: Any = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object."""
        out = dataclasses.asdict(self)
        out.pop("info")
        for key in ("pause_ms", "attach_pause_ms", "duration_s"):
            out[key] = round(out[key], 3)
        return out


class _TreeCapture:
    def __init__(self, target: TreeTarget, store: Any, name: str, options: CaptureOptions,
                 progress: Callable[[Progress], None] | None) -> None:
        self.target = target
        self.store = store
        self.name = name
        self.options = options
        self.progress_cb = progress
        self.workers = options.workers or os.cpu_count() or 2
        self.limiter = trio.CapacityLimiter(self.workers)
        self.members: list[Member] = []
        self.sharers: dict[int, int] = {}  # pid -> the member whose memory it runs on
        self.objects: list[SharedObject] = []
        self.children: ChildServer | None = None
        self.warnings: list[str] = []
        self.writer: Any = None

    # ------------------------------------------------------------------ members
    def _new_member(self, pid: int, newcomer: bool = False) -> Member | None:
        st = proc_stat(pid)
        if st is None or not st.capturable:
            return None
        try:
            handle = ProcessHandle.open(pid)
        except TargetError:
            return None
        try:
            # One capture per process at a time (a tree's or a single process's).
            handle.lock_capture()
            comm = handle.comm
            huge = {} if newcomer else huge_page_sizes(pid)  # smaps walks page tables: not in the pause
            return Member(pid=pid, comm=comm, ppid=st.ppid, entry=member_entry(pid, comm),
                          meta=process_meta(pid, comm), huge_sizes=huge, handle=handle, newcomer=newcomer,
                          core_before=coreinfo.before_freeze(pid))
        except TargetError:
            handle.close()
            if newcomer or handle.gone_error() is not None:
                return None
            raise  # another capture holds it: the tree cannot be taken at one instant
        except BaseException:
            handle.close()
            raise

    @property
    def live(self) -> list[Member]:
        return [m for m in self.members if not m.gone_before]

    async def run(self) -> TreeResult:
        pids = self.target.pids()
        self.sharers = memory_owners(pids)
        try:
            for p in pids:
                if p not in self.sharers and (m := self._new_member(p)) is not None:
                    self.members.append(m)
            if not self.members:
                raise TargetError("no process to snapshot")
            return await self._capture()
        finally:
            self._close_all()  # every uffd, pidfd and capture lock (safe to repeat)

    async def _capture(self) -> TreeResult:
        root = self.members[0]
        meta = {"kind": TREE_KIND, "pid": self.target.pid, "comm": root.comm if self.target.pid else None,
                "exe": root.meta.get("exe") if self.target.pid else None,
                "cmdline": root.meta.get("cmdline") if self.target.pid else None, "created": time.time()}
        self.writer = self.store.begin_snapshot(self.name, meta, self.options.parent,
                                                 number_if_taken=self.options.number_if_taken)
        self.buffers = [prefaulted_buffer(CHUNK) for _ in range(self.workers * 2 + 1)]
        fastfault.preallocate_ring(len(self.members))
        t_start = time.monotonic()
        self.phases: dict[str, float] = {}
        try:
            for m in self.members:
                await self._attach(m)
            self._phase("attach", t_start)
            self.members = [m for m in self.members if m.uffd is not None]
            self._note_outside_mappers()
            with fault_thread_priority(TREE_GIL_SWITCH_INTERVAL):
                try:
                    async with trio.open_nursery() as self.fault_nursery:
                        await self._protect_and_freeze()
                        await trio.to_thread.run_sync(self._after_resume, limiter=self.limiter)
                        await self._background()
                except BaseExceptionGroup as eg:
                    raise reported_error(eg) from None
            for m in self.members:  # every page is saved (see Uffd.release)
                if m.uffd is not None and m.ctx is not None:
                    m.uffd.release(m.ctx.regions, m.ctx.remapped)
            self._close_all()
            self._report_unsaved()
            self._note_new_mappings()
            duration = time.monotonic() - t_start
            info = self.writer.commit(self._commit_meta(duration))
        except BaseException:
            self._close_all()
            self.writer.abort()
            raise
        finally:
            for obj in self.objects:
                if obj.fd >= 0:
                    os.close(obj.fd)
                    obj.fd = -1
        return self._result(info, duration)

    async def _attach(self, m: Member) -> None:
        """The short stop that takes a member's uffd (a member gone meanwhile is dropped)."""
        try:
            # Only the injected thread stops: the uffd belongs to the process's mm.
            async with frozen(m.handle, record=False, one_thread=True) as a:
                m.uffd = a.uffd
            m.attach_pause_ms = a.pause_ms
            m.features = _handshake(m.uffd)
        except TargetError as exc:
            if m.uffd is not None:
                m.uffd.close()
            m.uffd = None
            m.handle.close()
            if _alive(m.pid):  # still there: it is missing from the snapshot, say why
                self.warnings.append(f"process {m.pid} ({m.comm}) is not in the snapshot: {exc}")

    def _phase(self, name: str, since: float) -> None:
        self.phases[name] = round((time.monotonic() - since) * 1e3, 3)

    def _close_all(self) -> None:
        if self.children is not None:
            self.children.close()
        for m in self.members:
            m.close()

    # ------------------------------------------------------------------ the instant
    async def _protect_and_freeze(self) -> None:
        opts = self.options
        for m in self.members:
            m.maps = ClassifiedMaps(read_maps_text(m.pid), include_readonly=opts.include_readonly,
                                    huge_sizes=m.huge_sizes)
            m.copy_buffer = copy_buffer_for(m.maps.regions)
            m.server = PreFaultServer(m.pid, m.uffd, m.maps.regions)
        async with trio.open_nursery() as nursery:
            for m in self.members:
                nursery.start_soon(m.server.run)
            t0 = time.monotonic()
            await trio.to_thread.run_sync(self._preprotect_all)
            self._phase("preprotect", t0)
            await _warm_threads(2 * len(self.members) + self.workers + 4)
            await trio.to_thread.run_sync(self._freeze)
            self._phase("freeze", t0)
            nursery.cancel_scope.cancel()
        for m in self.live:
            if m.server is not None and m.pre is not None:
                m.pre.faults = m.server.faults
                # After the resume (the servers are halted: the lists are final), not in it.
                m.pre.hot = np.unique(np.array(m.server.written, np.uint64))

    def _preprotect_all(self) -> None:
        for m in self.members:
            try:
                m.pre = preprotect_regions(m.pid, m.uffd, m.maps)
            except TargetError:
                m.pre = PreProtected()  # gone: the freeze finds out
                continue
            # The instant's work for this member, decided now rather than in the pause (~1-3
            # ms a member), and the maps' bytes the freeze compares its reading with.
            m.pre.plan = plan_instant(m.maps, m.pre, shared=_maps_shared_object)
            m.pre.plan.expected_maps()

    def _freeze(self) -> None:
        """Worker thread: stop every member (and newcomers), do the instant's work, resume.
        Realtime: every member waits on this thread, and a busy machine must not preempt it."""
        with realtime_freeze():
            self._freeze_all()

    def _freeze_all(self) -> None:
        known = {m.pid for m in self.members} | set(self.sharers)
        t = [time.monotonic()]
        with contextlib.ExitStack() as stack:
            self._stop_members(stack)
            t.append(time.monotonic())
            self._stop_newcomers(stack, known)
            t.append(time.monotonic())
            # Every member is stopped: this is the snapshot's instant.
            live = self.live
            for m in live:
                # A shared object's mapping: recorded once per object (_find_objects), not
                # per member. (Not found by parsing every member's maps again here: 14
                # PostgreSQL processes' maps cost 20-30 ms of the instant.)
                m.prep = protect_and_record(
                    m.ft, include_readonly=self.options.include_readonly, huge_sizes=m.huge_sizes,
                    features=m.features, pre=m.pre if not m.newcomer else None,
                    copy_buffer=m.copy_buffer, shared=_maps_shared_object)
            t.append(time.monotonic())
            self._find_objects(live)
            for obj in self.objects:
                record_at_instant(obj, self.members)
                if obj.fd < 0 and obj.cache_backed and obj.protected:
                    self.warnings.append(
                        f"shared memory {obj.path}: pages no process had mapped could not be found "
                        "(reading /proc/PID/map_files needs CAP_SYS_ADMIN): they read as zero")
            t.append(time.monotonic())
            trio.from_thread.run(self._start_faults)
            t.append(time.monotonic())
        t.append(time.monotonic())
        self.instant_ms = {key: round((b - a) * 1e3, 3) for key, a, b in zip(
            ("stop", "newcomers", "protect", "objects", "start_faults", "resume"), t, t[1:])}

    def _stop_members(self, stack: contextlib.ExitStack) -> None:
        """Stop every member, and every process running on a member's memory, together: all
        their threads are interrupted before any is waited for (one instant; the pause does
        not add up process after process). The pre-fault servers serve until then (a thread
        faulting on protected memory stops only once served), then halt. A member gone (or
        exec'd) meanwhile is left out of the snapshot and the others are stopped again."""
        while True:
            members = [m for m in self.members if not m.gone_before]
            if not members:
                raise TargetError("every process of the tree exited before the snapshot instant")
            sharers = [p for p in self.sharers if _alive(p)]
            group = StopGroup([m.handle for m in members] + sharers)
            t0 = time.monotonic()
            try:
                # The servers halt in the trio thread on the stop's own hand-back.
                group.stop(then_in_trio=lambda ms=members: [m.server.halt() for m in ms])
                break
            except TargetError:
                gone = [(m, m.handle.gone_error()) for m in members]
                gone = [(m, why) for m, why in gone if why is not None]
                if not gone and all(_alive(p) for p in sharers):
                    raise
                for m, why in gone:
                    m.gone_before = True
                    if m.handle.alive():
                        self.warnings.append(f"process {m.pid} ({m.comm}) is not in the snapshot: {why}")
        stack.callback(_resume, group, members)
        for m in members:
            m.pre.changed = list(m.server.changed)
            proc = group[m.pid]
            try:
                maps_text = read_maps_text(m.pid, m.pre.plan.expected_maps() if m.pre.plan is not None else None)
            except TargetError:
                m.gone_before = True  # killed while stopped
                continue
            # Registers are read by the tracer thread meanwhile (complete once released).
            m.ft = FrozenTarget(pid=m.pid, comm=m.comm, proc=proc, uffd=m.uffd, maps_text=maps_text,
                                threads=proc.record_threads(wait=False), stopped_at=group.paused_since(t0),
                                handle=m.handle)

    def _stop_newcomers(self, stack: contextlib.ExitStack, known: set[int]) -> None:
        """Stop (and take a uffd from) every process that joined the tree since the list was
        made, until none appears: all members stopped means none can fork any more."""
        for _ in range(_SEEN_ATTEMPTS):
            fresh = [p for p in self.target.newcomers(known) if p != os.getpid()]
            if not fresh:
                return
            known.update(fresh)
            owners = memory_owners(sorted(known))
            for pid in fresh:
                if pid in owners:
                    self.sharers[pid] = owners[pid]
                    stack.enter_context(_stopped_quietly(pid))
                    continue
                m = self._new_member(pid, newcomer=True)
                if m is None:
                    continue
                try:
                    m.ft = stack.enter_context(_frozen_newcomer(m))
                except TargetError:
                    m.handle.close()  # gone, or exec'd, meanwhile
                    continue
                m.uffd, m.features = m.ft.uffd, m.ft.uffd.features
                self.members.append(m)
        raise TargetError("the tree keeps creating processes faster than snapfs can stop them")

    def _find_objects(self, live: list[Member]) -> None:
        """The shared objects the members map at the instant, each with its windows."""
        by_key: dict[Any, SharedObject] = {}
        for i, m in enumerate(self.members):
            if m.gone_before:
                continue
            for v in m.prep.regions:
                if not v.meta.get("shared"):
                    continue
                key = object_key(v)
                obj = by_key.get(key)
                if obj is None:
                    # Registration works only on shmem (and hugetlb): a "file" that could be
                    # protected is a tmpfs file, its page cache the memory, as for shmem.
                    obj = by_key[key] = SharedObject(key, v.path, v.kind, v.page_size,
                                                     cache_backed=v.kind == "shmem" or (v.kind == "file" and v.mode == "wp"))
                obj.windows.append(Window(i, v.start, v.end, v.offset))
                if v.mode != "wp":
                    obj.protected = False
                    obj.reason = ("SysV shared memory cannot be write-protected" if v.path.startswith("/SYSV")
                                  else "the kernel refuses to write-protect this mapping")
                if obj.fd < 0:
                    obj.fd = open_object(m.pid, v)
        taken: set[str] = set()
        for i, obj in enumerate(by_key.values()):
            obj.entry = entry_name(obj, taken)
            obj.index = i
        self.objects = list(by_key.values())

    async def _start_faults(self) -> None:
        """Trio thread, every member still stopped: number the store regions (objects first,
        then each member's, in order: declared right after the resume, see
        :meth:`_declare_regions`), start every fault path and the children's server."""
        w = self.writer
        for i, obj in enumerate(self.objects):
            obj.store_index = i
        next_index = len(self.objects)
        for i, m in enumerate(self.members):
            if m.gone_before:
                continue
            m.region_first = next_index
            index = list(range(next_index, next_index + len(m.prep.regions)))
            next_index += len(index)
            m.windows = MemberWindows.of_member(i, self.objects, self.members)
            m.ctx = CaptureContext(pid=m.pid, uffd=m.uffd, ledger=m.prep.ledger, regions=m.prep.regions,
                                   region_index=index, writer=w, shared=m.windows)
        self.children = ChildServer(self._private_ranges)
        for i, m in enumerate(self.members):
            if m.gone_before:
                continue
            m.ctx.on_fork = self.children.on_fork_of(m.windows, i)
            m.faults = FaultPath(m.ctx)
            await self.fault_nursery.start(self._serve_member_faults, m)
        # Object pages a child saves are written with the first member's.
        self.children.sink = self.live[0].faults
        self.fault_nursery.start_soon(self._run_children)

    async def _run_children(self) -> None:
        """The children's server thread; cancellation stops it (it polls in a loop)."""
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_call_on_cancel, self.children.stop, done)
            try:
                await trio.to_thread.run_sync(self.children.run, abandon_on_cancel=False)
            finally:
                done.set()

    def _declare_regions(self) -> None:
        """Declare the regions to the writer in the order :meth:`_start_faults` numbered them
        (before any page reaches the store; thousands of add_region calls took milliseconds
        inside the pause)."""
        w = self.writer

        def declare(spec: Any, expected: int) -> int:
            if w.add_region(spec) != expected:
                raise RuntimeError("internal error: store region indices out of step with the capture's")
            return expected

        for obj in self.objects:
            declare(dataclasses.replace(
                region_spec(Vma(0, obj.length, "rw-s", 0, obj.key[0], obj.key[1], obj.path,
                                page_size=obj.page_size, kind=obj.kind, name=SHARED_PREFIX + obj.entry)),
                meta={"how": obj.describe()["how"]}), obj.store_index)
        by_key = {obj.key: obj for obj in self.objects}
        for m in self.live:
            for j, v in enumerate(m.prep.regions):
                spec = region_spec(v)
                idx = declare(dataclasses.replace(spec, name=f"{m.entry}/{spec.name}"), m.region_first + j)
                if v.meta.get("shared"):
                    w.share(idx, by_key[object_key(v)].store_index, v.offset // PAGE)

    def _after_resume(self) -> None:
        """Worker thread, every member running again: the store regions, then what the core
        view needs (as a process capture records it, :mod:`snapfs.capture.coreinfo`,
        :mod:`snapfs.capture.relocated`), per member, its blob named ``<entry>/core.state``."""
        self._declare_regions()
        for m in self.live:
            try:
                save_private_pages(m.pid, m.ft.maps, _MemberRegions(self.writer, m), {v.start for v in m.prep.regions})
            except (OSError, TargetError):
                pass  # exited meanwhile: the capture reports it
            m.threads, blob = coreinfo.record(m.pid, m.core_before, m.ft.maps, m.ft.threads)
            self.writer.put_blob(f"{m.entry}/{CORE_BLOB}", blob)

    def _private_ranges(self, member: int) -> list[tuple[int, int]]:
        """A member's write-protected private VMAs (what its forked children may unprotect)."""
        m = self.members[member]
        return [(v.start, v.end) for v in m.prep.regions if v.mode == "wp" and not v.meta.get("shared")]

    async def _serve_member_faults(self, m: Member, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        m.faults_done = trio.Event()
        try:
            with trio.CancelScope() as m.fault_scope:
                try:
                    await m.faults.run(task_status=task_status)
                except* TargetError:
                    m.exited = True  # its fault threads saw it gone
        finally:
            m.faults_done.set()

    # ------------------------------------------------------------------ background
    async def _background(self) -> None:
        opts = self.options
        scans: list[tuple[Member | None, Scan]] = [
            (None, ObjectScan(obj, object_context(obj, self.writer), self.members, opts.rate, opts.rate_deadline))
            for obj in self.objects if obj.protected and obj.ledger is not None and obj.ledger.total_pages]
        scans += [(m, Scan(m.ctx, opts.rate, hot=m.pre.hot if m.pre is not None else None,
                           rate_deadline=opts.rate_deadline)) for m in self.live]
        self.total_bytes = sum(s.ctx.ledger.total_pages for _, s in scans) * PAGE
        free_send, free_recv = trio.open_memory_channel[bytearray](len(self.buffers))
        for buf in self.buffers:
            free_send.send_nowait(buf)
        work_send, work_recv = trio.open_memory_channel[tuple](self.workers)
        self.t0 = t_bg = time.monotonic()
        pidfds = {id(m): k.pidfd_open(m.pid) for m in self.live if not m.exited and _alive(m.pid)}
        try:
            async with trio.open_nursery() as outer:
                for m in self.live:
                    outer.start_soon(m.faults.run_store)
                    if id(m) in pidfds:
                        outer.start_soon(self._watch_exit, m, pidfds[id(m)])
                if self.progress_cb is not None:
                    outer.start_soon(self._progress_loop, scans)
                scan_done = trio.Event()
                async with trio.open_nursery() as inner:
                    for _, scan in scans:
                        inner.start_soon(_stop_thread_on_cancel, scan.stop, scan_done)
                    for _ in range(self.workers):
                        inner.start_soon(store_chunks, self.writer, self.limiter, work_recv.clone(),
                                         free_send.clone())
                    await self._store_copies()
                    async with work_send:
                        await trio.to_thread.run_sync(self._scan_all, scans, work_send, free_recv,
                                                      abandon_on_cancel=False)
                    self._phase("scan", t_bg)
                    if any(s.late for _, s in scans):
                        self.warnings.append(
                            f"the background copy at {opts.rate:.0f} bytes/s reached its "
                            f"{opts.rate_deadline:g} s deadline: the rest was copied at full speed")
                    scan_done.set()
                    work_recv.close()
                # Everything is claimed: stop serving faults, then write what they saved.
                self.children.stop()
                for m in self.live:
                    m.fault_scope.cancel()
                outer.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                for m in self.live:
                    await m.faults_done.wait()
                for m in self.live:
                    await m.faults.flush()
                self._phase("background", t_bg)
        finally:
            for fd in pidfds.values():
                os.close(fd)

    def _scan_all(self, scans, work_send, free_recv) -> None:
        """Worker thread: the scans one after the other (shared objects first). A member
        that exits ends its own scan only."""
        for m, scan in scans:
            if m is not None and m.exited:
                continue
            t0 = time.monotonic()
            try:
                scan.run(work_send, free_recv)
                self._phase(f"scan {m.entry if m else 'shared'}", t0)
            except TargetError:
                if m is None:
                    raise
                m.exited = True
            if scan.stop.is_set():
                return

    async def _watch_exit(self, m: Member, pidfd: int) -> None:
        await trio.lowlevel.wait_readable(pidfd)
        m.exited = True

    async def _progress_loop(self, scans) -> None:
        while True:
            done = sum(s.ctx.done_bytes for _, s in scans)
            faults = sum(m.ctx.faults for m in self.live)
            self.progress_cb(Progress(min(done, self.total_bytes), self.total_bytes, faults,
                                      time.monotonic() - self.t0))
            await trio.sleep(0.2)

    async def _store_copies(self) -> None:
        """Store what was copied while every member was stopped (one worker-thread call)."""
        w = self.writer

        def put_all() -> None:
            with background_thread_priority():
                for m in self.live:
                    copies, m.prep.copies = m.prep.copies, []
                    for c in copies:
                        if c.mask.any():
                            w.put_pages(m.ctx.region_index[c.region], c.first_page, c.data, c.mask)
                for obj in self.objects:
                    for first, data, ok in obj.copied:
                        if ok.any():
                            w.put_pages(obj.store_index, first, data, ok)
                    obj.copied = []

        await trio.to_thread.run_sync(put_all, limiter=self.limiter)

    # ------------------------------------------------------------------ the end
    def _report_unsaved(self) -> None:
        """Pages never saved: a member that exited lost them with its memory."""
        for m in self.live:
            led = m.ctx.ledger
            pending = np.flatnonzero(led.state == 0)
            if len(pending):
                led.state[pending] = LOST
                why = (f"process {m.pid} exited during the capture" if m.exited
                       else "could not be read (unmapped by the process?)")
                m.ctx.mark_lost_slots(pending, why)
        for obj in self.objects:
            led = obj.ledger
            if led is None:
                continue
            pending = np.flatnonzero(led.state == 0)
            if len(pending):
                led.state[pending] = LOST
                object_context(obj, self.writer).mark_lost_slots(pending, "no process mapping it was left to read it")
            for first, mask in obj.lost:
                for s, n in runs_of(mask):
                    self.writer.mark_lost(obj.store_index, first + s, n, "removed (MADV_REMOVE) during the capture")

    def _note_outside_mappers(self) -> None:
        """Shared objects that processes outside the tree map too: their writes are not
        protected (say so, naming them)."""
        pids = {m.pid for m in self.members}
        keys = {}
        for m in self.members:
            for v in read_maps(m.pid):
                key = object_key(v)
                if key is not None and v.writable:
                    keys.setdefault(key, v.path)
        if not keys:
            return
        outside: dict[Any, list[int]] = {}
        existed = self.target.seen  # processes born since the listing are children of members:
        for entry in os.listdir("/proc"):  # frozen with them, or served through fork events
            if not entry.isdigit() or int(entry) in pids or int(entry) in self.sharers or int(entry) == os.getpid():
                continue
            if int(entry) not in existed:
                continue
            try:
                with open(f"/proc/{entry}/maps") as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                parts = line.split(None, 5)
                if len(parts) < 5 or parts[1][3] != "s" or parts[1][1] != "w":
                    continue
                major, minor = parts[3].split(":")
                key = ((int(major, 16), int(minor, 16)), int(parts[4]))
                if key in keys:
                    outside.setdefault(key, []).append(int(entry))
        for key, who in outside.items():
            self.warnings.append(
                f"shared memory {keys[key]} is also mapped by processes outside the snapshot "
                f"(pid {', '.join(map(str, sorted(set(who))[:8]))}): their writes during the capture "
                "are not write-protected and may show")

    def _note_new_mappings(self) -> None:
        """A member that mapped a shared object anew after the instant wrote through a
        mapping nobody protected: say so."""
        windows = {(w.member, w.start) for obj in self.objects for w in obj.windows}
        keys = {obj.key: obj for obj in self.objects}
        for i, m in enumerate(self.members):
            if m.gone_before or m.exited:
                continue
            try:
                vmas = read_maps(m.pid)
            except TargetError:
                continue
            for v in vmas:
                obj = keys.get(object_key(v))
                if obj is not None and v.writable and (i, v.start) not in windows and obj.protected:
                    self.warnings.append(
                        f"process {m.pid} mapped shared memory {obj.path} again during the capture: "
                        "writes through that mapping were not write-protected and may show")

    def _commit_meta(self, duration: float) -> dict[str, Any]:
        processes = []
        for m in self.live:
            ft, prep = m.ft, m.prep
            processes.append({
                "entry": m.entry, "pid": m.pid, "ppid": m.ppid, "comm": m.comm,
                "exe": m.meta.get("exe"), "cmdline": m.meta.get("cmdline"),
                "regions": [[m.region_first, len(prep.regions)], *([i, 1] for i in m.later_regions)],
                "threads": m.threads,
                "pause_ms": round(ft.pause_ms, 3), "attach_pause_ms": round(m.attach_pause_ms, 3),
                "protect_ms": round(prep.protect_ms, 3), "faults": m.ctx.faults,
                "preprotect_ms": round(m.pre.elapsed_ms, 3) if m.pre and not m.newcomer else None,
                "newcomer": m.newcomer, "exited": m.exited, "warnings": m.warnings,
                "sharers": sorted(p for p, owner in self.sharers.items() if owner == m.pid),
            })
        shared = []
        for obj in self.objects:
            doc = obj.describe()
            doc["mapped_by"] = sorted({self.members[w.member].pid for w in obj.windows})
            shared.append(doc)
        warnings = list(self.warnings)
        for m in self.live:
            warnings += [f"{m.entry}: {w}" for w in m.warnings]
        pause = max((m.ft.pause_ms for m in self.live), default=0.0)
        return {
            "tree": {"root": self.target.describe(), "processes": processes, "shared": shared},
            "pause_ms": pause, "duration_s": duration, "warnings": warnings,
            "faults": sum(m.ctx.faults for m in self.live) + self.children.faults,
            "children_forked": self.children.forks, "children_faults": self.children.faults,
            "attach_pause_ms": max((m.attach_pause_ms for m in self.live), default=0.0),
            "instant_ms": self.instant_ms, "timing_ms": self.phases,
        }

    def _result(self, info: Any, duration: float) -> TreeResult:
        shared = sum((r.data_pages + r.zero_pages) * PAGE for r in self.store.open_snapshot(info.name).regions
                     if r.name.startswith(SHARED_PREFIX))
        tree = info.meta["tree"]
        return TreeResult(
            name=info.name, root=tree["root"], processes=len(tree["processes"]), pause_ms=info.pause_ms,
            attach_pause_ms=info.meta.get("attach_pause_ms", 0.0), duration_s=duration,
            resident_bytes=info.resident_bytes, shared_bytes=shared, zero_bytes=info.zero_bytes,
            stored_bytes=info.stored_bytes, faults=info.faults, shared_objects=len(tree["shared"]),
            exited=[p["pid"] for p in tree["processes"] if p["exited"]], warnings=list(info.warnings),
            members=[{k: p[k] for k in ("entry", "pid", "pause_ms", "faults", "exited")} for p in tree["processes"]],
            info=info)


async def _call_on_cancel(call: Callable[[], None], done: trio.Event) -> None:
    """Call ``call`` once cancelled or once ``done`` is set, whichever comes first."""
    try:
        await done.wait()
    finally:
        call()


async def _warm_threads(count: int) -> None:
    """Leave ``count`` idle worker threads in trio's cache: the instant starts two fault
    threads per member, and creating them inside the pause cost ~10 ms on a loaded machine."""
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(partial(trio.to_thread.run_sync, time.sleep, 0.002))


def _maps_shared_object(v: Vma) -> bool:
    """A member's mapping of an object several processes share (recorded once per object)."""
    return object_key(v) is not None


def _handshake(uffd: Uffd) -> int:
    """UFFDIO_API asking for fork events too (a child's inherited protection must be served)."""
    try:
        return uffd.api(TREE_FEATURES)
    except OSError:
        return uffd.api(MINIMAL_FEATURES | k.UFFD_FEATURE_EVENT_FORK)


def _alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st.capturable


class _MemberRegions:
    """The writer as :func:`save_private_pages` sees it for one member: its regions named
    ``<entry>/<name>`` and listed among the member's."""

    def __init__(self, writer: Any, member: Member) -> None:
        self.writer, self.member = writer, member

    def add_region(self, spec: Any) -> int:
        idx = self.writer.add_region(dataclasses.replace(spec, name=f"{self.member.entry}/{spec.name}"))
        self.member.later_regions.append(idx)
        return idx

    def put_scattered(self, *args: Any, **kwargs: Any) -> None:
        self.writer.put_scattered(*args, **kwargs)


def _resume(group: StopGroup, members: list[Member]) -> None:
    """Release every process of the instant's group at once."""
    group.release()
    for m in members:
        if m.ft is not None:
            m.ft.resumed_at = group.released_at or time.monotonic()


@contextlib.contextmanager
def _stopped_quietly(pid: int):
    """Stop a process that runs on a member's memory (a vfork child) for the instant; a
    process gone meanwhile is skipped."""
    proc = StoppedProcess(pid)
    try:
        proc.stop()
    except TargetError:
        yield None
        return
    try:
        yield proc
    finally:
        proc.release()


@contextlib.contextmanager
def _frozen_newcomer(m: Member):
    """Inside the freeze: stop a process that joined the tree after the attach and take a
    uffd from it (its memory is then protected in full during the pause)."""
    try:
        m.handle.gadgets = find_gadgets(m.pid)
    except (TargetError, OSError):
        m.handle.gadgets = None  # searched for again once stopped
    proc = StoppedProcess(m.handle)
    t0 = time.monotonic()
    uffd: Uffd | None = None
    ft: FrozenTarget | None = None
    try:
        proc.stop()
        uffd = Uffd(proc.tracer.call(take_userfaultfd, proc))
        _handshake(uffd)
        ft = FrozenTarget(pid=m.pid, comm=m.comm, proc=proc, uffd=uffd, maps_text=read_maps_text(m.pid),
                          threads=proc.record_threads(), stopped_at=proc.group.paused_since(t0),
                          handle=m.handle)
        yield ft
    except BaseException:
        if uffd is not None:
            uffd.close()
        raise
    finally:
        proc.release()
        if ft is not None:
            ft.resumed_at = time.monotonic()


async def capture_tree(target: TreeTarget, store: Any, name: str, options: CaptureOptions | None = None,
                       progress: Callable[[Progress], None] | None = None) -> TreeResult:
    """Take one point-in-time snapshot of every process of ``target`` (a process and its
    descendants, or a cgroup) into ``store`` as ``name`` (kind ``tree``).

    Every member is stopped only for the attach and for the instant; afterwards they run
    while their pages and the shared objects are saved. On any failure or cancellation
    every process is released at once and nothing is published. Raises TargetError,
    PermissionDenied, NameInUse, StoreError.
    """
    return await _TreeCapture(target, store, name, options or CaptureOptions(), progress).run()
