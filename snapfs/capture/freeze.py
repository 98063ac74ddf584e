"""The freeze: stop every thread, get a userfaultfd for the target's mm, yield the stopped
target; leaving the block always resumes every thread and detaches.

Two entry points:

- :func:`stopped` (sync context manager): only stops and resumes every thread (no uffd);
  used where a consistent instant is enough (``snapfs incoming --pid``).
- :func:`frozen` (async context manager): stops, injects ``userfaultfd()`` (or hands a
  ``/dev/userfaultfd`` fd to the target and injects ``USERFAULTFD_IOC_NEW`` when the target
  may not create one), takes the fd with ``pidfd_getfd``, closes the target's copy, and
  yields a :class:`FrozenTarget`. What to protect is the caller's business (the engine
  pre-protects while the target runs, then re-protects only what changed).

Release is guaranteed on every path: exceptions, trio cancellation and KeyboardInterrupt
(the release runs KI-protected). If snapfs is SIGKILLed the kernel detaches the threads and,
since snapfs holds the only reference to the uffd, drops every protection.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import trio

from snapfs.capture import kernel as k
from snapfs.capture.maps import Vma, parse_maps, read_maps_text
from snapfs.capture.memory import read_memory, write_memory
from snapfs.capture.ptrace import StoppedProcess, check_target, find_syscall_insn
from snapfs.capture.uffd import Uffd
from snapfs.errors import PermissionDenied, TargetError

O_NONBLOCK = os.O_NONBLOCK
O_CLOEXEC = os.O_CLOEXEC


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[StoppedProcess]:
    """Stop every thread of ``pid`` (ptrace seize + interrupt, catching new threads); resume
    and detach them all on exit, whatever happens. Blocking: call from one thread only
    (the same thread for the whole block)."""
    check_target(pid)
    proc = StoppedProcess(pid)
    _stop_protected(proc)
    try:
        yield proc
    finally:
        _release_protected(proc)


@trio.lowlevel.enable_ki_protection
def _stop_protected(proc: StoppedProcess) -> None:
    proc.stop()


@trio.lowlevel.enable_ki_protection
def _release_protected(proc: StoppedProcess, uffd: Uffd | None = None) -> None:
    if uffd is not None:
        uffd.close()
    proc.release()


@dataclass
class FrozenTarget:
    """The stopped target as yielded by :func:`frozen`."""

    pid: int
    comm: str
    proc: StoppedProcess
    uffd: Uffd
    maps_text: str  # /proc/PID/maps at the stop (parsed on first use of ``maps``)
    threads: dict[str, dict]
    stopped_at: float  # time.monotonic() when the stop began
    resumed_at: float | None = None
    injected_ms: float = 0.0
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
async def frozen(pid: int, record: bool = True) -> AsyncIterator[FrozenTarget]:
    """Stop every thread of ``pid`` and get a userfaultfd for its memory.

    Yields a :class:`FrozenTarget`; its ``uffd`` has had no UFFDIO_API yet and stays open
    after a normal exit (the caller then owns it and must close it). On an exception or
    cancellation inside the block the uffd is closed before the threads are released. The
    block must not checkpoint for long: the target is stopped for its whole duration.
    ``record=False`` skips reading the maps and the registers (``maps``/``threads`` empty):
    the stop that only fetches the uffd before pre-protection (see :func:`frozen_again`).

    Raises TargetError (no such process, kernel thread, exited), PermissionDenied (ptrace or
    userfaultfd refused, with what to grant).
    """
    comm = check_target(pid)
    proc = StoppedProcess(pid)
    proc.syscall_insn = find_syscall_insn(pid)
    t0 = time.monotonic()
    _stop_protected(proc)
    uffd: Uffd | None = None
    ok = False
    try:
        t1 = time.monotonic()
        uffd = Uffd(take_userfaultfd(proc))
        injected_ms = (time.monotonic() - t1) * 1000.0
        target = FrozenTarget(
            pid=pid,
            comm=comm,
            proc=proc,
            uffd=uffd,
            maps_text=read_maps_text(pid) if record else "",
            threads=proc.record_threads() if record else {},
            stopped_at=t0,
            injected_ms=injected_ms,
        )
        yield target
        ok = True
    except OSError as exc:
        _raise_if_gone(pid, exc)
        raise
    finally:
        _release_protected(proc, None if ok else uffd)
        if ok:
            target.resumed_at = time.monotonic()


@contextlib.contextmanager
def frozen_again(
    pid: int, comm: str, uffd: Uffd, on_stopped: Callable[[], None] | None = None
) -> Iterator[FrozenTarget]:
    """Stop every thread of ``pid`` again, for a target whose ``uffd`` snapfs already holds
    (taken by an earlier :func:`frozen`): the snapshot instant after pre-protection.

    Yields a :class:`FrozenTarget` with fresh maps and registers; leaving the block resumes
    and detaches every thread whatever happens. The uffd is left to the caller (who closes
    it on failure, which drops every protection).

    Blocking, and every ptrace request must come from the thread that stopped the target:
    run the whole block in one worker thread, while the trio thread keeps serving write
    faults — a thread of the target faulting in kernel mode on protected memory cannot
    stop before its fault is served. ``on_stopped`` runs once every thread is stopped
    (e.g. to halt that fault server) and before the maps are read.
    """
    proc = StoppedProcess(pid)
    t0 = time.monotonic()
    target: FrozenTarget | None = None
    try:
        proc.stop()
        if on_stopped is not None:
            on_stopped()
        target = FrozenTarget(
            pid=pid,
            comm=comm,
            proc=proc,
            uffd=uffd,
            maps_text=read_maps_text(pid),
            threads=proc.record_threads(),
            stopped_at=t0,
        )
        yield target
    except OSError as exc:
        _raise_if_gone(pid, exc)
        raise
    finally:
        proc.release()
        if target is not None:
            target.resumed_at = time.monotonic()


def _raise_if_gone(pid: int, exc: OSError) -> None:
    """A ptrace request that found the target gone (ESRCH) becomes a clear TargetError."""
    if exc.errno == errno.ESRCH:
        raise TargetError(f"process {pid} exited during the snapshot") from None


def take_userfaultfd(proc: StoppedProcess) -> int:
    """Create a userfaultfd inside the stopped target and take it; the target keeps no copy.

    Tries an injected ``userfaultfd(O_CLOEXEC|O_NONBLOCK)``; if the target's credentials
    forbid it (``vm.unprivileged_userfaultfd=0``), hands it a ``/dev/userfaultfd`` fd and
    injects ``ioctl(USERFAULTFD_IOC_NEW)``.
    """
    inject = proc.injector()
    try:
        fd = inject("userfaultfd", O_CLOEXEC | O_NONBLOCK)
        if fd == -errno.EPERM or fd == -errno.EACCES:
            fd = _userfaultfd_via_dev(proc)
        elif fd < 0:
            raise TargetError(f"userfaultfd() failed in process {proc.pid}: {os.strerror(-fd)}")
        return _take_fd(proc, fd)
    finally:
        # Put the thread's own registers back at once: should snapfs die during the rest of
        # the freeze, the kernel resumes this thread exactly where it was.
        inject.restore()


def _take_fd(proc: StoppedProcess, target_fd: int) -> int:
    """pidfd_getfd the target's fd, then close it in the target."""
    inject = proc.injector()
    pidfd = k.pidfd_open(proc.pid)
    try:
        ours = k.pidfd_getfd(pidfd, target_fd)
    except OSError as exc:
        inject("close", target_fd)
        if exc.errno == errno.EPERM:
            raise PermissionDenied(
                f"pidfd_getfd refused for process {proc.pid}: run snapfs as its user or as root"
            ) from None
        raise
    finally:
        os.close(pidfd)
    inject("close", target_fd)
    os.set_blocking(ours, False)
    return ours


