"""Stopping processes with ptrace: seize and interrupt every thread, wait for all, release.

Every ptrace request of one stop comes from one dedicated OS thread, the :class:`Tracer`
(the kernel ties a tracee to the tracer *thread*). That thread never forks, so
``wait4(-1, __WALL | __WNOTHREAD)`` there returns the events of its tracees and nothing
else: one wait serves every thread of every process stopped together, dispatched by tid. A
dying target's threads are reaped as they exit, so no wait hangs on a leader whose exit the
kernel delays until its other (traced) threads are reaped.

Every wait is bounded and interruptible: a per-thread POSIX timer (the deadline) and
:meth:`Tracer.abort` (SIGINT, cancellation) send the tracer thread ``WAKE_SIGNAL``, whose
handler does nothing and is installed without SA_RESTART, so a blocked ``wait4`` returns
EINTR. A thread that never stops (uninterruptible sleep, a frozen cgroup) is given up after
``STOP_TIMEOUT`` with a message naming it; the tracer thread then ends, and the kernel
detaches everything it still traces, exactly as when snapfs dies.

No signal is ever held back in snapfs (where a kill would lose it): a signal-delivery stop
met while stopping is resumed at once with its signal and interrupted again, and signals are
blocked in a thread while syscalls are injected into it (:mod:`snapfs.capture.inject`).

:class:`StopGroup` stops several processes at one instant (all threads interrupted before
any wait); :class:`StoppedProcess` is one of them. Their methods may be called from any
thread: the requests run in the tracer thread (one hand-off per call).
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import queue
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from snapfs.capture import arch, threadstate
from snapfs.capture import kernel as k
from snapfs.capture.handle import ProcessHandle, read_stat
from snapfs.errors import PermissionDenied, TargetError

T = TypeVar("T")

# How long a stop waits for every thread to stop, and an injected syscall to return.
STOP_TIMEOUT = float(os.environ.get("SNAPFS_STOP_TIMEOUT", "2.0"))
# Sent to the tracer thread to interrupt a blocked wait4 (its handler is a no-op).
WAKE_SIGNAL = signal.SIGRTMIN + 5
# After the deadline (or an abort) the timer fires again at this period until the job ends:
# a signal landing just before the thread enters wait4 is then followed by another.
_REFIRE_NS = 10_000_000

SEIZE_OPTIONS = k.PTRACE_O_TRACESYSGOOD | k.PTRACE_O_TRACEEXEC
_SYSCALL_STOP = signal.SIGTRAP | 0x80
_STATE_NAMES = {
    "R": "running", "S": "sleeping", "D": "uninterruptible sleep (I/O, a frozen cgroup?)",
    "T": "stopped", "t": "traced by another tracer", "Z": "zombie", "X": "dead",
}  # fmt: skip


class Aborted(Exception):
    """Raised inside the tracer thread when the caller gave up on the current job."""


# ---------------------------------------------------------------- the tracer thread
_wake_installed = False
_wake_lock = threading.Lock()


def _install_wake_handler() -> None:
    """A do-nothing C handler for WAKE_SIGNAL, without SA_RESTART (kabi.c): it only makes a
    blocked syscall of the thread it hits return EINTR. (signal.signal would need the main
    thread and would run Python code in it on every wake-up.)"""
    global _wake_installed
    with _wake_lock:
        if not _wake_installed:
            k.check(k.lib.snapfs_wake_handler(WAKE_SIGNAL), "sigaction")
            _wake_installed = True


class _Job:
    __slots__ = ("fn", "args", "future", "aborted")

    def __init__(self, fn: Callable, args: tuple) -> None:
        self.fn = fn
        self.args = args
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.aborted: str | None = None


class Tracer:
    """The OS thread that issues every ptrace request of snapfs, and waits for its events.

    One per snapfs process (:func:`get_tracer`): fault-injection tools that count ptrace
    calls per thread (``strace -e inject=ptrace:when=N``) then see every call of a capture
    in one sequence. :meth:`call` / :meth:`acall` run a function in it; :meth:`abort` makes
    the running job's waits raise :class:`Aborted`; :meth:`retire` ends the thread after
    its current job — the kernel then detaches whatever it still traces (a thread that
    never stopped, a thread left running an injected syscall) — and the next
    :func:`get_tracer` starts a new one.
    """

    def __init__(self, name: str = "snapfs-tracer") -> None:
        _install_wake_handler()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._job: _Job | None = None
        self._lock = threading.Lock()
        self._timer = -1
        self._armed_for: float | None = None
        self.retired = False
        # tid -> the StopGroup it belongs to, for every thread seized (tracer thread only).
        self.route: dict[int, StopGroup] = {}
        # wait4's results, reused (tracer thread only); one call collects up to _WAIT_BATCH.
        self._tids = k.ffi.new("int[]", _WAIT_BATCH)
        self._statuses = k.ffi.new("int[]", _WAIT_BATCH)
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._started.wait()

    def _main(self) -> None:
        self.tid = threading.get_native_id()
        self._timer = _timer_for_thread(self.tid)
        self._started.set()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                if not job.future.set_running_or_notify_cancel():
                    continue
                with self._lock:
                    self._job = job
                try:
                    job.future.set_result(job.fn(*job.args))
                except BaseException as exc:  # handed to the caller
                    job.future.set_exception(exc)
                finally:
                    with self._lock:
                        self._job = None
                    self._disarm()
        finally:
            if self._timer >= 0:
                k.syscall("timer_delete", self._timer)
            # Ending this thread detaches every tracee it still has (kernel: exit_ptrace).

    # ------------------------------------------------------------ calling
    def in_tracer(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the tracer thread and return its result (blocking). A
        KeyboardInterrupt while waiting aborts the job, waits for it to clean up, and is
        re-raised."""
        if self.in_tracer():
            return fn(*args)
        job = self._submit(fn, args)
        try:
            return job.future.result()
        except KeyboardInterrupt:
            if job.future.done():
                raise
            self._abort_job(job, "interrupted")
            _wait_quietly(job.future)
            raise

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`call` for trio: cancellation aborts the job (which releases what it
        holds), waits for it to end, then propagates."""
        if self.in_tracer():
            return fn(*args)
        return await self._await_job(self._submit(fn, args))

    async def _await_job(self, job: _Job, then: Callable[[], None] | None = None) -> Any:
        """Wait (trio) for a queued job; cancellation aborts it, waits for it to end, and
        propagates. ``then`` runs here (the trio thread) once the job succeeded."""
        import trio

        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        job.future.add_done_callback(lambda _f: token.run_sync_soon(done.set))
        try:
            await done.wait()
        except BaseException:
            self._abort_job(job, "cancelled")
            with trio.CancelScope(shield=True):
                await done.wait()
            raise
        result = job.future.result()
        if then is not None:
            then()
        return result

    def call_cancellable(self, fn: Callable[..., T], *args: Any,
                         then_in_trio: Callable[[], None] | None = None) -> T:
        """:meth:`call`, but from a trio worker thread cancelling the trio side aborts the
        job. The job is queued at once (the tracer starts it while this thread asks the
        trio thread to wait for it: one hand-off less before it runs). ``then_in_trio``
        runs in the trio thread once the job succeeded, before this returns (from a thread
        that is not a trio worker: here, after it)."""
        import trio

        if not self.in_tracer():
            try:
                trio.from_thread.check_cancelled()
            except RuntimeError:
                pass  # not a trio worker thread
            else:
                job = self._submit(fn, args)
                return trio.from_thread.run(self._await_job, job, then_in_trio)
        result = self.call(fn, *args)
        if then_in_trio is not None:
            then_in_trio()
        return result

    def _submit(self, fn: Callable, args: tuple) -> _Job:
        if self.retired:  # a job queued behind its end would never run
            raise TargetError("snapfs let go of the target (a thread did not stop in time)")
        job = _Job(fn, args)
        self._jobs.put(job)
        return job

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future:
        """Queue ``fn(*args)`` in the tracer thread without waiting (jobs run in order)."""
        if self.in_tracer():
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(fn(*args))
            return future
        return self._submit(fn, args).future

    def abort(self, reason: str = "aborted") -> None:
        """Make the running job's waits raise Aborted (from any thread)."""
        with self._lock:
            job = self._job
        if job is not None:
            self._abort_job(job, reason)

    def _abort_job(self, job: _Job, reason: str) -> None:
        with self._lock:
            job.aborted = reason
            if self._job is not job:
                return  # not running yet: its first wait sees the flag
        _timer_set(self._timer, time.monotonic(), _REFIRE_NS)

    def retire(self) -> None:
        """End the tracer thread after its current job (from any thread): the kernel then
        detaches everything it still traces. The next get_tracer() starts a new one."""
        global _current
        with _current_lock:
            if _current is self:
                _current = None
        if not self.retired:
            self.retired = True
            self._jobs.put(None)

    def join(self) -> None:
        """Wait for a retired tracer thread to end (not from the tracer thread)."""
        if not self.in_tracer():
            self._thread.join()

    # ------------------------------------------------------------ waiting (tracer thread)
    def check_abort(self) -> None:
        job = self._job
        if job is not None and job.aborted:
            raise Aborted(job.aborted)

    def wait(self, deadline: float, abortable: bool = True, need: int = 1) -> int | None:
        """Wait for the next events of the tracees of this thread, each handed to the
        StopGroup that owns its tid, in order; returns how many (>= 1), or None once
        ``deadline`` (time.monotonic()) has passed. Up to ``need`` events are collected in
        one C call (one GIL release, not one per thread), fewer if one is not a plain
        interrupt stop (the caller acts on it first). Raises Aborted (unless not
        ``abortable``: an injection is never left half done), or ChildProcessError when
        nothing is traced any more."""
        tids, statuses = self._tids, self._statuses
        if self._armed_for != deadline:
            _timer_set(self._timer, deadline, _REFIRE_NS)
            self._armed_for = deadline
        while True:
            if abortable:
                self.check_abort()
            # Past the deadline, an event already there is still taken (the deadline may
            # have gone by in a slow request, not in waiting).
            late = time.monotonic() >= deadline
            r = k.lib.snapfs_wait4_many(tids, statuses, _WAIT_BATCH, need,
                                        k.WALL | k.WNOTHREAD | (os.WNOHANG if late else 0))
            if r == 0:
                return None
            if r > 0:
                route = self.route
                for i in range(r):
                    group = route.get(tids[i])
                    if group is not None:
                        group.dispatch(tids[i], statuses[i])
                return r
            err = -r
            if err == errno.EINTR:
                continue
            if err == errno.ECHILD:
                raise ChildProcessError(err, "no tracee left")
            raise OSError(err, f"wait4: {os.strerror(err)}")

    def reap(self) -> None:
        """Consume every status already waiting (tracer thread): threads that exited while
        traced stay zombies — and keep their process from being reaped by its parent —
        until their tracer waits for them."""
        status = k.ffi.new("int *")
        while True:
            r = k.lib.snapfs_wait4(-1, status, k.WALL | k.WNOTHREAD | os.WNOHANG)
            if r <= 0:
                if r == -errno.EINTR:
                    continue
                return
            group = self.route.get(r)
            if group is not None:
                group.dispatch(r, status[0])

    def _disarm(self) -> None:
        _timer_set(self._timer, None, 0)
        self._armed_for = None


