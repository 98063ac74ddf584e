"""A real PostgreSQL cluster for tests: Debian's postgresql-15 (installed by tools/setup.sh),
its own data directory in a temporary dir, listening on 127.0.0.1 at a free port and on a
socket in that dir, run as the ``postgres`` user, stopped (immediate) on close."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bin() -> Path | None:
    """The directory of the newest installed PostgreSQL server binaries, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def available() -> str | None:
    """Why a cluster cannot be started here (None if it can)."""
    if pg_bin() is None or not (pg_bin() / "pgbench").exists():
        return "PostgreSQL server and pgbench not installed (run tools/setup.sh)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user"
    if os.geteuid() != 0:
        return "needs root (to run the server as the postgres user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """``initdb`` + ``postgres`` in a fresh temporary directory."""

    def __init__(self, shared_buffers: str = "64MB") -> None:
        self.bin = pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="snapfs-pg-"))
        os.chmod(self.dir, 0o755)
        user = pwd.getpwnam("postgres")
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.data = self.dir / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        try:
            self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                               "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"], timeout=120)
            self.log = open(self.dir / "server.log", "w")
            self.proc = subprocess.Popen(
                ["runuser", "-u", "postgres", "--", str(self.bin / "postgres"), "-D", str(self.data),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
                 "-c", f"unix_socket_directories={self.dir}", "-c", f"shared_buffers={shared_buffers}",
                 "-c", "fsync=off", "-c", "max_connections=40"],
                stdout=self.log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                 capture_output=True).returncode != 0:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {(self.dir / 'server.log').read_text()[-2000:]}")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def _as_postgres(self, argv: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                              timeout=timeout, check=True, cwd=self.dir, **kw)

    @property
    def postmaster_pid(self) -> int:
        """The postmaster (runuser's child)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def pgbench(self, *args: str, **kw) -> subprocess.CompletedProcess | subprocess.Popen:
        """Run pgbench against the cluster (``background=True``: a Popen, output piped)."""
        argv = ["runuser", "-u", "postgres", "--", str(self.bin / "pgbench"), "-h", "127.0.0.1",
                "-p", str(self.port), "-U", "postgres", *args, "postgres"]
        if kw.pop("background", False):
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.dir)
        return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True, cwd=self.dir)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.postmaster_pid, 3)  # SIGQUIT: immediate shutdown
            except (OSError, ValueError):
                self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
