"""The target process, pinned: a pidfd taken before anything else is looked up, its identity
(start time), its address space (to notice an exec), and the lock that keeps two captures off
one process.

A PID is only a number: the process may exit and the number be reused, or it may exec a new
program, between any two steps of a capture. So a capture opens a :class:`ProcessHandle`
first; every stop then checks that the process behind the pidfd is still alive (a pidfd
becomes readable when its process exits, so a reused PID never passes) and, once an address
space was marked, that it is still the same one (:meth:`ProcessHandle.mark_mm`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select

from snapfs.errors import TargetError

PF_KTHREAD = 0x00200000


def read_stat(pid: int, tid: int | None = None) -> tuple[str, list[str]] | None:
    """(comm, fields after the comm) of /proc/PID/stat (or of thread ``tid``); None if gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def _thread_group(pid: int) -> int | None:
    """The Tgid of task ``pid`` (its process), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _live_threads(pid: int) -> bool:
    """True if a thread of ``pid`` still runs (a leader that called pthread_exit is a zombie
    while the others go on)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        stat = read_stat(pid, int(tid))
        if stat is not None and stat[1][0] not in ("Z", "X"):
            return True
    return False


def _gone(pid: int) -> TargetError:
    return TargetError(f"no process with PID {pid}: check the PID (ps -p {pid})")