_current: Tracer | None = None
_WAIT_BATCH = 1024  # wait4 events collected per C call at most
_current_lock = threading.Lock()


def get_tracer() -> Tracer:
    """The process's tracer thread (started on first use, or after one retired)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Tracer()
        return _current


def _wait_quietly(future: concurrent.futures.Future) -> None:
    """Wait for ``future`` to finish, letting further KeyboardInterrupts pass."""
    while True:
        try:
            future.exception()
            return
        except KeyboardInterrupt:
            continue


def _address(buf) -> int:
    return int(k.ffi.cast("uintptr_t", k.ffi.from_buffer(buf)))


def _timer_for_thread(tid: int) -> int:
    """A CLOCK_MONOTONIC timer that signals thread ``tid`` with WAKE_SIGNAL."""
    # The kernel's struct sigevent (64 bytes): value, signo, notify, then the thread id.
    ev = bytearray(struct.pack("<QiiI", 0, WAKE_SIGNAL, k.SIGEV_THREAD_ID, tid).ljust(64, b"\0"))
    out = bytearray(4)
    k.syscall("timer_create", k.CLOCK_MONOTONIC, _address(ev), _address(out))
    return struct.unpack("<i", out)[0]


def _timer_set(timer: int, at: float | None, refire_ns: int) -> None:
    """Arm ``timer`` for monotonic time ``at`` (then every ``refire_ns``), or disarm it."""
    value = interval = (0, 0)
    if at is not None:
        value = divmod(max(int(at * 1e9), 1), 1_000_000_000)
        interval = divmod(refire_ns, 1_000_000_000)
    spec = bytearray(struct.pack("<4q", *interval, *value))  # struct itimerspec
    k.syscall("timer_settime", timer, k.TIMER_ABSTIME, _address(spec), 0)


# ---------------------------------------------------------------- helpers
def check_target(pid: int) -> str:
    """Validate that ``pid`` is a live user process we may snapshot; return its comm."""
    with ProcessHandle.open(pid) as handle:
        return handle.comm


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


def find_syscall_insn(pid: int) -> int:
    """Address of a ``syscall`` instruction in the target (see snapfs.capture.inject)."""
    from snapfs.capture.inject import find_syscall_insn as find

    return find(pid)


def list_tids(pid: int) -> list[int]:
    """Thread ids of ``pid`` (empty if it is gone)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _thread_state(pid: int, tid: int) -> str | None:
    """The state letter of thread ``tid`` of ``pid`` (None if gone)."""
    stat = read_stat(pid, tid)
    return stat[1][0] if stat else None


