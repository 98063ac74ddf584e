"""The mount daemon: checks, daemonizing with a readiness pipe, serving, clean unmount.

``mount()`` checks what it can in the calling process, then starts the daemon as a fresh
interpreter in its own session (:mod:`snapfs.fs.daemon`: never a fork of a process that may
already run threads). It waits on a pipe: the daemon writes ``OK`` once the kernel's FUSE INIT
has been answered (the mount is usable), or ``ERR <exit code> <message>``; ``mount()`` returns
or raises with that code and message. SIGTERM/SIGINT/SIGHUP end the FUSE loop and unmount.

``unmount()`` wraps ``fusermount3 -u`` and falls back to a lazy unmount when the daemon died
("Transport endpoint is not connected").
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from snapfs.errors import MountError, SnapfsError, StoreError, UsageError

log = logging.getLogger(__name__)

FSNAME = "snapfs"
READAHEAD_KIB = 4096  # kernel read-ahead for the mount: several 1 MiB FUSE requests in flight
READY_TIMEOUT = 60.0  # seconds the foreground process waits for the daemon
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _mount_entries() -> list[tuple[bytes, str, str]]:
    """``(mount point, major:minor, fstype)`` of every mount, in mount order."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(b" ")
        point = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
        out.append((point, fields[2].decode(), os.fsdecode(fields[fields.index(b"-") + 1])))
    return out


def _mount_entry(mountpoint: str) -> tuple[bytes, str, str] | None:
    target = os.fsencode(os.path.abspath(mountpoint))
    found = None
    for entry in _mount_entries():
        if entry[0] == target:
            found = entry  # the last mount on a point is the visible one
    return found


def mounted_at(mountpoint: str) -> str | None:
    """The filesystem type mounted exactly at ``mountpoint`` (from /proc/self/mountinfo), or None.

    Works for a FUSE mount whose daemon died, where ``stat`` fails with ENOTCONN.
    """
    entry = _mount_entry(mountpoint)
    return entry[2] if entry else None


def mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the filesystem mounted at ``mountpoint`` (from mountinfo, no stat)."""
    entry = _mount_entry(mountpoint)
    return entry[1] if entry else None


def raise_readahead(mountpoint: str, kib: int = READAHEAD_KIB) -> None:
    """Let the kernel send reads of up to ``kib`` KiB for this mount (default: 128 KiB).

    Larger read-ahead requests amortise the per-request cost of FUSE, the largest cost of a
    sequential read. Best effort: the setting is per mount (its backing device), root only.
    """
    device = mount_device(mountpoint)
    if device is None:
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as exc:
        log.debug("read-ahead of %s left at the default: %s", mountpoint, exc)


def check_mountpoint(mountpoint: Path, options: set[str]) -> None:
    """Raise MountError (one line, what to do) if the mount cannot work here."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse) or, in a "
                         "container, pass the device (--device /dev/fuse)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError("fusermount3 not found: install the fuse3 package")
    fstype = mounted_at(str(mountpoint))
    if fstype is not None:
        raise MountError(f"{mountpoint} is already mounted ({fstype}): unmount it first "
                         f"(snapfs umount {mountpoint})")
    if not mountpoint.exists():
        raise MountError(f"mountpoint {mountpoint} does not exist: create it (mkdir -p {mountpoint})")
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if "nonempty" not in options and any(os.scandir(mountpoint)):
        raise MountError(f"mountpoint {mountpoint} is not empty: use an empty directory")


def fuse_options(user_options: list[str], store: Path) -> set[str]:
    """The FUSE options: read-only, kernel permission checks, named ``snapfs``, plus the user's."""
    opts = {"ro", "default_permissions", f"fsname={FSNAME}:{store}", f"subtype={FSNAME}"}
    for group in user_options:
        opts.update(o.strip() for o in group.split(",") if o.strip())
    opts.discard("rw")
    return opts


def mount(store: Path, mountpoint: Path, *, foreground: bool = False,
          options: list[str] | None = None, log_file: Path | None = None) -> int:
    """Mount the store at ``mountpoint``: serve in the foreground, or return once it is usable."""
    store = store.absolute()
    mountpoint = mountpoint.absolute()
    opts = fuse_options(options or [], store)
    check_mountpoint(mountpoint, opts)
    if not store.is_dir():
        raise StoreError(f"no snapfs store at {store}: take a snapshot first (snapfs snapshot PID) "
                         "or pass --store DIR")
    if log_file is not None:
        try:
            os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        except OSError as exc:
            raise UsageError(f"cannot write the log file {log_file}: {exc.strerror}") from None
    if foreground:
        _setup_logging(log_file, foreground=True)
        return _serve(store, mountpoint, opts, ready_fd=None)
    return _daemonize(store, mountpoint, opts, log_file)


def _daemonize(store: Path, mountpoint: Path, opts: set[str], log_file: Path | None) -> int:
    """Start the daemon as a fresh interpreter; wait until it reports ready (or fails).

    A fresh interpreter rather than a fork: by now the CLI may have imported modules that
    started native threads (numpy's), and forking a threaded process is unsafe.
    """
    rfd, wfd = os.pipe()
    spec = {"store": str(store), "mountpoint": str(mountpoint), "options": sorted(opts),
            "log_file": str(log_file.absolute()) if log_file else None, "ready_fd": wfd}
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # this snapfs, wherever it runs from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snapfs.fs.daemon", json.dumps(spec)], pass_fds=(wfd,),
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd="/", env=env)
    finally:
        os.close(wfd)
    see = f": see {log_file}" if log_file else ": run with -f to see why"
    with os.fdopen(rfd, "rb") as pipe:
        if not select.select([pipe], [], [], READY_TIMEOUT)[0]:
            proc.terminate()
            raise MountError(f"the mount daemon did not become ready in {READY_TIMEOUT:.0f} s{see}")
        message = pipe.read().decode(errors="replace").strip()
    if message == "OK":
        return 0
    proc.wait(READY_TIMEOUT)
    if message.startswith("ERR "):
        _, code, text = message.split(" ", 2)
        err = SnapfsError(text)
        err.exit_code = int(code)
        raise err
    raise MountError(f"the mount daemon exited during start-up{see}")