def _userfaultfd_via_dev(proc: StoppedProcess) -> int:
    """The /dev/userfaultfd handoff (SCM_RIGHTS over an injected socketpair)."""
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
    scratch = inject.scratch_address(256)
    saved_stack = read_memory(proc.pid, scratch, 256)
    sv0 = sv1 = tdev = -1
    try:
        r = inject("socketpair", socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0, scratch)
        if r < 0:
            raise TargetError(f"socketpair() failed in process {proc.pid}: {os.strerror(-r)}")
        sv0, sv1 = struct.unpack("<ii", read_memory(proc.pid, scratch, 8))
        pidfd = k.pidfd_open(proc.pid)
        try:
            our_end = k.pidfd_getfd(pidfd, sv1)
        finally:
            os.close(pidfd)
        with socket.socket(fileno=our_end) as s:
            s.sendmsg([b"u"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [dev]))])
        # struct msghdr + iovec + 8-byte buffer + cmsg buffer, on the dead stack.
        iov, data, cmsg = scratch + 64, scratch + 80, scratch + 96
        msghdr = struct.pack("<QI4xQQQQi4x", 0, 0, iov, 1, cmsg, 32, 0)
        write_memory(proc.pid, scratch, msghdr)
        write_memory(proc.pid, iov, struct.pack("<QQ", data, 8))
        r = inject("recvmsg", sv0, scratch, socket.MSG_CMSG_CLOEXEC)
        if r < 0:
            raise TargetError(f"recvmsg() failed in process {proc.pid}: {os.strerror(-r)}")
        _, level, typ, tdev = struct.unpack("<Qiii", read_memory(proc.pid, cmsg, 20))
        if level != socket.SOL_SOCKET or typ != socket.SCM_RIGHTS:
            raise TargetError(f"fd handoff to process {proc.pid} failed")
        fd = inject("ioctl", tdev, k.USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK)
        if fd < 0:
            raise PermissionDenied(
                f"USERFAULTFD_IOC_NEW failed in process {proc.pid}: {os.strerror(-fd)}"
            )
        return fd
    finally:
        os.close(dev)
        for tfd in (tdev, sv0, sv1):
            if tfd >= 0:
                inject("close", tfd)
        write_memory(proc.pid, scratch, saved_stack)