def describe_thread(pid: int, tid: int) -> str:
    """'thread TID (comm) of process PID, state S: meaning, in WCHAN' for messages."""
    stat = read_stat(pid, tid)
    if stat is None:
        return f"thread {tid} of process {pid} (gone)"
    comm, fields = stat
    state = fields[0]
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            wchan = f.read().strip()
    except OSError:
        wchan = ""
    where = f" in {wchan}" if wchan and wchan != "0" else ""
    return f"thread {tid} ({comm}) of process {pid}, state {state}: {_STATE_NAMES.get(state, '?')}{where}"


# ---------------------------------------------------------------- stopped processes
class StoppedProcess:
    """The stopped threads of one process (a member of a :class:`StopGroup`).

    ``tids`` lists the threads stopped (the leader first when it is one of them). Register
    access and injection go through the tracer thread, from whichever thread calls.
    """

    def __init__(self, target: int | ProcessHandle, group: StopGroup | None = None) -> None:
        self.handle = target if isinstance(target, ProcessHandle) else None
        self.pid = target.pid if isinstance(target, ProcessHandle) else target
        self.group = group
        self.tids: list[int] = []
        self.exited = False
        self.execed = False
        self._injector = None
        self._recorded: list[list] = []  # raw thread records, decoded after the release

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every thread of this process alone (a group of one)."""
        if self.group is None:
            self.group = StopGroup([], timeout=timeout)
            self.group.procs.append(self)
        self.group.stop()

    @property
    def tracer(self) -> Tracer:
        assert self.group is not None and self.group.tracer is not None, "not stopped"
        return self.group.tracer

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return self.tracer.call(fn, *args)

    # ------------------------------------------------------------ registers
    def get_regs(self, tid: int):
        """The thread's ``struct user_regs`` (a cffi object)."""
        return self._call(_get_regs, tid)

    def set_regs(self, tid: int, regs) -> None:
        self._call(k.ptrace, k.PTRACE_SETREGS, tid, 0, regs)

    def get_fpregs(self, tid: int) -> bytes:
        """The FXSAVE area of the thread (empty on failure)."""
        return self._call(_get_fpregs, tid)

    def get_xstate(self, tid: int) -> bytes:
        """The thread's XSAVE area as PTRACE_GETREGSET(NT_X86_XSTATE) returns it (standard
        format; bytes 464.. hold the user xfeatures mask, XCR0)."""
        return self._call(threadstate.get_xstate, tid)

    def get_regsets(self, tid: int) -> dict[int, bytes]:
        """The thread's register sets ``arch.RECORDED_REGSETS`` (PTRACE_GETREGSET) by note
        type; one the CPU or kernel does not offer is left out."""
        return self._call(_get_regsets, tid, k.ffi.new("char[]", arch.REGSET_BUFFER))

    def get_sigmask(self, tid: int) -> int:
        """The thread's blocked-signal mask (bit N-1 = signal N)."""
        return self._call(threadstate.get_sigmask, tid)

    def set_sigmask(self, tid: int, mask: int) -> None:
        self._call(threadstate.set_sigmask, tid, mask)

    def record_threads(self, wait: bool = True, masks: dict[str, int] | None = None) -> dict[str, dict]:
        """Every stopped thread's state as of the stop, by tid: general registers (``regs``),
        the FXSAVE area (``fpregs``, hex) and the register sets ``arch.RECORDED_REGSETS``
        (``regsets``, bytes by note type). Only raw bytes are read during the stop; the
        entries are complete after the release (decoding lengthened the pause); thread names
        are read after it too (:func:`snapfs.capture.coreinfo.thread_names`). No thread is
        ever recorded in the middle of a signal delivery: the stop never holds a signal.

        ``wait=False`` queues the reads in the tracer thread and returns at once: they run
        while the caller does other work of the pause (protecting memory); the release,
        queued after them, waits for them. Every thread is read by one C call (per-thread
        Python and a GIL hand-off per request cost ~80 µs a thread).

        ``masks``, if given, also receives each thread's blocked-signal mask by tid (as
        :func:`snapfs.capture.threadstate.record_masks`), in the same call, after the
        release."""
        out: dict[str, dict] = {}
        if wait:
            self._recorded.append(self._call(self._record_threads, out, masks))
        else:
            self._recorded.append(self.tracer.submit(self._record_threads, out, masks))
        return out

    def _record_threads(self, out: dict[str, dict], masks: dict[str, int] | None) -> _RawRecord:
        """Read every thread's registers and register sets in one C call (tracer thread);
        only what must be decided during the stop is looked at here (a thread that
        vanished, an error), the rest is cut up after the release."""
        tids = list(self.tids)
        rec = _RawRecord(out, tids, _regset_size(tids), masks)
        rec.read()
        # Looked at in bulk (a Python step per thread is what this replaced): only errors
        # lead to a per-thread loop.
        n, nsets = len(tids), len(arch.RECORDED_REGSETS)
        regs_res, set_len = rec.regs_res[0:n], rec.set_len[0:n * nsets]
        inj = self._injector.tid if self._injector is not None else None
        if inj is not None:  # its registers are the ones saved before the injection
            rec.saved[inj] = bytes(k.ffi.buffer(self._injector.saved))
        if n and min(regs_res) < 0:
            for tid, r in zip(tids, regs_res):
                if r < 0 and tid != inj and (r != -errno.ESRCH or tid == self.pid):
                    raise OSError(-r, f"ptrace: {os.strerror(-r)}")
        if n and (not nsets or min(set_len) < 0):
            for i, tid in enumerate(tids):
                if (regs_res[i] >= 0 or tid == inj) and all(x < 0 for x in set_len[i * nsets:(i + 1) * nsets]):
                    rec.fpregs[tid] = _get_fpregs(tid)  # no XSAVE area to take it from
        if masks is not None and n and min(rec.mask_res[0:n]) < 0:
            for r in rec.mask_res[0:n]:
                if r < 0 and r != -errno.ESRCH:
                    raise OSError(-r, f"ptrace: {os.strerror(-r)}")
        return rec

    def _finish_records(self) -> None:
        """Decode what record_threads read. A queued recording that failed raises here."""
        recorded, self._recorded = self._recorded, []
        for rec in recorded:
            if isinstance(rec, concurrent.futures.Future):
                rec = rec.result()
            rec.decode()

    def injector(self, tid: int | None = None):
        """The syscall injector of this process (created on first use; one at a time), on
        ``tid`` or on a thread chosen for it (see :mod:`snapfs.capture.inject`)."""
        from snapfs.capture.inject import Injector, pick_thread

        if self._injector is None:
            self._injector = self._call(Injector, self, tid if tid is not None else pick_thread(self))
        return self._injector

    # ------------------------------------------------------------ release
    def release(self) -> None:
        """Put back injected registers, then detach every thread (safe to call twice). For
        a process stopped alone this releases its group."""
        group = self.group
        if group is None or group.tracer is None:
            self.tids = []
            self._injector = None
            return
        if len(group.procs) == 1:
            group.release()
            return
        group.released_at = None
        group.tracer.call(group._release_one, self)
        group.released_at = group.released_at or time.monotonic()
        self._finish_records()


