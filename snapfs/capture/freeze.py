"""The freeze: stop every thread, get a userfaultfd for the target's mm, yield the stopped
target; leaving the block always resumes every thread and detaches.

Entry points:

- :func:`stopped` (sync context manager): only stops and resumes every thread (no uffd);
  used where a consistent instant is enough (``snapfs incoming --pid``). :func:`stopped_group`
  does the same for several processes at one instant.
- :func:`frozen` (async context manager): stops, injects ``userfaultfd()`` (or hands a
  ``/dev/userfaultfd`` fd to the target and injects ``USERFAULTFD_IOC_NEW`` when the target
  may not create one), takes the fd with ``pidfd_getfd``, closes the target's copy, and
  yields a :class:`FrozenTarget`. What to protect is the caller's business (the engine
  pre-protects while the target runs, then re-protects only what changed).
- :func:`frozen_again` (sync): the snapshot instant of a target whose uffd snapfs holds.

Each takes a PID or a :class:`~snapfs.capture.handle.ProcessHandle`. With a handle, the
process is pinned (a PID reused meanwhile is refused) and :func:`frozen` marks its address
space, so a later :func:`frozen_again` refuses a target that exec'd in between.

Release is guaranteed on every path: exceptions, trio cancellation and KeyboardInterrupt
(the release runs KI-protected); stops and injections are bounded (``STOP_TIMEOUT``). If
snapfs is SIGKILLed the kernel detaches the threads, an injection in progress finishes
by itself (:mod:`snapfs.capture.inject`), and, since snapfs holds the only reference to the
uffd, every protection is dropped.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field

import trio

from snapfs.capture import kernel as k
from snapfs.capture.handle import ProcessHandle
from snapfs.capture.inject import find_gadgets
from snapfs.capture.maps import Vma, parse_maps, read_maps_text
from snapfs.capture.memory import read_memory, write_memory
from snapfs.capture.priority import LOOP_PRIORITY, realtime_thread, realtime_thread_of
from snapfs.capture.ptrace import STOP_TIMEOUT, StopGroup, StoppedProcess, get_tracer, list_tids
from snapfs.capture.uffd import Uffd
from snapfs.errors import PermissionDenied, TargetError

O_NONBLOCK = os.O_NONBLOCK
O_CLOEXEC = os.O_CLOEXEC


def _pin(target: int | ProcessHandle) -> tuple[ProcessHandle, bool]:
    """(handle, whether we opened it and must close it)."""
    if isinstance(target, ProcessHandle):
        return target, False
    return ProcessHandle.open(target), True


@contextlib.contextmanager
def stopped_group(targets: Iterable[int | ProcessHandle], timeout: float = STOP_TIMEOUT) -> Iterator[StopGroup]:
    """Stop every thread of every target at one instant (all interrupted before any is
    waited for); resume and detach them all on exit, whatever happens. ``group[pid]`` is
    each :class:`StoppedProcess`. Blocking; usable from any thread."""
    pinned = [_pin(t) for t in targets]
    try:
        group = StopGroup([h for h, _ in pinned], timeout=timeout)
        _stop_protected(group)
        try:
            yield group
        finally:
            _release_protected(group)
    finally:
        for h, owned in pinned:
            if owned:
                h.close()


@contextlib.contextmanager
def stopped(target: int | ProcessHandle, timeout: float = STOP_TIMEOUT) -> Iterator[StoppedProcess]:
    """Stop every thread of one process (ptrace seize + interrupt, catching new threads);
    resume and detach them all on exit, whatever happens."""
    with stopped_group([target], timeout=timeout) as group:
        yield group.procs[0]


@trio.lowlevel.enable_ki_protection
def _stop_protected(group: StopGroup, then_in_trio: Callable[[], None] | None = None) -> None:
    group.stop(then_in_trio)


@trio.lowlevel.enable_ki_protection
def _release_protected(group: StopGroup, uffd: Uffd | None = None, decode: bool = True) -> None:
    if uffd is not None:
        uffd.close()
    group.release(decode)


@dataclass
class FrozenTarget:
    """The stopped target as yielded by :func:`frozen` / :func:`frozen_again`."""

    pid: int
    comm: str
    proc: StoppedProcess
    uffd: Uffd
    maps_text: str  # /proc/PID/maps at the stop (parsed on first use of ``maps``)
    threads: dict[str, dict]
    stopped_at: float  # time.monotonic() when the stop began
    # Blocked-signal masks by tid (frozen_again only; complete once released).
    thread_masks: dict[str, int] = field(default_factory=dict)
    resumed_at: float | None = None
    injected_ms: float = 0.0
    handle: ProcessHandle | None = None
    _maps: list[Vma] | None = field(default=None, repr=False)

    @property
    def maps(self) -> list[Vma]:
        """The VMAs at the stop. Parsed lazily: with tens of thousands of mappings, parsing
        costs more than the rest of the pause (the capture compares the text instead)."""
        if self._maps is None:
            self._maps = parse_maps(self.maps_text)
        return self._maps

    @property
    def pause_ms(self) -> float:
        """How long the target was stopped (so far, if still stopped)."""
        end = self.resumed_at if self.resumed_at is not None else time.monotonic()
        return (end - self.stopped_at) * 1000.0


@contextlib.asynccontextmanager
async def frozen(target: int | ProcessHandle, record: bool = True,
                 one_thread: bool = False) -> AsyncIterator[FrozenTarget]:
    """Stop every thread of the target and get a userfaultfd for its memory.

    Yields a :class:`FrozenTarget`; its ``uffd`` has had no UFFDIO_API yet and stays open
    after a normal exit (the caller then owns it and must close it). On an exception or
    cancellation inside the block the uffd is closed before the threads are released. The
    block must not checkpoint for long: the target is stopped for its whole duration.
    ``record=False`` skips reading the maps and the registers (``maps``/``threads`` empty):
    the stop that only fetches the uffd before pre-protection (see :func:`frozen_again`).

    ``one_thread=True`` (with ``record=False``) stops only the thread the call is injected
    into, and releases it before the block runs (the target runs inside the block): a
    userfaultfd belongs to the process's mm, so the other threads may run on, and the stop's
    cost no longer grows with their number. A fork by another thread between the injected
    userfaultfd() and its close would give the child a copy that keeps the uffd alive
    (snapfs's death would then not drop the protection): children that appeared meanwhile
    are checked (after the release), and if one holds it the uffd is dropped and taken
    again with every thread stopped.

    Raises TargetError (no such process, kernel thread, exited, exec'd, a thread that does
    not stop), PermissionDenied (ptrace or userfaultfd refused, with what to grant).
    """
    handle, owned = _pin(target)
    rt = contextlib.ExitStack()  # realtime for the short stop (below); closed at the latest on exit
    try:
        # Found while the target runs (the pause stays short), checked again once stopped
        # (and searched for then if the target was, say, still starting up).
        try:
            handle.gadgets = find_gadgets(handle.pid)
        except (TargetError, OSError):
            handle.gadgets = None
        one_thread = one_thread and not record
        kids = _children(handle.pid) if one_thread else set()
        group = StopGroup([handle], one_thread=one_thread)
        proc = group.procs[0]
        # The short stop of one thread (released before the block): the trio thread and the
        # tracer hand the steps to each other, and on a busy machine each hand-off waited
        # behind the other processes (a PostgreSQL backend under pgbench: 9-51 ms stopped,
        # 3.5-22 ms realtime).
        if one_thread:
            rt.enter_context(realtime_freeze())
        t0 = time.monotonic()
        await _astop_protected(group)
        uffd: Uffd | None = None
        ok = False
        ft: FrozenTarget | None = None
        try:
            t1 = time.monotonic()
            uffd = Uffd(await _take_shielded(group, proc))
            injected_ms = (time.monotonic() - t1) * 1000.0
            handle.mark_mm(handle.gadgets["syscall_ret"], proc.tids[0])
            if one_thread:
                _release_protected(group)
                resumed_at = group.released_at
                rt.close()
                if _inherited(uffd.fd, _children(handle.pid) - kids):
                    uffd.close()
                    uffd = None
                    group.one_thread = False  # every thread, this time: no fork can copy it
                    await _astop_protected(group)
                    uffd = Uffd(await _take_shielded(group, proc))
                    _release_protected(group)
                    resumed_at = group.released_at
            ft = FrozenTarget(
                pid=handle.pid,
                comm=handle.comm,
                proc=proc,
                uffd=uffd,
                maps_text=read_maps_text(handle.pid) if record else "",
                threads=proc.record_threads() if record else {},
                stopped_at=group.paused_since(t0),
                injected_ms=injected_ms,
                handle=handle,
            )
            if one_thread:
                ft.resumed_at = resumed_at
            yield ft
            ok = True
        except OSError as exc:
            _raise_if_gone(handle, exc)
            raise
        finally:
            _release_protected(group, None if ok else uffd)
            if ft is not None and ft.resumed_at is None:
                ft.resumed_at = group.released_at or time.monotonic()
    finally:
        rt.close()  # after the release above (a no-op once dropped before the block)
        if owned:
            handle.close()


async def _take_shielded(group: StopGroup, proc: StoppedProcess) -> int:
    """take_userfaultfd in the tracer thread, shielded from cancellation: it takes
    microseconds (bounded by STOP_TIMEOUT), and a cancellation mid-way would lose our fd;
    a cancellation meanwhile takes effect just after."""
    with trio.CancelScope(shield=True):
        return await group.tracer.acall(take_userfaultfd, proc)


def _children(pid: int) -> set[int]:
    """PIDs of the children of every thread of ``pid`` (empty where unreadable)."""
    out: set[int] = set()
    for tid in list_tids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def userfaultfds(pid: int) -> list[int]:
    """The fd numbers of the userfaultfds process ``pid`` holds (empty if unreadable)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            if "userfaultfd" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                out.append(int(fd))
        except OSError:
            continue
    return out


def _inherited(ours: int, pids: Iterable[int]) -> int | None:
    """A process among ``pids`` whose fd table holds the same file as our fd ``ours``
    (compared with kcmp), or None."""
    me = os.getpid()
    for pid in pids:
        for fd in userfaultfds(pid):
            try:
                if k.syscall("kcmp", me, pid, k.KCMP_FILE, ours, fd) == 0:
                    return pid
            except OSError:
                continue
    return None


@trio.lowlevel.enable_ki_protection
async def _astop_protected(group: StopGroup) -> None:
    await group.astop()


@contextlib.contextmanager
def frozen_again(
    target: int | ProcessHandle, comm: str, uffd: Uffd, on_stopped: Callable[[], None] | None = None,
    realtime: bool = False, expect_maps: tuple[str, bytes] | None = None,
    in_trio_when_stopped: Callable[[], None] | None = None,
) -> Iterator[FrozenTarget]:
    """Stop every thread of the target again, for a target whose ``uffd`` snapfs already
    holds (taken by an earlier :func:`frozen`): the snapshot instant after pre-protection.

    Yields a :class:`FrozenTarget` with fresh maps and registers; leaving the block resumes
    and detaches every thread whatever happens. The uffd is left to the caller (who closes
    it on failure, which drops every protection). Given the handle :func:`frozen` used, a
    target that exec'd since (the uffd belongs to its old address space) is refused.

    Blocking; run it in one worker thread while the trio thread keeps serving write faults —
    a thread of the target faulting in kernel mode on protected memory cannot stop before
    its fault is served. From a trio worker thread the stop is cancellable.
    ``in_trio_when_stopped`` runs in the trio thread once every thread is stopped (on the
    stop's own hand-back, not a hop of its own: e.g. to halt that fault server, which runs
    there), then ``on_stopped`` in this thread, before the maps are read. ``realtime``: the
    calling thread and the tracer run SCHED_FIFO from the stop to the release
    (:func:`realtime_freeze`), not while the records are decoded after it.
    ``expect_maps``: the maps text (and its bytes) the caller expects, used as is when
    unchanged (see :func:`read_maps_text`).
    """
    handle, owned = _pin(target)
    group = StopGroup([handle])
    proc = group.procs[0]
    ft: FrozenTarget | None = None
    try:
        with realtime_freeze() if realtime else contextlib.nullcontext():
            t0 = time.monotonic()
            _stop_protected(group, in_trio_when_stopped)
            try:
                # Registers and signal masks are read by the tracer thread while this one
                # reads the maps and protects memory (complete once released).
                masks: dict[str, int] = {}
                threads = proc.record_threads(wait=False, masks=masks)
                if on_stopped is not None:
                    on_stopped()
                ft = FrozenTarget(
                    pid=handle.pid,
                    comm=comm,
                    proc=proc,
                    uffd=uffd,
                    maps_text=read_maps_text(handle.pid, expect_maps),
                    threads=threads,
                    stopped_at=group.paused_since(t0),
                    thread_masks=masks,
                    handle=handle,
                )
                yield ft
            except OSError as exc:
                _raise_if_gone(handle, exc)
                raise
            finally:
                _release_protected(group, decode=False)
                if ft is not None:
                    ft.resumed_at = group.released_at or time.monotonic()
        group.finish_records()
    finally:
        if owned:
            handle.close()


@contextlib.contextmanager
def realtime_freeze() -> Iterator[None]:
    """For the block, run the calling thread (the one that freezes) and the ptrace tracer
    thread it waits on SCHED_FIFO (the trio loop's level; nothing without the privilege):
    every thread of the target waits on them. Ordinary, they waited behind other processes
    at every stop, register read and release (tens of ms of pause at a load of 12 on 2
    cores), and behind the target's own threads, each woken by its PTRACE_DETACH and
    preempting the tracer before the next one (256 detaches in one C call: 7-12 ms, 0.7-1 ms
    realtime). Used by the engine's and the tree's freeze."""
    with realtime_thread(LOOP_PRIORITY), realtime_thread_of(get_tracer().tid, LOOP_PRIORITY):
        yield


def _raise_if_gone(handle: ProcessHandle, exc: OSError) -> None:
    """An error that found the target gone (exited, exec'd) becomes a clear TargetError."""
    if exc.errno in (errno.ESRCH, errno.ENOMEM, errno.ENOENT, errno.EIO):
        gone = handle.gone_error()
        if gone is not None:
            raise gone from None
    if exc.errno == errno.ESRCH:
        raise TargetError(f"process {handle.pid} exited during the snapshot") from None


def take_userfaultfd(proc: StoppedProcess) -> int:
    """Create a userfaultfd inside the stopped target and take it; the target keeps no copy.

    Tries an injected ``userfaultfd(O_CLOEXEC|O_NONBLOCK)``; if the target's credentials
    forbid it (``vm.unprivileged_userfaultfd=0``), hands it a ``/dev/userfaultfd`` fd and
    injects ``ioctl(USERFAULTFD_IOC_NEW)``. Runs best in the stop's tracer thread (one
    hand-off for the whole exchange).
    """
    inject = proc.injector()
    try:
        fd, ours = inject.call_and_close("userfaultfd", (O_CLOEXEC | O_NONBLOCK,), _taker(proc, inject.tid))
        if fd in (-errno.EPERM, -errno.EACCES):
            ours = _userfaultfd_via_dev(proc)
        elif fd < 0:
            raise TargetError(f"userfaultfd() failed in process {proc.pid}: {os.strerror(-fd)}")
        assert ours is not None
    except BaseException:
        inject.finish_quietly()
        raise
    # Put the thread's own registers back at once: the rest of the freeze needs no
    # injection, and the thread is then exactly as it was stopped.
    try:
        inject.restore()
    except BaseException:
        os.close(ours)
        raise
    os.set_blocking(ours, False)
    return ours


def _taker(proc: StoppedProcess, tid: int) -> Callable[[int], int]:
    """pidfd_getfd from thread ``tid``'s fd table (where the injected call put the fd)."""

    def take(target_fd: int) -> int:
        handle = proc.handle
        pidfd = handle.thread_pidfd(tid) if handle is not None else k.pidfd_open(proc.pid)
        try:
            return k.pidfd_getfd(pidfd, target_fd)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise PermissionDenied(
                    f"pidfd_getfd refused for process {proc.pid}: run snapfs as its user or as root"
                ) from None
            raise
        finally:
            os.close(pidfd)

    return take


def _userfaultfd_via_dev(proc: StoppedProcess) -> int:
    """The /dev/userfaultfd handoff (SCM_RIGHTS over an injected socketpair); returns our
    copy of the uffd the target created."""
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | O_CLOEXEC)
    except OSError as exc:
        raise PermissionDenied(
            f"process {proc.pid} may not create a userfaultfd and /dev/userfaultfd is not "
            f"accessible to snapfs ({exc.strerror}): grant read/write access to "
            "/dev/userfaultfd (e.g. a 'userfaultfd' group or an ACL) or set "
            "sysctl vm.unprivileged_userfaultfd=1"
        ) from None
    inject = proc.injector()
    take = _taker(proc, inject.tid)
    scratch = inject.scratch_address(256)
    opened: list[int] = []  # fds made in the target, closed at the end (or by the chain)
    try:
        r = inject("socketpair", socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0, scratch)
        if r < 0:
            raise TargetError(f"socketpair() failed in process {proc.pid}: {os.strerror(-r)}")
        sv0, sv1 = struct.unpack("<ii", read_memory(inject.tid, scratch, 8))
        for fd in (sv0, sv1):
            opened.append(fd)
            inject.own(fd)
        with socket.socket(fileno=take(sv1)) as s:
            s.sendmsg([b"u"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [dev]))])
        # struct msghdr + iovec + 8-byte buffer + cmsg buffer, on the dead stack.
        iov, data, cmsg = scratch + 64, scratch + 80, scratch + 96
        msghdr = struct.pack("<QI4xQQQQi4x", 0, 0, iov, 1, cmsg, 32, 0)
        write_memory(inject.tid, scratch, msghdr)
        write_memory(inject.tid, iov, struct.pack("<QQ", data, 8))
        r = inject("recvmsg", sv0, scratch, socket.MSG_CMSG_CLOEXEC)
        if r < 0:
            raise TargetError(f"recvmsg() failed in process {proc.pid}: {os.strerror(-r)}")
        _, level, typ, tdev = struct.unpack("<Qiii", read_memory(inject.tid, cmsg, 20))
        if level != socket.SOL_SOCKET or typ != socket.SCM_RIGHTS:
            raise TargetError(f"fd handoff to process {proc.pid} failed")
        opened.append(tdev)
        inject.own(tdev)
        fd, ours = inject.call_and_close("ioctl", (tdev, k.USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK), take)
        if fd < 0:
            raise PermissionDenied(
                f"USERFAULTFD_IOC_NEW failed in process {proc.pid}: {os.strerror(-fd)}"
            )
        return ours
    finally:
        os.close(dev)
        for tfd in opened:
            inject.disown(tfd)
            inject("close", tfd)
