"""`snapfs incoming --pid` on a real server: Debian's redis-server (in-memory, no persistence,
bound to 127.0.0.1 on a free port, its own directory), snapshot and restored through the
stream path (`snapfs cat NAME vmstate | snapfs incoming --pid PID`).

- Snapshot under load (20 clients writing), clients gone: the fd table differs (their
  sockets are closed), so the restore is refused naming the fds, and the server is untouched.
  With --hang-up the 20 sockets are re-created as connections whose peer hung up (same fds,
  same epoll registrations): restored, the server closes them itself and serves new clients.
- Snapshot with no client connected, keys changed after: restored exactly (the keys of the
  snapshot instant), and new clients are served.
Never a crash or a hang.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from tests.conftest import snapfs_cmd

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server not installed (tools/setup.sh installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, tmp_path) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path), "--daemonize", "no",
             "--enable-debug-command", "yes", "--logfile", str(tmp_path / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        for _ in range(200):
            if self.cli("PING", check=False) == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def cli(self, *args: str, check: bool = True, timeout: float = 10) -> str:
        res = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
                             capture_output=True, text=True, timeout=timeout)
        if check:
            assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path)
    yield r
    r.close()


def snapfs(env, *args, stdin=None, timeout=300):
    return subprocess.run([*snapfs_cmd(), *args], input=stdin, env=env, capture_output=True,
                          timeout=timeout)


def test_snapshot_under_load_clients_gone_is_refused_and_server_untouched(redis, snapfs_env):
    redis.cli("SET", "phase", "before")
    load = subprocess.Popen(["redis-benchmark", "-h", "127.0.0.1", "-p", str(redis.port), "-c", "20",
                             "-n", "100000000", "-t", "set", "-r", "100000", "-d", "16", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        snap = snapfs(snapfs_env, "snapshot", str(redis.pid), "--name", "loaded")
        assert snap.returncode == 0, snap.stderr
    finally:
        load.kill()
        load.wait()
    time.sleep(0.5)  # the server has seen its clients go
    redis.cli("SET", "phase", "after")
    keys = redis.cli("DBSIZE")
    stream = snapfs(snapfs_env, "cat", "loaded", "vmstate").stdout
    res = snapfs(snapfs_env, "incoming", "--pid", str(redis.pid), stdin=stream)
    assert res.returncode == 3, res.stderr
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "refusing to restore process" in err
    assert "(socket:[" in err and "was open at the snapshot and is closed now" in err
    # Untouched: the same keys, still serving.
    assert redis.alive() and redis.cli("GET", "phase") == "after" and redis.cli("DBSIZE") == keys
    assert redis.cli("SET", "new", "1") == "OK" and redis.cli("GET", "new") == "1"

    res = snapfs(snapfs_env, "incoming", "--pid", str(redis.pid), "--hang-up", stdin=stream)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(b"re-created as a socket whose peer hung up") >= 20, res.stdout
    assert redis.alive()
    assert redis.cli("GET", "phase") == "before"  # the snapshot instant
    assert redis.cli("GET", "new") == ""
    assert redis.cli("SET", "new", "2") == "OK" and redis.cli("GET", "new") == "2"
    clients = redis.cli("CLIENT", "LIST").splitlines()
    assert len(clients) == 1, clients  # the 20 old connections are gone: only this one


def test_snapshot_then_keys_changed_is_restored_and_serves_new_clients(redis, snapfs_env):
    redis.cli("DEBUG", "POPULATE", "20000", "key", "64")
    redis.cli("SET", "phase", "before")
    digest = redis.cli("DEBUG", "DIGEST")
    snap = snapfs(snapfs_env, "snapshot", str(redis.pid), "--name", "idle")
    assert snap.returncode == 0, snap.stderr
    # After the snapshot: keys change, the heap grows, clients come and go.
    redis.cli("SET", "phase", "after")
    redis.cli("DEBUG", "POPULATE", "60000", "more", "256")
    redis.cli("DEL", "key:1", "key:2")
    assert redis.cli("DEBUG", "DIGEST") != digest
    stream = snapfs(snapfs_env, "cat", "idle", "vmstate").stdout
    dry = snapfs(snapfs_env, "incoming", "--pid", str(redis.pid), "--dry-run", stdin=stream)
    assert dry.returncode == 0 and b"would restore" in dry.stdout, dry.stdout + dry.stderr
    res = snapfs(snapfs_env, "incoming", "--pid", str(redis.pid), stdin=stream)
    assert res.returncode == 0, res.stderr
    # The keys of the snapshot instant, and new clients served.
    assert redis.alive()
    assert redis.cli("GET", "phase") == "before"
    assert redis.cli("DBSIZE") == "20001"
    assert redis.cli("DEBUG", "DIGEST") == digest
    assert redis.cli("SET", "new", "1") == "OK" and redis.cli("GET", "new") == "1"
    redis.cli("DEBUG", "POPULATE", "30000", "again", "64")  # its heap is its own again
    assert redis.cli("DBSIZE") == "50002" and redis.alive()