def daemon_main(spec: dict[str, Any]) -> int:
    """The daemon process (:mod:`snapfs.fs.daemon`): logging, then serve; ``ready_fd`` is its pipe."""
    store, mountpoint = Path(spec["store"]), Path(spec["mountpoint"])
    log_file = Path(spec["log_file"]) if spec.get("log_file") else None
    opts, wfd = set(spec["options"]), int(spec["ready_fd"])
    try:  # stdin, stdout and stderr are /dev/null (set by mount())
        if log_file is not None:
            logfd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(logfd, 2)  # libfuse writes its own messages to stderr
            os.close(logfd)
        _setup_logging(log_file, foreground=False)
    except BaseException as exc:
        _report(wfd, exc)
        return 1
    try:
        return _serve(store, mountpoint, opts, ready_fd=wfd)
    except BaseException as exc:  # reported on the pipe (or logged) by _serve
        return getattr(exc, "exit_code", 1)


def _report(fd: int, exc: BaseException) -> None:
    if fd < 0:
        return
    code = getattr(exc, "exit_code", 1)
    text = str(exc).replace("\n", " ") or type(exc).__name__
    try:
        os.write(fd, f"ERR {code} {text}\n".encode())
    except OSError:
        pass  # the foreground process is gone


def _setup_logging(log_file: Path | None, *, foreground: bool) -> None:
    level = logging.DEBUG if os.environ.get("SNAPFS_DEBUG") else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if log_file is not None:
        handler: logging.Handler = logging.FileHandler(log_file)
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _serve(store_dir: Path, mountpoint: Path, opts: set[str], ready_fd: int | None) -> int:
    """Open the store, mount, and serve until unmounted or signalled."""
    fd = ready_fd if ready_fd is not None else -1

    def ready() -> None:
        nonlocal fd
        raise_readahead(str(mountpoint))
        log.info("serving %s at %s (pid %d)", store_dir, mountpoint, os.getpid())
        if fd >= 0:
            os.write(fd, b"OK\n")
            os.close(fd)
            fd = -1

    try:
        # Imported here: these start threads (numpy) and must not exist before the fork.
        import pyfuse3
        import trio

        from snapfs.fs.fuse_ops import SnapfsOperations
        from snapfs.fs.model import SnapshotFS
        from snapfs.store import Store

        store = Store.open(store_dir, create=False)
        try:
            fs = SnapshotFS(store, store_dir=store_dir)
            ops = SnapfsOperations(fs)
            try:
                pyfuse3.init(ops, str(mountpoint), opts)
            except RuntimeError as exc:
                raise MountError(f"cannot mount at {mountpoint} ({exc}): check the -o options"
                                 + ("" if os.geteuid() == 0 else " and that fusermount3 may mount here"))
            try:
                trio.run(_main_loop, ops, ready)
            finally:
                pyfuse3.close(unmount=True)
                fs.close()
        finally:
            store.close()
        log.info("unmounted %s", mountpoint)
        return 0
    except BaseException as exc:
        if fd >= 0:  # not ready yet: the waiting foreground process reports it
            _report(fd, exc)
            os.close(fd)
            fd = -1
        elif not isinstance(exc, (SnapfsError, KeyboardInterrupt)):
            log.exception("the mount daemon failed")
        raise


async def _main_loop(ops: Any, ready: Callable[[], None]) -> None:
    """Serve FUSE requests; report readiness after INIT; unmount on SIGTERM/SIGINT/SIGHUP."""
    import pyfuse3
    import trio

    async def on_signals(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()  # handlers are in place before readiness is reported
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                pyfuse3.terminate()
                return

    async def when_initialized() -> None:
        # Runs after the INIT reply reached the kernel (it is written before this task wakes),
        # so the read-ahead set here is not overridden by INIT's own setting.
        await ops.initialized.wait()
        ready()

    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        await nursery.start(on_signals)
        nursery.start_soon(when_initialized)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def unmount(mountpoint: Path) -> None:
    """Unmount a snapfs (or any FUSE) mount; lazily if its daemon is gone."""
    mp = str(mountpoint.absolute())
    fstype = mounted_at(mp)
    if fstype is None:
        raise MountError(f"{mp} is not mounted")
    if not fstype.startswith("fuse"):
        raise MountError(f"{mp} is a {fstype} mount, not snapfs: use umount")
    tool = shutil.which("fusermount3")
    if tool is None:
        raise MountError("fusermount3 not found: install the fuse3 package")
    res = subprocess.run([tool, "-u", mp], capture_output=True, text=True)
    if res.returncode == 0:
        return
    if "not connected" in res.stderr or "connection abort" in res.stderr:  # the daemon died
        res = subprocess.run([tool, "-u", "-z", mp], capture_output=True, text=True)
        if res.returncode == 0:
            return
    reason = (res.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
    if "busy" in reason:
        raise MountError(f"{mp} is busy: close the files and shells using it, then retry")
    raise MountError(f"cannot unmount {mp}: {reason}")
