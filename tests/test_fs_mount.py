"""Real FUSE mounts through the CLI: standard tools, changes while mounted, failures."""

from __future__ import annotations

import errno
import json
import os
import select
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapfs.fs.mount import mounted_at
from snapfs.store import Store
from tests.conftest import snapfs_cmd
from tests.support.fs import MARKER, PAGE, mounted_store, process_snapshot, run, write_snapshot

pytestmark = pytest.mark.fuse

LIB = "lib%2Fx%25y.so-7f0000000000"


def snapfs(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return run(snapfs_cmd() + args, env)


def daemon_pid(mnt: Path) -> int:
    """The pid of the daemon serving ``mnt`` (the process naming it that holds /dev/fuse)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        if any(os.fsencode(mnt) in arg for arg in cmd):
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/fuse":
                        return int(entry)
                except OSError:
                    pass
    raise AssertionError(f"no daemon for {mnt}")


def mount_line(mnt: Path) -> bytes:
    """The mountinfo line of ``mnt``."""
    with open("/proc/self/mountinfo", "rb") as f:
        return next(line for line in f if line.split(b" ")[4] == os.fsencode(mnt))


@dataclass
class Mounted:
    mnt: Path
    log: Path
    store: Store
    env: dict[str, str]
    app: list


@pytest.fixture
def mounted(tmp_path, store_dir, snapfs_env):
    """A store with the synthetic ``app`` snapshot, mounted by the CLI (daemon mode)."""
    store = Store.open(store_dir)
    app = process_snapshot(store)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "mount.log"
    try:
        with mounted_store(mnt, snapfs_env, log):
            yield Mounted(mnt, log, store, snapfs_env, app)
    finally:
        store.close()


def test_standard_tools(mounted, tmp_path):
    m = mounted
    snap = m.mnt / "app"
    line = mount_line(m.mnt)
    assert b"allow_other" not in line and b" ro," in line  # read-only, private by default
    ls = run(["ls", "-l", str(snap / "ramblocks")]).stdout.decode()
    assert "heap" in ls and LIB in ls and "stack" in ls
    assert sorted(os.listdir(snap)) == ["core", "info.json", "mem", "ramblocks", "vmstate"]
    # cat / cmp against the bytes written
    heap_expected = tmp_path / "heap.expected"
    heap_expected.write_bytes(m.app[0].data)
    assert run(["cmp", str(snap / "ramblocks/heap/data"), str(heap_expected)]).returncode == 0
    assert run(["cat", str(snap / "ramblocks/anon-7f0000008000/data")]).stdout == m.app[2].data
    # dd at a virtual address through mem
    stack = m.app[3]
    dd = run(["dd", f"if={snap / 'mem'}", "bs=4096", f"skip={stack.start // PAGE + 5}", "count=1",
              "status=none"])
    assert dd.stdout == stack.data[5 * PAGE : 6 * PAGE]
    assert dd.stdout.startswith(MARKER)
    # strings | grep for the marker
    strings = run(["strings", str(snap / "ramblocks" / LIB / "data")]).stdout
    assert MARKER in strings
    assert run(["grep", "-c", MARKER.decode(), str(snap / "ramblocks/stack/data")]).stdout.strip() == b"1"
    # du / stat: sparse sizes
    data = snap / "ramblocks/heap/data"
    assert run(["stat", "-c", "%s %b %B", str(data)]).stdout.split() == [b"262144", b"352", b"512"]
    assert run(["du", "-B1", "--apparent-size", str(data)]).stdout.split()[0] == b"262144"
    assert run(["du", "-B1", str(data)]).stdout.split()[0] == str(44 * PAGE).encode()
    # find lists the whole layout
    found = run(["find", str(snap), "-type", "f"]).stdout.decode().split()
    assert {str(snap / f"ramblocks/{b}/{f}") for b in ("heap", LIB, "stack") for f in ("data", "info.json")} <= set(found)
    assert str(snap / "mem") in found
    # cp --sparse=always keeps holes
    copy = tmp_path / "lib.copy"
    assert run(["cp", "--sparse=always", str(snap / "ramblocks" / LIB / "data"), str(copy)]).returncode == 0
    assert copy.read_bytes() == m.app[1].data
    assert copy.stat().st_blocks * 512 <= 2 * PAGE
    # info.json parses; extents list the only data page
    doc = json.loads((snap / "ramblocks" / LIB / "info.json").read_text())
    assert doc["data_extents"] == [[3 * PAGE, PAGE]]
    # statfs is meaningful
    st = os.statvfs(m.mnt)
    assert st.f_blocks * st.f_frsize >= m.store.info("app").stored_bytes and st.f_bavail == 0


def test_read_only(mounted):
    snap = mounted.mnt / "app"
    with pytest.raises(OSError) as exc:
        open(snap / "ramblocks/heap/data", "r+b")
    assert exc.value.errno == errno.EROFS
    for action in (lambda: (snap / "new").write_text("x"), lambda: (snap / "d").mkdir(),
                   lambda: (snap / "info.json").unlink(), lambda: os.rename(snap, mounted.mnt / "x")):
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno == errno.EROFS


def test_snapshots_appear_and_disappear(mounted):
    m = mounted
    assert os.listdir(m.mnt) == ["app"]
    process_snapshot(m.store, "later", seed=9)
    assert sorted(os.listdir(m.mnt)) == ["app", "later"]
    assert (m.mnt / "later/ramblocks/heap/data").stat().st_size == 64 * PAGE
    with open(m.mnt / "app/ramblocks/stack/data", "rb") as held:
        assert held.read(100) == m.app[3].data[:100]
        res = snapfs(["rm", "app"], m.env)
        assert res.returncode == 0, res.stderr.decode()
        assert os.listdir(m.mnt) == ["later"]
        assert not (m.mnt / "app").exists()


def test_corrupt_frame_gives_eio_and_the_mount_stays_up(mounted, store_dir):
    m = mounted
    segment = sorted((store_dir / "segments").iterdir())[0]
    with open(segment, "r+b") as f:
        f.seek(segment.stat().st_size // 2)
        chunk = f.read(64)
        f.seek(-64, 1)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(OSError) as exc:
        (m.mnt / "app/ramblocks/anon-7f0000008000/data").read_bytes()
    assert exc.value.errno == errno.EIO
    assert (m.mnt / "app/ramblocks/stack/data").read_bytes() == m.app[3].data
    assert "damaged frame" in m.log.read_text()


def test_concurrent_readers_while_a_capture_commits(mounted):
    m = mounted
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(path: Path, expected: bytes) -> None:
        try:
            while not stop.is_set():
                with open(path, "rb") as f:
                    assert f.read() == expected
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(m.mnt / "app/ramblocks" / r / "data", m.app[i].data))
               for i, r in [(0, "heap"), (2, "anon-7f0000008000"), (3, "stack"), (2, "anon-7f0000008000")]]
    for t in threads:
        t.start()
    try:
        for i in range(3):
            process_snapshot(m.store, f"during-{i}", seed=20 + i)
            assert f"during-{i}" in os.listdir(m.mnt)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert (m.mnt / "during-2/ramblocks/heap/data").stat().st_blocks == 44 * PAGE // 512


def test_umount_after_the_daemon_was_killed(mounted):
    m = mounted
    os.kill(daemon_pid(m.mnt), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.listdir(m.mnt)
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # 6.x kernels: the latter
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    res = snapfs(["umount", str(m.mnt)], m.env)
    assert res.returncode == 0, res.stderr.decode()
    assert mounted_at(str(m.mnt)) is None


def test_sigterm_unmounts(mounted):
    pid = daemon_pid(mounted.mnt)
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGTERM)
        assert select.select([pidfd], [], [], 20)[0], "the daemon did not exit"
    finally:
        os.close(pidfd)
    assert mounted_at(str(mounted.mnt)) is None
    assert "unmounted" in mounted.log.read_text()


def test_foreground_mount_and_sigint(tmp_path, store_dir, snapfs_env):
    with Store.open(store_dir) as store:
        write_snapshot(store, "one", [])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(snapfs_cmd() + ["mount", "-f", "-o", "allow_other", str(mnt)],
                            env=snapfs_env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while mounted_at(str(mnt)) is None:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert os.listdir(mnt) == ["one"]
        assert b"allow_other" in mount_line(mnt)  # -o reaches the kernel
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert mounted_at(str(mnt)) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted_at(str(mnt)) is not None:
            run(["fusermount3", "-u", "-z", str(mnt)])


def test_mount_errors(tmp_path, store_dir, snapfs_env, mounted):
    missing = snapfs(["mount", str(tmp_path / "nope")], snapfs_env)
    assert missing.returncode == 10 and b"does not exist" in missing.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    res = snapfs(["mount", str(full)], snapfs_env)
    assert res.returncode == 10 and b"not empty" in res.stderr
    res = snapfs(["mount", str(mounted.mnt)], snapfs_env)
    assert res.returncode == 10 and b"already mounted" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = snapfs(["mount", str(empty), "--store", str(tmp_path / "nostore")], snapfs_env)
    assert res.returncode == 5 and b"no snapfs store" in res.stderr
    notastore = tmp_path / "notastore"
    notastore.mkdir()
    (notastore / "config.json").write_text("{}")
    res = snapfs(["mount", str(empty), "--store", str(notastore)], snapfs_env)
    assert res.returncode == 5 and b"not a snapfs store" in res.stderr, res.stderr
    assert res.stderr.count(b"\n") == 1  # one line, reported by the daemon through the pipe
    assert mounted_at(str(empty)) is None
    res = snapfs(["umount", str(empty)], snapfs_env)
    assert res.returncode == 10 and b"not mounted" in res.stderr


def test_cat(store_dir, snapfs_env):
    with Store.open(store_dir) as store:
        app = process_snapshot(store)
    res = snapfs(["cat", "app", "ramblocks/anon-7f0000008000/data"], snapfs_env)
    assert res.returncode == 0 and res.stdout == app[2].data
    res = snapfs(["cat", "app", f"ramblocks/{LIB}/info.json"], snapfs_env)
    assert json.loads(res.stdout)["name"] == "lib/x%y.so-7f0000000000"
    # A closed pipe is not an error worth a message.
    res = run(["bash", "-c", "set -o pipefail; " + shlex.join(snapfs_cmd()) + " cat app mem | head -c 10 >/dev/null"],
              snapfs_env)
    assert res.returncode == 0 and res.stderr == b""
    res = snapfs(["cat", "app", "ramblocks/nope/data"], snapfs_env)
    assert res.returncode == 2 and b"no file" in res.stderr and res.stderr.count(b"\n") == 1
    res = snapfs(["cat", "nope", "mem"], snapfs_env)
    assert res.returncode == 7 and b"no snapshot named" in res.stderr
    res = snapfs(["cat", "app", "ramblocks"], snapfs_env)
    assert res.returncode == 2 and b"is a directory" in res.stderr


def test_thousand_snapshots_list_in_bounded_memory(tmp_path, store_dir, snapfs_env):
    """What listing costs is asserted in test_fs_model (one catalog query, nothing opened);
    here: the real mount lists them all and stays small after opening a hundred."""
    with Store.open(store_dir) as store:
        for i in range(1000):
            write_snapshot(store, f"s{i:04d}", [])
        process_snapshot(store, "app")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted_store(mnt, snapfs_env, tmp_path / "mount.log"):
        res = run(["ls", "-l", str(mnt)])
        assert res.stdout.decode().count("\n") == 1002  # "total" + 1001 entries
        for i in range(0, 1000, 10):  # open a hundred snapshots' metadata
            json.loads((mnt / f"s{i:04d}" / "info.json").read_text())
        status = Path(f"/proc/{daemon_pid(mnt)}/status").read_text()
        rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        assert rss_kib < 200 * 1024
