"""Standard tools against a real snapshot of a real process, through a real mount."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from tests.conftest import snapfs_cmd
from tests.support.fs import PAGE, mounted_store, run

pytestmark = pytest.mark.fuse

MARKER = b"snapfs-real-target-marker-8c1f0"
NPAGES = 256

# The target maps NPAGES private anonymous pages: 0-99 random, 100-149 never touched (holes),
# 150-199 written with zeros, 200-255 random with MARKER in page 210. It writes the bytes it
# holds to a file, prints the mapping's address, and then keeps still until stdin closes.
TARGET = textwrap.dedent(f"""
    import ctypes, mmap, os, sys
    m = mmap.mmap(-1, {NPAGES} * {PAGE}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[0:100 * {PAGE}] = os.urandom(100 * {PAGE})
    m[150 * {PAGE}:200 * {PAGE}] = bytes(50 * {PAGE})
    m[200 * {PAGE}:] = os.urandom(56 * {PAGE})
    m[210 * {PAGE} + 64:210 * {PAGE} + 64 + {len(MARKER)}] = {MARKER!r}
    with open(sys.argv[1], "wb") as f:
        f.write(m[:])
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    print(hex(addr), flush=True)
    sys.stdin.read()
""")


def snapshot(pid: int, name: str, env: dict[str, str]) -> None:
    res = run(snapfs_cmd() + ["snapshot", str(pid), "--name", name], env)
    assert res.returncode == 0, res.stderr.decode()


@pytest.fixture
def real_snapshot(tmp_path, snapfs_env):
    """A snapshot ``real`` of a live target; yields (pid, address, the bytes the target held)."""
    held = tmp_path / "held.bin"
    proc = subprocess.Popen([sys.executable, "-c", TARGET, str(held)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        addr = int(proc.stdout.readline(), 16)
        snapshot(proc.pid, "real", snapfs_env)
        assert proc.poll() is None  # the target still runs
        yield proc.pid, addr, held.read_bytes()
    finally:
        proc.stdin.close()
        proc.wait(30)


def test_standard_tools_on_a_real_snapshot(real_snapshot, tmp_path, snapfs_env):
    _, addr, held = real_snapshot
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted_store(mnt, snapfs_env, tmp_path / "mount.log"):
        snap = mnt / "real"
        # dd at the virtual address through mem, cmp against what the target held
        out = tmp_path / "dd.bin"
        res = run(["dd", f"if={snap / 'mem'}", f"of={out}", "bs=4096", f"skip={addr // PAGE}",
                   f"count={NPAGES}", "status=none"])
        assert res.returncode == 0, res.stderr
        assert run(["cmp", str(out), str(tmp_path / "held.bin")]).returncode == 0
        # the region holding the mapping: from info.json
        info = json.loads((snap / "info.json").read_text())
        assert info["pid"] and info["kind"] == "process"
        region = next(r for r in info["regions"] if r["start"] <= addr < r["end"])
        data = snap / "ramblocks" / region["entry"] / "data"
        assert data.stat().st_size == region["end"] - region["start"]
        with open(data, "rb") as f:
            f.seek(addr - region["start"])
            assert f.read(len(held)) == held
        # strings / grep find the marker the target wrote
        assert MARKER in run(["strings", str(data)]).stdout
        assert run(["grep", "-c", MARKER.decode(), str(data)]).stdout.strip() == b"1"
        # du / stat: holes and zero pages hold nothing
        st = data.stat()
        assert st.st_blocks * 512 <= st.st_size - 100 * PAGE
        du = run(["du", "-B1", str(data)]).stdout.split()[0]
        assert int(du) == st.st_blocks * 512
        # cp --sparse=always: same bytes, holes kept
        copy = tmp_path / "copy.bin"
        assert run(["cp", "--sparse=always", str(data), str(copy)]).returncode == 0
        assert run(["cmp", str(copy), str(data)]).returncode == 0
        assert copy.stat().st_blocks <= st.st_blocks + 8
        # find and ls -l see every region
        found = run(["find", str(snap / "ramblocks"), "-name", "data"]).stdout.split()
        assert len(found) == len(info["regions"]) == len(os.listdir(snap / "ramblocks"))
        listing = run(["ls", "-l", str(snap / "ramblocks")]).stdout.decode()
        assert region["entry"] in listing
        # snapfs cat gives the same bytes without the mount
        res = run(snapfs_cmd() + ["cat", "real", f"ramblocks/{region['entry']}/data"], snapfs_env)
        assert res.returncode == 0 and res.stdout == data.read_bytes()
        if (snap / "vmstate").exists():  # the same stream both ways, exactly its stated size
            res = run(snapfs_cmd() + ["cat", "real", "vmstate"], snapfs_env)
            assert res.returncode == 0
            assert len(res.stdout) == (snap / "vmstate").stat().st_size
            assert res.stdout == (snap / "vmstate").read_bytes()
            # vmstate bypasses the page cache: every read reaches the daemon, at any offset
            assert run(["cat", str(snap / "vmstate")]).stdout == res.stdout
            with open(snap / "vmstate", "rb", buffering=0) as f:
                for off, n in [(len(res.stdout) // 3, 5000), (17, 1 << 20), (len(res.stdout) - 100, 4096)]:
                    assert os.pread(f.fileno(), n, off) == res.stdout[off:off + n]


def test_readers_while_a_capture_commits(real_snapshot, tmp_path, snapfs_env):
    pid, addr, held = real_snapshot
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                with open(mnt / "real/mem", "rb") as f:
                    f.seek(addr)
                    assert f.read(len(held)) == held
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with mounted_store(mnt, snapfs_env, tmp_path / "mount.log"):
        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            snapshot(pid, "again", snapfs_env)
            assert sorted(os.listdir(mnt)) == ["again", "real"]
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors
        with open(mnt / "again/mem", "rb") as f:
            f.seek(addr)
            assert f.read(len(held)) == held
