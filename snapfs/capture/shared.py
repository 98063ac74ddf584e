"""Shared objects of a tree capture: memory several members map, recorded and saved once.

An object is a shmem file (``MAP_SHARED|MAP_ANONYMOUS`` memory inherited across fork, a memfd,
a tmpfs or ``/dev/shm`` file, a SysV segment) or a regular file mapped ``MAP_SHARED``,
identified by (device, inode). Write protection is per process (docs/architecture.md,
"Process trees"): every member's mapping is registered with that member's uffd and protected
at the instant; what is shared is the *ledger*, one per object, indexed by the object's page
offsets, so a page is saved once, by whoever comes first:

- a member's fault path, on a write fault in a window on the object (:meth:`MemberWindows.save`:
  save the pending page, then only this member's PTE is unprotected);
- the uffd of a child forked after the instant (:class:`ChildServer`: the child is not part of
  the snapshot, but its inherited mappings are still protected and its writes to the object
  must not go through before the page is saved);
- the object's background scan (:class:`ObjectScan`), which then unprotects the chunk in every
  member that maps it.

Pages are read through a file descriptor on the object itself (``/proc/PID/map_files``, kept
open for the whole capture, so the object outlives members that exit), else through a live
member's mapping. Objects the kernel cannot protect (SysV segments, regular files) are copied
once while every member is stopped.
"""

from __future__ import annotations

import bisect
import errno
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from snapfs.capture import kernel as k
from snapfs.capture.context import CaptureContext
from snapfs.capture.ledger import LOST, Ledger
from snapfs.capture.maps import Vma, _basename
from snapfs.capture.memory import file_data_ranges, read_pages_robust
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.preprotect import populated_ranges
from snapfs.capture.priority import realtime_thread
from snapfs.capture.scan import Scan
from snapfs.capture.uffd import Uffd, decode_messages
from snapfs.errors import TargetError

PAGE = k.PAGE_SIZE
Key = tuple[tuple[int, int], int]  # ((major, minor), inode)


def object_key(v: Vma) -> Key | None:
    """The identity of the object a shared mapping maps (None if it is not one)."""
    # A SysV segment's inode is its shmid, 0 for the first segment after boot.
    return (v.dev, v.inode) if v.shared and (v.inode or v.path.startswith("/SYSV")) else None


@dataclass
class Window:
    """One member's mapping of an object: addresses [start, end) show object bytes from
    ``offset`` on."""

    member: int
    start: int
    end: int
    offset: int

    def to_offsets(self, lo: int, hi: int) -> tuple[int, int]:
        """Object offsets of addresses [lo, hi) clipped to the window."""
        lo, hi = max(lo, self.start), min(hi, self.end)
        return self.offset + lo - self.start, self.offset + hi - self.start


