"""Running system calls inside a stopped thread of the target, safe whatever happens to
snapfs: at every step, if snapfs dies, the thread finishes on its own and resumes exactly
where it was stopped.

The danger: while a syscall is injected, the thread's registers point at the injected call;
a tracer killed then (SIGKILL, OOM) leaves the kernel to resume the thread in that state,
and the target crashes. So before any register is changed, the injector writes onto the
thread's stack, below its red zone (dead memory by the ABI, which a signal frame would
overwrite too):

- a copy of the thread's XSAVE area, as a signal frame carries it;
- twice (used alternately, so the one the thread may be running through is never
  rewritten): a chain of return addresses, then a complete ``rt_sigframe`` holding the
  thread's original registers (restart rule applied), its blocked-signal mask, and a
  pointer to that XSAVE copy.

An injected syscall then runs with rip at a `syscall; ret` gadget and rsp at a chain: when
the syscall returns, the thread `ret`s into the chain, which may close the fd the syscall
returned and fds snapfs opened in the target, then loads rax = 15 and runs `syscall` again —
rt_sigreturn, which puts back every register, the signal mask and the FPU/AVX state. snapfs
normally never lets it get that far: it stops the thread at syscall exit (PTRACE_SYSCALL),
and at the end sets the original registers itself (exact, unlike the frame for a
-ERESTART_RESTARTBLOCK syscall, which the frame makes return EINTR).

Signals are blocked in the thread (PTRACE_SETSIGMASK, after the first SETREGS, so a death
in between leaves the frame to restore the mask) while it runs injected code, and unblocked
before its registers are put back: a signal arriving meanwhile stays pending in the kernel
instead of being held by snapfs, where a kill would lose it.

What a death of snapfs can leave behind: the effects of the injected syscall that was under
way (it completes). ``userfaultfd()`` is followed in the chain by its ``close()`` when the
target's text has an `xchg %eax,%edi; ret` gadget; without it, an idle O_CLOEXEC userfaultfd
(never handshaked, so it cannot protect anything) may be left in the target if snapfs dies
during the ~0.1 ms between that syscall and the injected close.

Threads running with a user shadow stack (CET) cannot take a chain of returns: the injector
refuses them with a clear message.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from snapfs.capture import arch, threadstate
from snapfs.capture import kernel as k
from snapfs.capture.memory import read_memory, write_memory
from snapfs.errors import TargetError

if TYPE_CHECKING:
    from snapfs.capture.ptrace import StoppedProcess

T = TypeVar("T")

_SYSCALL_STOP = signal.SIGTRAP | 0x80
_FAULT_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGTRAP)
_CHAIN_WORDS = 64  # room for the longest chain (a dozen fds to close)
_TEXT_LIMIT = 32 << 20  # search at most this much of one executable mapping


# ---------------------------------------------------------------- gadgets
@dataclass
class Gadgets:
    """Addresses of the instruction sequences the injection uses (see arch.GADGETS)."""

    addr: dict[str, int]

    def __getitem__(self, name: str) -> int:
        return self.addr[name]

    def has(self, name: str) -> bool:
        return name in self.addr


def _maps_fd(task: int) -> int:
    return os.open(f"/proc/{task}/maps", os.O_RDONLY | os.O_CLOEXEC)


def _query(fd: int, addr: int, flags: int) -> tuple[int, int] | None:
    """PROCMAP_QUERY: the (start, end) of the VMA covering ``addr`` (or the next one with
    COVERING_OR_NEXT) having ``flags``; None if there is none."""
    # struct procmap_query: size, query_flags, query_addr, then vma_start and vma_end out.
    q = bytearray(struct.pack("<QQQ", k.PROCMAP_QUERY_SIZE, flags, addr).ljust(k.PROCMAP_QUERY_SIZE, b"\0"))
    try:
        k.ioctl(fd, k.PROCMAP_QUERY, k.ffi.from_buffer(q))
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # no such VMA
            return None
        raise
    return struct.unpack_from("<QQ", q, 24)


def _executable_ranges(task: int) -> list[tuple[int, int]]:
    """Readable, executable VMAs of ``task`` (PROCMAP_QUERY; /proc/TASK/maps if the kernel
    lacks it)."""
    fd = _maps_fd(task)
    try:
        out = []
        addr = 0
        flags = (k.PROCMAP_QUERY_COVERING_OR_NEXT_VMA | k.PROCMAP_QUERY_VMA_EXECUTABLE
                 | k.PROCMAP_QUERY_VMA_READABLE)
        try:
            while (vma := _query(fd, addr, flags)) is not None:
                out.append(vma)
                addr = vma[1]
            return out
        except OSError:
            pass  # ENOTTY/EINVAL: a kernel before 6.11
    finally:
        os.close(fd)
    with open(f"/proc/{task}/maps") as f:
        for line in f:
            rng, perms = line.split(None, 2)[:2]
            if perms[0] == "r" and perms[2] == "x":
                lo, hi = rng.split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def find_gadgets(pid: int, task: int | None = None) -> Gadgets:
    """Search the target's executable memory for every gadget (no code is modified),
    through thread ``task`` if given (any live thread sees the process's memory; /proc/PID
    does not once the main thread has exited). TargetError if a required one is missing."""
    task = task or pid
    found: dict[str, int] = {}
    for lo, hi in _executable_ranges(task):
        try:
            text = read_memory(task, lo, min(hi - lo, _TEXT_LIMIT))
        except OSError:
            continue
        for name, pattern in arch.GADGETS.items():
            if name not in found and (off := text.find(pattern)) >= 0:
                found[name] = lo + off
        if len(found) == len(arch.GADGETS):
            break
    missing = [n for n in arch.REQUIRED_GADGETS if n not in found]
    if missing:
        raise TargetError(
            f"process {pid} has no {' / '.join(arch.GADGETS[n].hex(' ') for n in missing)} "
            "instruction sequence in its executable memory (a static binary without libc, or "
            "a program still being loaded): snapfs cannot inject a system call into it safely"
        )
    return Gadgets(found)


def find_syscall_insn(pid: int) -> int:
    """Address of a bare ``syscall`` instruction in the target's executable memory (what a
    thread parked in ``pause()`` runs, :func:`snapfs.capture.arch.park`). TargetError if none."""
    for lo, hi in _executable_ranges(pid):
        try:
            text = read_memory(pid, lo, min(hi - lo, _TEXT_LIMIT))
        except OSError:
            continue
        if (off := text.find(arch.SYSCALL_INSN)) >= 0:
            return lo + off
    raise TargetError(f"process {pid} has no syscall instruction in executable memory: cannot inject")


def gadgets_valid(task: int, gadgets: Gadgets) -> bool:
    """True if every gadget is still there, in executable memory (check after a stop: the
    target may have exec'd or remapped since they were found)."""
    fd = _maps_fd(task)
    try:
        for name, addr in gadgets.addr.items():
            try:
                if _query(fd, addr, k.PROCMAP_QUERY_VMA_EXECUTABLE) is None:
                    return False
            except OSError:
                return False  # no PROCMAP_QUERY: search again
            pattern = arch.GADGETS[name]
            if read_memory(task, addr, len(pattern)) != pattern:
                return False
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def gadgets_for(proc: StoppedProcess, task: int) -> Gadgets:
    """The gadgets of a stopped process (seen through its thread ``task``): those found
    before the stop (on its handle) if they are still valid, else found now."""
    handle = proc.handle
    cached = handle.gadgets if handle is not None else None
    if cached is not None and gadgets_valid(task, cached):
        return cached
    found = find_gadgets(proc.pid, task)
    if handle is not None:
        handle.gadgets = found
    return found


# ---------------------------------------------------------------- which thread
def shadow_stack(pid: int, tid: int) -> bool:
    """True if thread ``tid`` runs with a user shadow stack (x86 CET)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("x86_Thread_features:"):
                    return "shstk" in line.split()
    except OSError:
        pass
    return False


def pick_thread(proc: StoppedProcess) -> int:
    """The thread to inject into: the leader, unless it waits in a call the kernel would
    restart through its restart block (nanosleep...) — should snapfs die mid-injection the
    frame could only make that call return EINTR — and another thread does not. Threads
    with a shadow stack are avoided. (Called from the tracer thread or through it.)"""
    return proc._call(_pick_thread, proc)


def _pick_thread(proc: StoppedProcess) -> int:
    from snapfs.capture.ptrace import _get_regs

    candidates = [t for t in proc.tids if not shadow_stack(proc.pid, t)] or list(proc.tids)
    for tid in candidates[:16]:
        try:
            regs = _get_regs(tid)
        except OSError:
            continue
        if not arch.in_restart_block_call(regs):
            return tid
    return candidates[0]


# ---------------------------------------------------------------- the injector
class Injector:
    """Injects syscalls into thread ``tid`` of a stopped process (see the module docstring).

    Create it through :meth:`StoppedProcess.injector`; every method may be called from any
    thread (requests run in the stop's tracer thread). ``saved`` holds the thread's
    registers as of the stop.
    """

    def __init__(self, proc: StoppedProcess, tid: int) -> None:
        from snapfs.capture.ptrace import _get_regs

        self.proc = proc
        self.tid = tid
        self.pid = proc.pid
        if shadow_stack(proc.pid, tid):
            raise TargetError(
                f"thread {tid} of process {proc.pid} runs with a shadow stack (CET): snapfs "
                "cannot inject a system call into it safely"
            )
        self.saved = _get_regs(tid)
        self.sigmask = threadstate.get_sigmask(tid)
        self.gadgets = gadgets_for(proc, tid)
        xstate = arch.signal_xstate(threadstate.get_xstate(tid))
        frame_regs = _copy_regs(self.saved)
        arch.restart_for_sigreturn(frame_regs)

        # Layout, from the red zone down: XSAVE copy (64-byte aligned), then two
        # [chain | rt_sigframe] regions, then scratch space for syscall arguments.
        top = arch.sp(self.saved) - arch.RED_ZONE
        xs = (top - len(xstate)) & ~63
        f0 = (xs - arch.RT_SIGFRAME_SIZE) & ~15
        f1 = (f0 - _CHAIN_WORDS * 8 - arch.RT_SIGFRAME_SIZE) & ~15
        self._frames = [f0, f1]
        self._scratch_top = f1 - _CHAIN_WORDS * 8 - 64
        frame = arch.sigframe(self.gadgets["syscall_ret"], frame_regs, self.sigmask, xs)
        try:
            write_memory(tid, xs, xstate)
            for f in self._frames:
                write_memory(tid, f, frame)
        except OSError as exc:
            raise TargetError(
                f"cannot write below the stack pointer of thread {tid} of process {proc.pid} "
                f"({exc.strerror}): stack too small to inject a system call"
            ) from None
        self._next = 0  # which region the next injection uses
        self._live = False  # registers changed (the thread is mid-injection)
        self._masked = False
        self.owned_fds: list[int] = []  # fds snapfs made in the target: closed by the chain

    # ------------------------------------------------------------ public (any thread)
    def __call__(self, name: str, *args: int) -> int:
        """Run syscall ``name`` in the target; return its (signed) result, ``-errno`` on
        error."""
        return self.proc._call(self._inject, name, args, None)[0]

    def call_and_close(self, name: str, args: tuple[int, ...], take: Callable[[int], T]) -> tuple[int, T | None]:
        """Run syscall ``name`` that returns a new fd; call ``take(fd)`` (e.g. pidfd_getfd)
        while the thread is stopped at syscall exit, then close the target's fd. Should
        snapfs die at any point, the chain closes it (given an `xchg` gadget). Returns
        (result, take's result or None if the syscall failed)."""
        return self.proc._call(self._inject, name, args, take)

    def own(self, fd: int) -> None:
        """Note an fd snapfs created in the target: the chain closes it if snapfs dies."""
        if self.gadgets.has("pop_rdi"):
            self.owned_fds.append(fd)

    def disown(self, fd: int) -> None:
        if fd in self.owned_fds:
            self.owned_fds.remove(fd)

    def scratch_address(self, size: int) -> int:
        """Dead stack space below the injector's frames, 16-byte aligned, for syscall
        arguments (write it with write_memory before the call)."""
        return (self._scratch_top - size) & ~0xF

    def restore(self, regs=None) -> None:
        """End the injection: unblock signals, then put back the thread's registers
        (``regs``, or the saved ones with the kernel's restart rule applied)."""
        self.proc._call(self._finish, regs)

    def finish_quietly(self) -> None:
        """:meth:`restore`, ignoring a thread that is gone or not stopped (the tracer
        thread's end then lets the chain restore it)."""
        try:
            self.proc._call(self._finish, None)
        except OSError:
            pass

    # ------------------------------------------------------------ tracer thread
    def _inject(self, name: str, args: tuple[int, ...], take: Callable[[int], Any] | None):
        close_result = take is not None and self.gadgets.has("xchg_eax_edi")
        frame = self._frames[self._next]
        self._next ^= 1
        words = arch.chain(self.gadgets.addr, close_result, tuple(self.owned_fds))
        if len(words) > _CHAIN_WORDS:
            raise TargetError("too many fds to close in the injection chain")
        start = frame - 8 * len(words)
        write_memory(self.tid, start, struct.pack(f"<{len(words)}Q", *words))
        regs = _copy_regs(self.saved)
        arch.set_syscall(regs, self.gadgets["syscall_ret"], arch.SYS[name], args)
        arch.set_stack(regs, start)
        self._live = True
        k.ptrace(k.PTRACE_SETREGS, self.tid, 0, regs)  # from here a death runs the chain
        if not self._masked:
            threadstate.block_all(self.tid)
            self._masked = True
        self._to_syscall_stop()  # entry
        self._to_syscall_stop()  # exit
        from snapfs.capture.ptrace import _get_regs

        result = arch.syscall_result(_get_regs(self.tid))
        taken = None
        if take is not None and result >= 0:
            try:
                taken = take(result)
            finally:
                if close_result:  # let the chain's close run, stop at its exit
                    self._to_syscall_stop()
                    self._to_syscall_stop()
                else:
                    self._inject_plain("close", (result,))
        return result, taken

    def _inject_plain(self, name: str, args: tuple[int, ...]) -> int:
        return self._inject(name, args, None)[0]

    def _to_syscall_stop(self) -> None:
        """Resume the thread (PTRACE_SYSCALL) until its next syscall stop."""
        group = self.proc.group
        deadline = time.monotonic() + group.timeout
        sig = 0
        while True:
            k.ptrace(k.PTRACE_SYSCALL, self.tid, 0, sig)
            group.resumed(self.tid)
            status = group.wait_stopped(self.tid, deadline)
            stopsig, event = os.WSTOPSIG(status), status >> 16
            if stopsig == _SYSCALL_STOP and event == 0:
                return
            sig = 0
            if event == 0:  # signal-delivery stop: only unblockable or synchronous signals
                if stopsig in _FAULT_SIGNALS:
                    raise TargetError(
                        f"injected code faulted in thread {self.tid} of process {self.pid} "
                        f"(signal {stopsig}): registers put back"
                    )
                sig = stopsig  # SIGSTOP and friends: let the group stop happen
            elif event == k.PTRACE_EVENT_EXEC:
                raise TargetError(f"process {self.pid} started a new program (exec) during the snapshot")
            # A group stop (event stop): resume past it (the kernel stops the thread again
            # at its detach if the process is still meant to be stopped).

    def _finish(self, regs) -> None:
        if self._masked:
            threadstate.set_sigmask(self.tid, self.sigmask)
            self._masked = False
        if self._live:
            final = _copy_regs(self.saved if regs is None else regs)
            if regs is None:
                arch.emulate_restart(final)
            k.ptrace(k.PTRACE_SETREGS, self.tid, 0, final)
            self._live = False


def _copy_regs(regs):
    out = k.ffi.new("struct user_regs *")
    k.ffi.memmove(out, regs, k.ffi.sizeof("struct user_regs"))
    return out
