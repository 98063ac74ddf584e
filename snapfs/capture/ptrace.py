"""Stopping every thread of a process with ptrace, injecting syscalls, releasing it.

All ptrace requests of one attachment must come from the same OS thread (the tracer is a
thread, not a process): :class:`StoppedProcess` is used from one thread only.
"""

from __future__ import annotations

import errno
import os
import signal

from snapfs.capture import arch
from snapfs.capture import kernel as k
from snapfs.errors import PermissionDenied, TargetError

PF_KTHREAD = 0x00200000


def check_target(pid: int) -> str:
    """Validate that ``pid`` is a live user process we may snapshot; return its comm."""
    if pid <= 0:
        raise TargetError(f"bad PID {pid}: give the PID of a running process")
    if pid == os.getpid():
        raise TargetError("snapfs cannot snapshot itself: give the PID of another process")
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"no process with PID {pid}: check the PID (ps -p {pid})") from None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    state, flags = fields[0], int(fields[6])
    if flags & PF_KTHREAD:
        raise TargetError(f"PID {pid} ({comm}) is a kernel thread: it has no user memory to snapshot")
    if state in ("Z", "X"):
        raise TargetError(f"process {pid} ({comm}) has exited (zombie): nothing to snapshot")
    return comm


def _tracer_pid(pid: int, tid: int | None = None) -> int:
    try:
        with open(f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def permission_error(pid: int, tid: int | None = None) -> PermissionDenied:
    """The PermissionDenied to raise when ptrace (or /proc access) to ``pid`` (its thread
    ``tid``) is refused."""
    tracer = _tracer_pid(pid, tid)
    if tracer and tracer != os.getpid():
        return PermissionDenied(
            f"process {pid} is already traced by PID {tracer} (a debugger?): detach it and retry"
        )
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        owner = -1
    return PermissionDenied(
        f"not permitted to ptrace process {pid} (owned by uid {owner}): run snapfs as that "
        "user or as root (ptrace access is required; check kernel.yama.ptrace_scope)"
    )


def list_tids(pid: int) -> list[int]:
    """Thread ids of ``pid`` (empty if it is gone)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _thread_exiting(pid: int, tid: int) -> bool:
    """True if thread ``tid`` of ``pid`` is gone or exiting (state Z or X)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in (b"Z", b"X")


class StoppedProcess:
    """Every thread of a process seized and stopped (PTRACE_SEIZE + PTRACE_INTERRUPT).

    :meth:`stop` stops them (looping until no new thread appears); :meth:`release` detaches
    them all, re-delivering any signal that was intercepted. Registers changed for an
    injection are restored (with syscall-restart emulation) before release.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tids: list[int] = []
        self._pending_signal: dict[int, int] = {}
        self._injector: Injector | None = None
        # Address of a `syscall` instruction, found before the stop to keep the pause short.
        self.syscall_insn: int | None = None
        # get_regsets' buffer, allocated before the stop rather than inside the pause.
        self._regset_buf = k.ffi.new("char[]", arch.REGSET_BUFFER)
        self._regset_iov = k.ffi.new("struct iovec *")

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Seize and stop every thread; raises TargetError / PermissionDenied."""
        seen: set[int] = set()
        try:
            while True:
                new = [t for t in list_tids(self.pid) if t not in seen]
                if not new:
                    break
                for tid in new:
                    seen.add(tid)
                    if self._seize(tid):
                        self.tids.append(tid)
                for tid in new:
                    if tid in self.tids:
                        self._wait_stop(tid)
        except BaseException:
            self.release()
            raise
        if self.pid not in self.tids:
            self.release()
            raise TargetError(f"process {self.pid} exited")

    def _seize(self, tid: int) -> bool:
        try:
            k.ptrace(k.PTRACE_SEIZE, tid, 0, k.PTRACE_O_TRACESYSGOOD)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                if tid == self.pid:
                    raise TargetError(f"process {self.pid} exited") from None
                return False
            if exc.errno == errno.EPERM:
                if tid != self.pid and _thread_exiting(self.pid, tid):
                    return False  # the kernel refuses EPERM, not ESRCH, for an exiting thread
                raise permission_error(self.pid, tid) from None
            raise
        try:
            k.ptrace(k.PTRACE_INTERRUPT, tid)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
        return True

    def wait(self, tid: int) -> int:
        """waitpid one thread; returns the raw status; removes threads that exited."""
        while True:
            try:
                _, status = os.waitpid(tid, k.WALL)
            except ChildProcessError:
                self._forget(tid)
                raise TargetError(f"thread {tid} of process {self.pid} exited") from None
            except InterruptedError:
                continue
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._forget(tid)
                raise TargetError(f"process {self.pid} exited during the snapshot")
            return status

    def _forget(self, tid: int) -> None:
        if tid in self.tids:
            self.tids.remove(tid)

    def _wait_stop(self, tid: int) -> None:
        """Wait for the interrupt stop; a signal-delivery stop counts too (the signal is
        kept and re-delivered on release)."""
        try:
            status = self.wait(tid)
        except TargetError:
            if tid == self.pid:
                raise
            return
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if event == 0 and sig not in (signal.SIGTRAP, signal.SIGTRAP | 0x80):
            # Signal-delivery stop: the signal is suppressed now and re-sent at release.
            self._pending_signal[tid] = sig

    # ------------------------------------------------------------ registers
    def get_regs(self, tid: int):
        """The thread's ``struct user_regs`` (a cffi object)."""
        regs = k.ffi.new("struct user_regs *")
        k.ptrace(k.PTRACE_GETREGS, tid, 0, regs)
        return regs

    def set_regs(self, tid: int, regs) -> None:
        k.ptrace(k.PTRACE_SETREGS, tid, 0, regs)

    def get_fpregs(self, tid: int) -> bytes:
        """The FXSAVE area of the thread (empty on failure)."""
        buf = k.ffi.new("char[]", arch.FPREGS_SIZE)
        try:
            k.ptrace(k.PTRACE_GETFPREGS, tid, 0, buf)
        except OSError:
            return b""
        return bytes(k.ffi.buffer(buf))

    def get_regsets(self, tid: int) -> dict[int, bytes]:
        """The thread's register sets ``arch.RECORDED_REGSETS`` (PTRACE_GETREGSET) by note
        type; one the CPU or kernel does not offer is left out."""
        buf, iov = self._regset_buf, self._regset_iov
        out = {}
        for nt in arch.RECORDED_REGSETS:
            iov.iov_base, iov.iov_len = buf, arch.REGSET_BUFFER
            try:
                k.ptrace(k.PTRACE_GETREGSET, tid, nt, iov)
            except OSError:
                continue
            out[nt] = bytes(k.ffi.buffer(buf, iov.iov_len))
        return out

    def get_siginfo(self, tid: int) -> bytes | None:
        """The siginfo of the signal ``tid`` was stopped delivering (None if not in such a stop)."""
        sig = self._pending_signal.get(tid)
        if not sig or (self._injector is not None and tid == self._injector.tid):
            return None  # an injection went through its signal-delivery stop: its siginfo is gone
        buf = k.ffi.new("char[]", k.SIGINFO_SIZE)
        try:
            k.ptrace(k.PTRACE_GETSIGINFO, tid, 0, buf)
        except OSError:
            return None
        info = bytes(k.ffi.buffer(buf))
        return info if int.from_bytes(info[:4], "little") == sig else None

    def record_threads(self) -> dict[str, dict]:
        """Every thread's state as of the stop, by tid: general registers (``regs``), the
        FXSAVE area (``fpregs``, hex), the register sets ``arch.RECORDED_REGSETS`` (``regsets``,
        bytes by note type) and, for a thread stopped while a signal was being delivered to it,
        that signal's ``siginfo`` (bytes). Only what can change is read here, inside the pause:
        thread names are read after it (:func:`snapfs.capture.coreinfo.thread_names`)."""
        out: dict[str, dict] = {}
        for tid in list(self.tids):
            if self._injector is not None and tid == self._injector.tid:
                regs = self._injector.saved
            else:
                try:
                    regs = self.get_regs(tid)
                except OSError as exc:
                    if exc.errno != errno.ESRCH or tid == self.pid:
                        raise
                    continue  # killed while stopped: it has no state to record
            regsets = self.get_regsets(tid)
            fpregs = arch.fpregs_from_regsets(regsets)  # no GETFPREGS where XSAVE holds it
            entry = {
                "regs": {name: int(getattr(regs, name)) for name in arch.REG_NAMES},
                "fpregs": (self.get_fpregs(tid) if fpregs is None else fpregs).hex(),
                "regsets": regsets,
            }
            if tid in self._pending_signal:
                siginfo = self.get_siginfo(tid)
                if siginfo:
                    entry["siginfo"] = siginfo
            out[str(tid)] = entry
        return out

    def injector(self) -> Injector:
        """The (single) syscall injector, created on first use in the main thread."""
        if self._injector is None:
            tid = self.pid if self.pid in self.tids else self.tids[0]
            self._injector = Injector(self, tid)
        return self._injector

    # -------------------------------------------------------------- release
    def release(self) -> None:
        """Restore injected registers, then detach every thread. Never raises for threads
        that are gone; safe to call twice."""
        if self._injector is not None:
            try:
                self._injector.restore()
            except OSError:
                pass
            self._injector = None
        tids, self.tids = self.tids, []
        for tid in tids:
            try:
                k.ptrace(k.PTRACE_DETACH, tid, 0, self._pending_signal.get(tid, 0))
            except OSError:
                pass
        self._pending_signal.clear()


class Injector:
    """Runs syscalls inside one stopped thread of the target, at an existing ``syscall``
    instruction of the ``[vdso]`` (no code is modified)."""

    def __init__(self, proc: StoppedProcess, tid: int) -> None:
        self.proc = proc
        self.tid = tid
        self.saved = proc.get_regs(tid)
        self.insn = proc.syscall_insn or find_syscall_insn(proc.pid)
        self._dirty = False

    def __call__(self, name: str, *args: int) -> int:
        """Run syscall ``name`` in the target; return its (signed) result, ``-errno`` on error."""
        regs = k.ffi.new("struct user_regs *")
        k.ffi.memmove(regs, self.saved, k.ffi.sizeof("struct user_regs"))
        arch.set_syscall(regs, self.insn, arch.SYS[name], args)
        self._dirty = True
        self.proc.set_regs(self.tid, regs)
        for _ in range(2):  # to syscall-entry, then to syscall-exit
            self._resume_to_syscall_stop()
        out = self.proc.get_regs(self.tid)
        return arch.syscall_result(out)

    def _resume_to_syscall_stop(self) -> None:
        sig = 0
        while True:
            k.ptrace(k.PTRACE_SYSCALL, self.tid, 0, sig)
            status = self.proc.wait(self.tid)
            stopsig = os.WSTOPSIG(status)
            if stopsig == signal.SIGTRAP | 0x80:
                return
            # A signal arrived first: hold it back and re-deliver it at release.
            if status >> 16 == 0 and stopsig != signal.SIGTRAP:
                self.proc._pending_signal[self.tid] = stopsig
            sig = 0

    def restore(self) -> None:
        """Put back the thread's registers, emulating the syscall restart it missed."""
        if not self._dirty:
            return
        regs = k.ffi.new("struct user_regs *")
        k.ffi.memmove(regs, self.saved, k.ffi.sizeof("struct user_regs"))
        arch.emulate_restart(regs)
        self.proc.set_regs(self.tid, regs)
        self._dirty = False

    def scratch_address(self, size: int) -> int:
        """Dead stack space below the red zone of the stopped thread, 16-byte aligned."""
        return (arch.sp(self.saved) - arch.RED_ZONE - size - 64) & ~0xF


def find_syscall_insn(pid: int) -> int:
    """Address of a ``syscall`` instruction in the target: in its ``[vdso]``, else in its
    first executable mappings (libc has plenty)."""
    from snapfs.capture.maps import read_maps
    from snapfs.capture.memory import read_memory

    vmas = read_maps(pid)
    candidates = [v for v in vmas if v.path == "[vdso]" and v.perms[2] == "x"]
    candidates += [v for v in vmas if v.perms[:3] == "r-x" and v.path != "[vdso]"]
    for v in candidates[:8]:
        try:
            text = read_memory(pid, v.start, min(v.length, 1 << 20))
        except OSError:
            continue
        off = text.find(arch.SYSCALL_INSN)
        if off >= 0:
            return v.start + off
    raise TargetError(f"process {pid} has no syscall instruction in executable memory: cannot inject")
