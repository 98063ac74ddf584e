"""Start QEMU for tests: the test guest (or a bare ``-machine none``) with a QMP socket.

The QMP listening socket is created here and handed to QEMU as an inherited fd, so it is
ready the moment QEMU starts (no waiting for a socket file to appear).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
GUEST_RAM = 32 << 20


def accel() -> str:
    """TCG: KVM is present here but nested, and boots the guest far slower than TCG."""
    return os.environ.get("SNAPFS_TEST_ACCEL", "tcg")


class Qemu:
    """A running QEMU; ``qmp_path`` is its QMP socket, ``stop()`` kills it."""

    def __init__(self, args: list[str], qmp_path: Path, log: Path) -> None:
        self.qmp_path = qmp_path
        self.log = log
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(qmp_path))
        listener.listen(4)
        fd = listener.fileno()
        argv = [QEMU, *args, "-chardev", f"socket,id=qmp0,fd={fd},server=on,wait=off",
                "-mon", "chardev=qmp0,mode=control"]
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(argv, pass_fds=[fd], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT)
        listener.close()

    def stop(self) -> int | None:
        """Kill QEMU (if still running) and return its exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def output(self) -> str:
        """What QEMU printed so far."""
        return self.log.read_text(errors="replace")


def guest_args(kernel: Path, mem_path: Path | None = None, incoming: str | None = None,
               paused: bool = False, ram: int = GUEST_RAM) -> list[str]:
    """Machine options for the test guest; the same on source and destination of a restore.

    With ``mem_path`` guest RAM is a shared file there (readable while the guest runs).
    """
    args = ["-machine", f"pc,accel={accel()}", "-m", f"{ram >> 20}M", "-kernel", str(kernel),
            "-nodefaults", "-display", "none", "-no-user-config"]
    if mem_path is not None:
        args[1] += ",memory-backend=pc.ram"
        args += ["-object", f"memory-backend-file,id=pc.ram,size={ram},mem-path={mem_path},share=on"]
    if paused:
        args.append("-S")
    if incoming is not None:
        args += ["-incoming", incoming]
    return args


def none_args(block: str, size: int, mem_path: Path, incoming: str) -> list[str]:
    """The RAM-only restore harness: ``-machine none`` with one shared file-backed RAMBlock."""
    return ["-machine", f"none,memory-backend={block}",
            "-object", f"memory-backend-file,id={block},size={size},mem-path={mem_path},share=on",
            "-nodefaults", "-display", "none", "-no-user-config", "-S", "-incoming", incoming]