class _RawRecord:
    """The registers and register sets of stopped threads as one C call read them into
    flat buffers (:func:`snapfs_ptrace_record`), decoded into ``out`` after the release."""

    def __init__(self, out: dict[str, dict], tids: list[int], set_size: int,
                 masks_out: dict[str, int] | None = None) -> None:
        n, notes = len(tids), arch.RECORDED_REGSETS
        self.out, self.tids, self.set_size, self.masks_out = out, tids, set_size, masks_out
        self.saved: dict[int, bytes] = {}  # tid -> registers to record instead of its own
        self.fpregs: dict[int, bytes] = {}  # tid -> its FXSAVE area, where no regset has it
        self.regs = k.ffi.new("char[]", max(n, 1) * arch.REGS_SIZE)
        self.regs_res = k.ffi.new("int[]", max(n, 1))
        self.sets = k.ffi.new("char[]", max(n * len(notes), 1) * set_size)
        self.set_len = k.ffi.new("long[]", max(n * len(notes), 1))
        self._notes = k.ffi.new("unsigned long[]", notes or [0])
        self.masks = k.ffi.new("uint64_t[]", max(n, 1)) if masks_out is not None else k.ffi.NULL
        self.mask_res = k.ffi.new("int[]", max(n, 1)) if masks_out is not None else k.ffi.NULL

    def read(self) -> None:
        tids = self.tids
        k.lib.snapfs_ptrace_record(
            k.ffi.new("int[]", tids), len(tids), k.PTRACE_GETREGS, self.regs, arch.REGS_SIZE, self.regs_res,
            self._notes, len(arch.RECORDED_REGSETS), self.sets, self.set_size, self.set_len,
            self.masks, self.mask_res)

    def decode(self) -> None:
        notes, nregs = arch.RECORDED_REGSETS, len(arch.REG_NAMES)
        regs = k.ffi.buffer(self.regs)
        sets = k.ffi.buffer(self.sets)
        for i, tid in enumerate(self.tids):
            if self.masks_out is not None and self.mask_res[i] == 0:
                self.masks_out[str(tid)] = int(self.masks[i])
            regs_bytes = self.saved.get(tid)
            if regs_bytes is None:
                if self.regs_res[i] < 0:
                    continue  # killed while stopped: it has no state to record
                regs_bytes = regs[i * arch.REGS_SIZE:(i + 1) * arch.REGS_SIZE]
            regsets = {}
            for j, nt in enumerate(notes):
                size = self.set_len[i * len(notes) + j]
                if size >= 0:
                    at = (i * len(notes) + j) * self.set_size
                    regsets[nt] = sets[at:at + size]
            # The FXSAVE area comes out of the XSAVE area: GETFPREGS only where there is none.
            fp = self.fpregs[tid] if tid in self.fpregs else arch.fpregs_from_regsets(regsets)
            self.out[str(tid)] = {
                "regs": dict(zip(arch.REG_NAMES, struct.unpack(f"<{nregs}Q", regs_bytes))),
                "fpregs": (fp or b"").hex(),
                "regsets": regsets,
            }