class ProcessHandle:
    """A process pinned by a pidfd, with what identifies it. Close it when done."""

    def __init__(self, pid: int, pidfd: int, comm: str, start_time: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.comm = comm
        self.start_time = start_time  # clock ticks after boot (/proc/PID/stat field 22)
        self._mm: tuple[int, int] | None = None  # (fd of /proc/PID/mem, an address it maps)
        self._lock_fd = -1
        self._lock_path = ""
        self.gadgets = None  # injection gadgets found in its text (snapfs.capture.inject)
        # The main thread called pthread_exit while others run on: /proc/PID/{maps,mem,...}
        # and process_vm_readv(PID) then see no memory (they go through the main thread).
        self.leader_exited = False

    @classmethod
    def open(cls, pid: int) -> ProcessHandle:
        """Pin process ``pid``: raises TargetError (no such process, a thread id, a kernel
        thread, a zombie, snapfs itself) with a one-line message."""
        if pid <= 0:
            raise TargetError(f"bad PID {pid}: give the PID of a running process")
        if pid == os.getpid():
            raise TargetError("snapfs cannot snapshot itself: give the PID of another process")
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise _gone(pid) from None
        except OSError as exc:
            # pidfd_open refuses a thread that is not a thread-group leader.
            tgid = _thread_group(pid)
            if exc.errno in (errno.ENOENT, errno.EINVAL) and tgid not in (None, pid):
                raise TargetError(
                    f"{pid} is a thread of process {tgid}, not a process: snapshot PID {tgid} "
                    "(all its threads are captured together)"
                ) from None
            if tgid is None:
                raise _gone(pid) from None
            raise
        try:
            stat = read_stat(pid)
            if stat is None:
                raise _gone(pid)
            comm, fields = stat
            state, flags, start_time = fields[0], int(fields[6]), int(fields[19])
            if flags & PF_KTHREAD:
                raise TargetError(f"PID {pid} ({comm}) is a kernel thread: it has no user memory to snapshot")
            leader_exited = state in ("Z", "X")
            if leader_exited and not _live_threads(pid):
                raise TargetError(f"process {pid} ({comm}) has exited (zombie): nothing to snapshot")
            handle = cls(pid, pidfd, comm, start_time)
            handle.leader_exited = leader_exited
            # The stat read above belongs to the pinned process only if it still runs now.
            if not handle.alive():
                raise _gone(pid)
        except BaseException:
            os.close(pidfd)
            raise
        return handle

    # ------------------------------------------------------------ identity
    def alive(self) -> bool:
        """True while the pinned process has not exited (its pidfd is not readable)."""
        if self.pidfd < 0:
            return False
        return not select.select([self.pidfd], [], [], 0)[0]

    def check(self) -> None:
        """Raise TargetError if the pinned process exited (or its PID now names another)."""
        if not self.alive():
            raise TargetError(f"process {self.pid} exited")
        stat = read_stat(self.pid)
        if stat is None or int(stat[1][19]) != self.start_time:
            raise TargetError(f"process {self.pid} exited (its PID now names another process)")

    def mark_mm(self, addr: int, tid: int | None = None) -> None:
        """Remember the target's current address space (call while it is stopped, naming a
        live thread ``tid``); ``addr`` must be mapped in it. :meth:`mm_changed` then tells
        an exec since."""
        self.unmark_mm()
        path = f"/proc/{self.pid}/task/{tid}/mem" if tid is not None else f"/proc/{self.pid}/mem"
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._mm = (fd, addr)

    def mm_changed(self) -> bool:
        """True if the address space marked by :meth:`mark_mm` is gone (the process exec'd
        or exited): /proc/PID/mem opened then keeps that mm, and reads 0 bytes once it died."""
        if self._mm is None:
            return False
        fd, addr = self._mm
        try:
            return len(os.pread(fd, 1, addr)) == 0
        except OSError:
            return False  # alive; the address was unmapped since (EIO)

    def unmark_mm(self) -> None:
        if self._mm is not None:
            os.close(self._mm[0])
            self._mm = None

    def gone_error(self, during: str = "the snapshot") -> TargetError | None:
        """The TargetError describing why the target cannot be worked on any more (exited,
        PID reused, exec'd), or None if it is still the same process and program."""
        if not self.alive():
            return TargetError(f"process {self.pid} exited during {during}: nothing published")
        stat = read_stat(self.pid)
        if stat is None or int(stat[1][19]) != self.start_time:
            return TargetError(f"process {self.pid} exited during {during}: nothing published")
        if self.mm_changed():
            return TargetError(
                f"process {self.pid} started a new program (exec) during {during}: nothing published"
            )
        return None

    def thread_pidfd(self, tid: int) -> int:
        """A pidfd for thread ``tid`` of this process (Linux 6.9+; the process pidfd's dup
        before that). pidfd_getfd through it takes an fd from that thread's fd table."""
        try:
            return os.pidfd_open(tid, os.O_EXCL)  # PIDFD_THREAD == O_EXCL
        except OSError as exc:
            if exc.errno != errno.EINVAL or tid != self.pid:
                raise
            return os.dup(self.pidfd)

    # ------------------------------------------------------------ capture lock
    def lock_capture(self) -> None:
        """Hold the lock one capture of this process takes (an flock keyed by PID and start
        time, released when snapfs exits); TargetError if another capture holds it."""
        directory = lock_directory()
        _remove_stale_locks(directory)
        path = os.path.join(directory, f"capture-{self.pid}-{self.start_time}.lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_holder(path)
                who = f" (snapfs PID {holder})" if holder else ""
                raise TargetError(
                    f"another capture holds PID {self.pid}{who}: wait for it to finish"
                ) from None
            # The previous holder may have unlinked the file between our open and flock.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd, self._lock_path = fd, path

    def unlock_capture(self) -> None:
        if self._lock_fd >= 0:
            try:
                os.unlink(self._lock_path)  # while still holding it (see lock_capture)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1

    def close(self) -> None:
        """Release the lock, the mm mark and the pidfd."""
        self.unlock_capture()
        self.unmark_mm()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def __enter__(self) -> ProcessHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lock_directory() -> str:
    """Where capture locks live: /run/snapfs for root, the user's runtime directory (or a
    private directory under /tmp) otherwise. Created 0700 on first use."""
    if os.geteuid() == 0:
        base = "/run/snapfs"
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
        base = os.path.join(runtime, "snapfs") if os.path.isdir(runtime) else f"/tmp/snapfs-{os.geteuid()}"
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        st = os.lstat(base)
        if not os.path.isdir(base) or os.path.islink(base) or st.st_uid != os.geteuid():
            raise TargetError(f"lock directory {base} is not a directory owned by this user") from None
    return base


def _remove_stale_locks(directory: str) -> None:
    """Remove lock files of processes that are gone (a SIGKILLed snapfs cannot)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        parts = name[:-5].split("-") if name.startswith("capture-") and name.endswith(".lock") else []
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        stat = read_stat(int(parts[1]))
        if stat is not None and stat[1][19] == parts[2]:
            continue  # that process lives: its lock is someone's business
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _read_holder(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None