@dataclass
class SharedObject:
    """One object of the capture."""

    key: Key
    path: str
    kind: str  # region kind: shmem, hugetlb or file
    page_size: int
    cache_backed: bool = True  # shmem/tmpfs: its page cache is the memory (SEEK_DATA finds it)
    index: int = -1  # its position among the capture's objects (what windows name it by)
    entry: str = ""
    windows: list[Window] = field(default_factory=list)  # at the instant
    fd: int = -1  # a descriptor on the object itself (-1: none; read through members)
    protected: bool = True  # every window registered and protected (else copied, stopped)
    store_index: int = -1
    ledger: Ledger | None = None  # pages populated at the instant, by offset
    copied: list[tuple[int, bytearray, np.ndarray]] = field(default_factory=list)  # (first page, data, ok)
    mapped_outside: list[int] = field(default_factory=list)
    reason: str = ""  # why it is copied rather than protected
    lost: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (first page, mask): punched

    @property
    def length(self) -> int:
        """The object's region in the store: offsets [0, the end of the last window)."""
        end = max(w.offset + w.end - w.start for w in self.windows)
        return -(-end // self.page_size) * self.page_size

    def describe(self) -> dict[str, Any]:
        """The object's entry in the snapshot's ``meta["tree"]["shared"]``."""
        return {
            "entry": self.entry, "region": self.store_index, "key": _key_text(self.key),
            "path": self.path, "kind": self.kind, "page_size": self.page_size,
            "how": "write-protected" if self.protected else f"copied while stopped ({self.reason})",
        }

    # ------------------------------------------------------------------ reading
    def read(self, buf, spans, members: list[Any]) -> np.ndarray:
        """Read object ``spans`` (offset, length) back to back into ``buf``; True per page
        read (pages past the object's end, or with no live mapping to read them through,
        stay False)."""
        view = memoryview(buf)
        spans = np.asarray(spans, np.int64).reshape(-1, 2).tolist()
        npages = sum(n for _, n in spans) // PAGE
        ok = np.zeros(npages, bool)
        pos = 0
        for off, n in spans:
            if self.fd >= 0:
                got = _pread_all(self.fd, view[pos: pos + n], off)
                ok[pos // PAGE: (pos + got) // PAGE] = True
            else:
                ok[pos // PAGE: (pos + n) // PAGE] = self._read_via_members(view[pos: pos + n], off, members)
            pos += n
        return ok

    def _read_via_members(self, dest: memoryview, off: int, members: list[Any]) -> np.ndarray:
        n = len(dest) // PAGE
        ok = np.zeros(n, bool)
        for mi, m in enumerate(members):
            if m.exited:
                continue
            if m.windows is not None:  # where it maps the object now
                windows = m.windows.of_object(self.index)
            else:  # inside the freeze: as at the instant
                windows = [(w.start, w.end, self.index, w.offset) for w in self.windows if w.member == mi]
            for start, end, _, offset in windows:
                lo, hi = max(off, offset), min(off + len(dest), offset + end - start)
                if hi <= lo:
                    continue
                try:
                    got = read_pages_robust(m.pid, dest[lo - off: hi - off], [(start + lo - offset, hi - lo)])
                except TargetError:
                    continue
                ok[(lo - off) // PAGE: (hi - off) // PAGE] |= got
            if ok.all():
                break
        return ok

    def save(self, sink: Any, lo: int, hi: int, members: list[Any]) -> None:
        """Save the pending pages of object offsets [lo, hi) now and hand them to ``sink``
        (a FaultPath's ``queue``): called before a writer's protection is dropped."""
        led = self.ledger
        if led is None:
            return
        for ext, s, e in led.pieces(lo, hi):
            a, b = led.slots(ext, s, e)
            pending = led.state[a:b] == 0
            if not pending.any():
                continue
            buf = bytearray(e - s)
            ok = self.read(buf, [(s, e - s)], members)
            mine = led.claim(a, b, ok & pending)
            if mine.any():
                # Whole (the usual single page): the store side batches such pages together.
                sink.queue(self.store_index, s // PAGE, buf, None if mine.all() else mine)
                # Saved: no member needs to fault on these pages any more (one fault per page,
                # not one per page and process: PostgreSQL's backends all write shared_buffers).
                self.release(s, e, members)

    def release(self, lo: int, hi: int, members: list[Any]) -> None:
        """Unprotect object offsets [lo, hi) (saved) in every live member that maps them,
        where it maps them now (its windows follow its munmap/mremap events). One C call for
        all of them: PostgreSQL's 10 processes map shared_buffers, and a GIL round trip per
        member and fault left the first burst of faults after the resume waiting ~100 ms.
        A refused unprotect leaves the page protected there: that member's fault finds it
        saved and only unprotects it."""
        fds, los, his = [], [], []
        for m in members:
            if m.exited or m.uffd is None or m.windows is None or m.uffd.fd < 0:
                continue
            for start, end, index, offset in m.windows.of_object(self.index):
                a_lo = start + max(lo, offset) - offset
                a_hi = start + min(hi, offset + end - start) - offset
                if a_hi > a_lo:
                    fds.append(m.uffd.fd)
                    los.append(a_lo)
                    his.append(a_hi)
        if fds:
            k.lib.snapfs_unprotect_each(k.ffi.new("int[]", fds), k.ffi.new("uint64_t[]", los),
                                        k.ffi.new("uint64_t[]", his), len(fds), k.UFFDIO_WRITEPROTECT,
                                        k.ffi.new("int[]", len(fds)))


def _key_text(key: Key) -> str:
    (major, minor), inode = key
    return f"{major:x}:{minor:x}:{inode}"


def _pread_all(fd: int, dest: memoryview, off: int) -> int:
    """pread until ``dest`` is full or the file ends; returns bytes read (whole pages)."""
    done = 0
    while done < len(dest):
        try:
            got = os.preadv(fd, [dest[done:]], off + done)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            break
        if got <= 0:
            break
        done += got
    return done // PAGE * PAGE


def entry_name(obj: SharedObject, taken: set[str]) -> str:
    """A unique directory name for an object under ``shared/``: its file name and inode."""
    base = f"{_basename(obj.path) or 'shmem'}-{obj.key[1]}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}.{n}", n + 1
    taken.add(name)
    return name


def open_object(pid: int, v: Vma) -> int:
    """A read-only descriptor on the object ``v`` maps (``/proc/PID/map_files``: needs
    CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE), or -1."""
    try:
        return os.open(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        elif hi > lo:
            out.append((lo, hi))
    return out


def populated_offsets(obj: SharedObject, members: list[Any]) -> list[tuple[int, int]]:
    """The object's pages that hold memory at the instant, as offset ranges within its
    windows: its page cache (shmem, read through ``fd``), else (a regular file, or no
    descriptor) the pages some member has mapped."""
    windows = _merge([(w.offset, w.offset + w.end - w.start) for w in obj.windows])
    if obj.fd >= 0 and obj.cache_backed:
        return _merge([r for lo, hi in windows for r in file_data_ranges(obj.fd, lo, hi)])
    found = []
    for w in obj.windows:
        scanner = PagemapScanner(members[w.member].pid)
        try:
            present = populated_ranges(scanner, w.start, w.end)
        finally:
            scanner.close()
        found += [w.to_offsets(s, e) for s, e in zip(present["start"].tolist(), present["end"].tolist())]
    return _merge(found)


def record_at_instant(obj: SharedObject, members: list[Any]) -> None:
    """Inside the freeze: the object's ledger (protected objects) or its copy (the others)."""
    ranges = populated_offsets(obj, members)
    if obj.protected:
        huge = obj.page_size != PAGE
        obj.ledger = Ledger(np.array([s for s, _ in ranges], np.uint64), np.array([e for _, e in ranges], np.uint64),
                            np.zeros(len(ranges), np.int32), np.full(len(ranges), huge, bool), [0])
        return
    for lo, hi in ranges:
        buf = bytearray(hi - lo)
        ok = obj.read(buf, [(lo, hi - lo)], members)
        obj.copied.append((lo // PAGE, buf, ok))


def object_context(obj: SharedObject, writer: Any) -> CaptureContext:
    """A capture context over the object's ledger (its region: offsets from 0), for its scan."""
    region = Vma(0, obj.length, "rw-s", 0, obj.key[0], obj.key[1], obj.path, page_size=obj.page_size,
                 mode="wp", kind=obj.kind, name=obj.entry)
    return CaptureContext(pid=0, uffd=None, ledger=obj.ledger, regions=[region],
                          region_index=[obj.store_index], writer=writer)


class ObjectScan(Scan):
    """The background scan of one object: reads through the object (or a member), and once a
    chunk is claimed unprotects it in every member that maps it."""

    def __init__(self, obj: SharedObject, ctx: CaptureContext, members: list[Any], rate: float | None,
                 rate_deadline: float | None = None) -> None:
        super().__init__(ctx, rate, rate_deadline=rate_deadline)
        self.obj = obj
        self.members = members

    def _open_scanner(self) -> None:
        return None

    def _read(self, buf, spans):
        return self.obj.read(buf, spans, self.members)

    def _still_frozen(self, scanner, lo: np.ndarray, hi: np.ndarray, wp: np.ndarray) -> np.ndarray:
        # Pending pages are protected in every member (only a claim lets anyone unprotect):
        # what was read is the instant's content. Writers no page table sees (write(2),
        # processes outside the tree) are reported as warnings instead.
        return np.ones((int(hi[-1]) - int(lo[0])) // PAGE, bool)

    def _release(self, lo: int, hi: int) -> None:
        self.obj.release(lo, hi, self.members)


class MemberWindows:
    """A member's (or a forked child's) windows on the capture's objects: what its fault path
    asks before unprotecting a page it does not own (``CaptureContext.shared``)."""

    def __init__(self, objects: list[SharedObject], members: list[Any],
                 windows: list[tuple[int, int, int, int]] | None = None) -> None:
        self.objects = objects
        self.members = members
        self.windows = sorted(windows or [])  # (start, end, object index, offset)
        self.lock = threading.Lock()  # events change the windows from the fault thread

    @classmethod
    def of_member(cls, member: int, objects: list[SharedObject], members: list[Any]) -> "MemberWindows":
        return cls(objects, members, [(w.start, w.end, i, w.offset) for i, o in enumerate(objects)
                                      for w in o.windows if w.member == member])

    def copy(self) -> "MemberWindows":
        """The same windows, for a child forked now (it inherits its parent's layout)."""
        with self.lock:
            return MemberWindows(self.objects, self.members, list(self.windows))

    def of_object(self, index: int) -> list[tuple[int, int, int, int]]:
        """The windows on object ``index``."""
        with self.lock:
            return [w for w in self.windows if w[2] == index]

    def _overlapping(self, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
        with self.lock:
            i = max(bisect.bisect_right(self.windows, (lo,)) - 1, 0)
            return [w for w in self.windows[i:] if w[0] < hi and w[1] > lo]

    def save(self, sink: Any, lo: int, hi: int) -> None:
        """Before [lo, hi) is unprotected: save the object pages it shows that are pending."""
        for start, end, i, offset in self._overlapping(lo, hi):
            a, b = max(lo, start), min(hi, end)
            self.objects[i].save(sink, offset + a - start, offset + b - start, self.members)

    def event(self, sink: Any, ev: int, a0: int, a1: int, a2: int) -> None:
        """A REMOVE/UNMAP/REMAP event on the process: MADV_REMOVE may punch the object, so its
        pending pages there are saved first (then those found gone are reported lost); an
        unmapped or moved window is forgotten or moved (the object itself lives on)."""
        if ev == k.UFFD_EVENT_REMOVE:
            for start, end, i, offset in self._overlapping(a0, a1):
                obj = self.objects[i]
                lo, hi = offset + max(a0, start) - start, offset + min(a1, end) - start
                obj.save(sink, lo, hi, self.members)
                _lose_holes(obj, lo, hi, sink)
        elif ev == k.UFFD_EVENT_UNMAP:
            self._cut(a0, a1, None)
        elif ev == k.UFFD_EVENT_REMAP:
            self._cut(a0, a0 + a2, a1)

    def _cut(self, lo: int, hi: int, moved_to: int | None) -> None:
        with self.lock:
            out = []
            for start, end, i, offset in self.windows:
                if end <= lo or start >= hi:
                    out.append((start, end, i, offset))
                    continue
                if start < lo:
                    out.append((start, lo, i, offset))
                if end > hi:
                    out.append((hi, end, i, offset + hi - start))
                if moved_to is not None:
                    a, b = max(start, lo), min(end, hi)
                    out.append((moved_to + a - lo, moved_to + b - lo, i, offset + a - start))
            self.windows = sorted(out)


def _lose_holes(obj: SharedObject, lo: int, hi: int, sink: Any) -> None:
    """After a possible punch: pending pages of [lo, hi) that are holes now cannot be saved."""
    led = obj.ledger
    if led is None or obj.fd < 0:
        return
    data = file_data_ranges(obj.fd, lo, hi)
    for ext, s, e in led.pieces(lo, hi):
        a, b = led.slots(ext, s, e)
        offs = s + np.arange(b - a, dtype=np.int64) * PAGE
        held = np.zeros(b - a, bool)
        for d_lo, d_hi in data:
            held |= (offs >= d_lo) & (offs < d_hi)
        mine = led.claim(a, b, ~held, state=LOST)
        if mine.any():
            obj.lost.append((s // PAGE, mine))


class ChildServer:
    """Serves the uffds of children forked by members after the instant (UFFD_EVENT_FORK).

    A child is not part of the snapshot, but its mappings inherit their protection, so its
    writes fault here: on a window of an object, the pending page is saved first; anything
    else is only unprotected (its private pages are unprotected in one sweep as soon as it
    arrives). One thread serves every child with epoll; children that exit are noticed
    (ESRCH) and their uffd closed.
    """

    REAP_S = 0.5

    def __init__(self, private_ranges: Callable[[int], list[tuple[int, int]]]) -> None:
        self.sink: Any = None  # where saved object pages go (a member's FaultPath): set before run
        self._private_ranges = private_ranges  # parent member index -> its private VMA ranges
        self.children: dict[int, tuple[Uffd, MemberWindows]] = {}
        self.forks = 0
        self.faults = 0
        self._lock = threading.Lock()
        self._epoll = select.epoll()
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._stop_fd, select.EPOLLIN)
        self._stopping = False

    def adopt(self, fd: int, windows: MemberWindows, parent: int | None) -> None:
        """A child's uffd arrived (from any thread): unprotect its private memory, then serve it."""
        uffd = Uffd(fd)
        os.set_blocking(fd, False)
        if parent is not None:
            for lo, hi in self._private_ranges(parent):
                uffd.unprotect_quiet(lo, hi - lo)
        with self._lock:
            if self._stopping:
                uffd.close()
                return
            self.children[fd] = (uffd, windows)
            self.forks += 1
        self._epoll.register(fd, select.EPOLLIN)

    def on_fork_of(self, windows: MemberWindows, parent: int | None) -> Callable[[int], None]:
        """The ``CaptureContext.on_fork`` of a process with these windows."""
        return lambda fd: self.adopt(fd, windows.copy(), parent)

    def run(self) -> None:
        """Thread body, until :meth:`stop`."""
        with realtime_thread():
            while not self._stopping:
                ready = self._epoll.poll(self.REAP_S)
                for fd, _ in ready:
                    if fd != self._stop_fd:
                        self._serve(fd)
                if not ready:
                    self._reap()

    def _serve(self, fd: int) -> None:
        entry = self.children.get(fd)
        if entry is None:
            return
        uffd, windows = entry
        raw = uffd.read_raw()
        if not raw:
            return
        for m in decode_messages(raw).tolist():
            ev, a0, a1, a2 = m[0], m[4], m[5], m[6]
            if ev == k.UFFD_EVENT_PAGEFAULT:
                lo = a1 & ~(PAGE - 1)
                windows.save(self.sink, lo, lo + PAGE)
                if uffd.unprotect_quiet(lo, PAGE) == "gone" and _dead(uffd):
                    self._drop(fd)
                    return
                self.faults += 1
            elif ev == k.UFFD_EVENT_FORK:
                self.adopt(a0 & 0xFFFFFFFF, windows.copy(), None)
            else:
                windows.event(self.sink, ev, a0, a1, a2)

    def _reap(self) -> None:
        for fd, (uffd, _) in list(self.children.items()):
            if _dead(uffd):
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        with self._lock:
            uffd, _ = self.children.pop(fd)
        self._epoll.unregister(fd)
        uffd.close()

    def stop(self) -> None:
        """End the thread (call from another thread)."""
        self._stopping = True
        with self._lock:
            if self._stop_fd >= 0:
                os.eventfd_write(self._stop_fd, 1)

    def close(self) -> None:
        """After the thread ended: close every child's uffd (dropping their protection).
        Safe to call twice."""
        with self._lock:
            self._stopping = True
            children, self.children = self.children, {}
            stop_fd, self._stop_fd = self._stop_fd, -1
        for uffd, _ in children.values():
            uffd.close()
        if stop_fd >= 0:
            self._epoll.close()
            os.close(stop_fd)


def _dead(uffd: Uffd) -> bool:
    """Whether the process behind a uffd is gone: its ioctls then fail with ESRCH (an
    unprotect of the unmapped page at 0 changes nothing in a live process)."""
    try:
        uffd.protect(0, PAGE, wp=False)
    except OSError as exc:
        return exc.errno == errno.ESRCH
    return False