_regset_sizes: dict[int, int] = {}


def _regset_size(tids: list[int]) -> int:
    """Room for each register set of ``arch.RECORDED_REGSETS``: what the kernel returns for
    one (its size is fixed at boot — the CPU's XSAVE features — so it is learnt once),
    else ``arch.REGSET_BUFFER``."""
    size = 0
    for nt in arch.RECORDED_REGSETS:
        if nt not in _regset_sizes:
            buf = k.ffi.new("char[]", arch.REGSET_BUFFER)
            for tid in tids[:4]:
                try:
                    _regset_sizes[nt] = len(_get_regset(tid, nt, buf))
                    break
                except OSError:
                    continue
        size = max(size, _regset_sizes.get(nt, arch.REGSET_BUFFER))
    return size


class StopGroup:
    """Processes stopped together: every thread of every one of them is seized and
    interrupted before any is waited for, so they all stop at (nearly) one instant.

    ``stop()`` raises TargetError / PermissionDenied (leaving nothing stopped or traced)
    when a process is gone, exec'd, or a thread does not stop within ``timeout`` seconds.
    ``group[pid]`` is the :class:`StoppedProcess` of ``pid``.
    """

    def __init__(self, targets: Iterable[int | ProcessHandle], timeout: float = STOP_TIMEOUT,
                 one_thread: bool = False) -> None:
        self.procs = [StoppedProcess(t, self) for t in targets]
        self.timeout = timeout
        # Stop one thread per process (the leader, else any live one), not all: enough to
        # inject a call whose effect belongs to the process (a userfaultfd for its mm).
        self.one_thread = one_thread
        self.tracer: Tracer | None = None
        self._owner: dict[int, StoppedProcess] = {}  # tid -> process, for every tid seized
        self._stopped: dict[int, int] = {}  # tid -> raw status of its current stop
        self._listed: set[int] = set()  # the tids in some process's tids (a list: O(n) lookups)
        self.stop_ms = 0.0
        # time.monotonic() just before the first thread of the last stop was interrupted:
        # where the target's pause begins (listing its threads, and handing the job to the
        # tracer thread, happen while it runs).
        self.interrupted_at: float | None = None
        # time.monotonic() once every thread runs again: taken in the tracer thread right
        # after the last detach (handing the result back to the caller took up to 1 ms more
        # at 256 threads, with the target already running).
        self.released_at: float | None = None

    def __getitem__(self, pid: int) -> StoppedProcess:
        return next(p for p in self.procs if p.pid == pid)

    def paused_since(self, asked_at: float) -> float:
        """When the last stop's pause began (its first interrupt), or ``asked_at`` (when
        the stop was asked for) if it interrupted nothing new."""
        return self.interrupted_at if self.interrupted_at is not None else asked_at

    def stop(self, then_in_trio: Callable[[], None] | None = None) -> None:
        """Stop every thread (blocking; from a trio worker thread it is cancellable, and
        ``then_in_trio`` runs in the trio thread once every thread is stopped: it rides on
        the hand-back, not on a hop of its own inside the pause). A stop that raises holds
        nothing."""
        self.tracer = get_tracer()
        try:
            self.tracer.call_cancellable(self._stop_in_tracer, then_in_trio=then_in_trio)
        except BaseException:
            self._let_go()
            raise

    async def astop(self) -> None:
        """:meth:`stop` for trio (cancellation releases everything and propagates)."""
        self.tracer = get_tracer()
        try:
            await self.tracer.acall(self._stop_in_tracer)
        except BaseException:
            self._let_go()
            raise

    def _let_go(self) -> None:
        """After a stop raised: detach whatever it still holds. A failed stop released it
        all already; but a cancellation that reaches the trio side's wait just as the stop
        succeeds raises there with every thread stopped, and the callers release only what
        a returned stop holds (a target left stopped until snapfs exits)."""
        if self._owner and self.tracer is not None and not self.tracer.retired:
            self.tracer.call(self._release_all)

    def release(self, decode: bool = True) -> None:
        """Detach every thread of every process (injected registers put back first), then
        complete the thread records; ``decode=False`` leaves that to :meth:`finish_records`
        (a realtime caller drops its priority first: decoding 256 threads takes ~2 ms)."""
        if self.tracer is None or not self._owner and not any(p.tids for p in self.procs):
            return
        if self.tracer.retired:  # its end detached everything it traced
            self.tracer.join()
            self._owner.clear()
            self._listed.clear()
            for p in self.procs:
                p.tids, p._injector = [], None
            return
        self.released_at = None
        self.tracer.call(self._release_all)
        self.released_at = self.released_at or time.monotonic()
        if decode:
            self.finish_records()

    def finish_records(self) -> None:
        """Complete the entries ``record_threads`` returned (decode what the pause read);
        a recording that failed raises here."""
        for p in self.procs:
            p._finish_records()

    # ------------------------------------------------------------ in the tracer thread
    def _release_all(self) -> None:
        for p in self.procs:
            self._release_one(p)

    def _release_one(self, p: StoppedProcess) -> None:
        inj, p._injector = p._injector, None
        if inj is not None:
            inj.finish_quietly()
        p.tids = []
        left = False
        mine = [tid for tid, owner in self._owner.items() if owner is p]
        res = k.ffi.new("int[]", len(mine))
        k.lib.snapfs_ptrace_detach(k.ffi.new("int[]", mine), len(mine), res)  # one C call
        self.released_at = time.monotonic()
        for tid, r in zip(mine, res):
            # ESRCH: gone, or not in a stop (never stopped, or running an injected call that
            # did not return): only the end of the tracer thread lets that go.
            if r == -errno.ESRCH and _thread_state(p.pid, tid) not in (None, "Z", "X"):
                left = True
            self._forget(tid)
        self.tracer.reap()
        if left:
            self.tracer.retire()

    def _forget(self, tid: int) -> None:
        self._owner.pop(tid, None)
        self._stopped.pop(tid, None)
        self._listed.discard(tid)
        if self.tracer is not None and self.tracer.route.get(tid) is self:
            del self.tracer.route[tid]

    def _stop_in_tracer(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        self.interrupted_at = None
        try:
            seen: set[int] = set(self._owner)  # a one-thread stop being widened
            while True:
                new: list[int] = []
                for p in self.procs:
                    if self.one_thread and self._injectable(p):
                        continue
                    tids = [t for t in _leader_first(p.pid, list_tids(p.pid)) if t not in seen]
                    if self.one_thread:
                        for tid in tids:
                            seen.add(tid)
                            if self._seize(p, [tid]):
                                new.append(tid)
                                break
                    else:
                        seen.update(tids)
                        new += self._seize(p, tids)
                if not new:
                    break
                self._await_stops(new, deadline)
                if self.one_thread and all(self._injectable(p) or p.exited or p.execed for p in self.procs):
                    break
                if not self.one_thread and all(_all_stopped(p) for p in self.procs):
                    break  # no thread appeared meanwhile: no need to list them again
            for p in self.procs:
                self._check_stopped(p)
        except BaseException:
            self._release_all()
            raise
        self.stop_ms = (time.monotonic() - t0) * 1000.0

    def _injectable(self, p: StoppedProcess) -> bool:
        """A one-thread stop holds a thread of ``p`` a call can be injected into without
        harm: one not in a -ERESTART_RESTARTBLOCK call (nanosleep, poll or a futex wait
        with a timeout), which would return EINTR if snapfs died mid-injection (the
        injection's rt_sigreturn ends the restart block). A process whose every thread is
        in one gets all of them stopped and keeps that window."""
        for tid in p.tids:
            try:
                if not arch.in_restart_block_call(_get_regs(tid)):
                    return True
            except OSError:
                continue
        return False

    def _seize(self, p: StoppedProcess, tids: list[int]) -> list[int]:
        """PTRACE_SEIZE + PTRACE_INTERRUPT each of ``tids`` (threads of ``p``), in one C
        call; returns those seized (not the threads gone or exiting meanwhile). Every thread
        seized is owned before an error is raised, so the release detaches it."""
        if not tids:
            return []
        res = k.ffi.new("int[]", len(tids))
        if self.interrupted_at is None:
            self.interrupted_at = time.monotonic()
        k.lib.snapfs_ptrace_seize(k.ffi.new("int[]", tids), len(tids), SEIZE_OPTIONS, res)
        seized: list[int] = []
        error: BaseException | None = None
        for tid, r in zip(tids, res):
            if r >= 0:
                self._owner[tid] = p
                self.tracer.route[tid] = self
                seized.append(tid)
                if r > 0 and error is None:  # the interrupt failed (not ESRCH: gone)
                    error = OSError(r, f"ptrace: {os.strerror(r)}")
            elif error is None:
                error = _seize_refused(p, tid, -r)
        if error is not None:
            raise error
        return seized

    def _await_stops(self, tids: list[int], deadline: float) -> None:
        """Handle events until each of ``tids`` is stopped or gone (or its process exec'd)."""
        owner, stopped = self._owner, self._stopped
        pending = tids
        while True:
            pending = [t for t in pending if t not in stopped and t in owner and not owner[t].execed]
            if not pending:
                return
            if self.tracer.wait(deadline, need=len(pending)) is None:
                p = owner[pending[0]]
                raise TargetError(
                    f"{describe_thread(p.pid, pending[0])} did not stop within {self.timeout:g} s: "
                    "target released, nothing captured; retry when it runs again"
                )

    def dispatch(self, tid: int, status: int) -> None:
        """Record one wait status of a thread of this group (called by Tracer.wait). A
        signal-delivery stop outside an injection is resumed at once with its signal
        (nothing is held back) and interrupted again."""
        p = self._owner.get(tid)
        if p is None:
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._forget(tid)
            if tid in p.tids:
                p.tids.remove(tid)
            if tid == p.pid:
                p.exited = True  # the leader's exit is reported last: the process is gone
            return
        if not os.WIFSTOPPED(status):
            return
        sig, event = os.WSTOPSIG(status), status >> 16
        if event == k.PTRACE_EVENT_EXEC:
            p.execed = True
        elif event == 0 and sig != _SYSCALL_STOP and (p._injector is None or p._injector.tid != tid):
            # A signal-delivery stop (a signal dequeued just as we seized): let the thread
            # take its signal now, then stop it again.
            k.ptrace(k.PTRACE_CONT, tid, 0, sig)
            k.ptrace(k.PTRACE_INTERRUPT, tid)
            return
        self._stopped[tid] = status
        if tid not in self._listed:
            self._listed.add(tid)
            if tid == p.pid:
                p.tids.insert(0, tid)
            else:
                p.tids.append(tid)

    def resumed(self, tid: int) -> None:
        """Note that ``tid`` was resumed (by an injection); its next stop is awaited."""
        self._stopped.pop(tid, None)

    def wait_stopped(self, tid: int, deadline: float) -> int:
        """Wait for the next stop of ``tid`` (tracer thread) after an injection resumed it;
        returns its raw status. TargetError if it exits or the deadline passes. Not
        abortable: cancelling snapfs mid-injection would leave the thread stopped at a
        syscall entry (where putting its registers back runs a syscall) or leave the
        injected call's fd in the target; an injected call takes microseconds, and the
        deadline still bounds it."""
        p = self._owner.get(tid)
        pid = p.pid if p is not None else tid
        while tid not in self._stopped:
            if tid not in self._owner:
                raise TargetError(f"process {pid} exited during the snapshot")
            if self.tracer.wait(deadline, abortable=False) is None:
                raise TargetError(
                    f"{describe_thread(pid, tid)} did not come back from an injected system "
                    f"call within {self.timeout:g} s: target released"
                )
        return self._stopped[tid]

    def _check_stopped(self, p: StoppedProcess) -> None:
        if p.execed:
            raise TargetError(
                f"process {p.pid} started a new program (exec) while snapfs stopped it: "
                "target released, nothing captured"
            )
        if p.exited or not _alive(p):
            raise TargetError(f"process {p.pid} exited")
        if p.handle is not None and p.handle.mm_changed():
            raise TargetError(
                f"process {p.pid} started a new program (exec) during the snapshot: "
                "target released, nothing captured"
            )
        if not p.tids:
            raise TargetError(f"process {p.pid} has no thread left to stop")


def _all_stopped(p: StoppedProcess) -> bool:
    """Every thread of ``p`` is among those stopped: the kernel's thread count (which counts
    a traced thread until its tracer reaps it) equals theirs. A thread that appeared since
    the list was read makes it larger, so it is caught by listing again; a thread we may
    not have stopped (one exiting as it was seized) makes it larger too, which only costs
    that second listing. Once every thread is stopped none can create another."""
    stat = read_stat(p.pid)
    try:
        return stat is not None and int(stat[1][17]) == len(p.tids)
    except (IndexError, ValueError):
        return False


def _seize_refused(p: StoppedProcess, tid: int, err: int) -> BaseException | None:
    """What a PTRACE_SEIZE of ``tid`` failing with ``err`` means: None for a thread gone or
    exiting (skipped), else the error to raise."""
    if err == errno.ESRCH:
        if tid == p.pid and not _alive(p):
            return TargetError(f"process {p.pid} exited")
        return None
    if err == errno.EPERM:
        # The kernel answers EPERM, not ESRCH, for a thread that is exiting; a leader that
        # called pthread_exit stays a zombie while the process lives.
        if _thread_state(p.pid, tid) in (None, "Z", "X"):
            return None
        return permission_error(p.pid, tid)
    return OSError(err, f"ptrace: {os.strerror(err)}")


def _leader_first(pid: int, tids: list[int]) -> list[int]:
    if pid in tids:
        tids.remove(pid)
        tids.insert(0, pid)
    return tids


def _alive(p: StoppedProcess) -> bool:
    """The process is alive (and, when pinned, the same one)."""
    if p.handle is not None:
        return p.handle.alive()
    return _thread_state(p.pid, p.pid) not in (None, "X")


def _get_regs(tid: int):
    regs = k.ffi.new("struct user_regs *")
    k.ptrace(k.PTRACE_GETREGS, tid, 0, regs)
    return regs


def _get_fpregs(tid: int) -> bytes:
    buf = k.ffi.new("char[]", arch.FPREGS_SIZE)
    try:
        k.ptrace(k.PTRACE_GETFPREGS, tid, 0, buf)
    except OSError:
        return b""
    return bytes(k.ffi.buffer(buf))


def _get_regset(tid: int, nt: int, buf) -> bytes:
    """Register set ``nt`` of ``tid`` (PTRACE_GETREGSET into ``buf``, REGSET_BUFFER bytes)."""
    iov = k.ffi.new("struct iovec *")
    iov.iov_base, iov.iov_len = buf, arch.REGSET_BUFFER
    k.ptrace(k.PTRACE_GETREGSET, tid, nt, iov)
    return bytes(k.ffi.buffer(buf, iov.iov_len))


def _get_regsets(tid: int, buf) -> dict[int, bytes]:
    out = {}
    for nt in arch.RECORDED_REGSETS:
        try:
            out[nt] = _get_regset(tid, nt, buf)
        except OSError:
            continue
    return out


def stop_processes(targets: Iterable[int | ProcessHandle], timeout: float = STOP_TIMEOUT) -> StopGroup:
    """Stop every thread of every target at one instant (blocking); release the returned
    group when done. Raises TargetError / PermissionDenied with nothing left stopped."""
    group = StopGroup(targets, timeout=timeout)
    group.stop()
    return group
