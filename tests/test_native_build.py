"""The compiled C helpers come from the install, never from a place a user can write to.

They are cffi extension modules built when snapfs is installed (setup.py). A root snapfs
whose HOME or XDG_CACHE_HOME points at another user's directory (``sudo -E``) must not load
anything from there: helpers planted there, whose constructor would run as root, stay
unloaded, and the installed helpers still do the work. Without a compiler the install stops
with a message naming what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from snapfs.store import Store
from tests.conftest import ROOT, snapfs_cmd
from tests.test_capture_faultpath import native_counts  # noqa: F401 - a fixture
from tests.support.capture import Target, assert_released, check_oracle, region_image

NOBODY = 65534
PLANTED = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void)
{
    int fd = open(MARKER, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
        write(fd, "ran\n", 4);
        close(fd);
    }
}
"""


def _planted_home(tmp_path: Path, marker: Path) -> Path:
    """A home directory owned by another user, whose caches hold libraries under every name
    a helper was ever loaded from (the on-demand builder's ``<stem>-<digest>.so``, the
    extension modules' names), each running a constructor that writes ``marker``."""
    home = tmp_path / "home-of-nobody"
    src = tmp_path / "planted.c"
    src.write_text(PLANTED)
    so = tmp_path / "planted.so"
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(so), str(src)], check=True)
    names = ["_native.abi3.so", "_native.so"]
    for source in (ROOT / "snapfs/capture/fastfault.c", ROOT / "snapfs/store/pagehash.c"):
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        names += [f"{source.stem}-{digest}.so", f"{source.stem}.so"]
    for cache in (home / ".cache" / "snapfs", home / "xdg-cache" / "snapfs"):
        cache.mkdir(parents=True)
        for name in names:
            shutil.copy(so, cache / name)
    for path in [home, *home.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    return home


def _loaded(ld_dir: Path) -> str:
    """What the dynamic linker logged (LD_DEBUG_OUTPUT writes one file per process)."""
    return "".join(p.read_text(errors="replace") for p in sorted(ld_dir.iterdir()))


def _run(env: dict, ld_dir: Path, *args: str, stdin: bytes | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """One snapfs command with the dynamic linker's log of the files it loaded."""
    shutil.rmtree(ld_dir, ignore_errors=True)
    ld_dir.mkdir()
    run = subprocess.run([*snapfs_cmd(), *args], input=stdin, env=dict(env, LD_DEBUG_OUTPUT=str(ld_dir / "ld")),
                         capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run, _loaded(ld_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="the hole is root loading a user's library")
async def test_root_never_loads_a_helper_from_a_user_cache(tmp_path, store_dir, monkeypatch, native_counts):
    import snapfs.capture._native as capture_native
    import snapfs.store._native as store_native
    from snapfs.capture import CaptureOptions, capture_process

    marker = tmp_path / "constructor-ran"
    home = _planted_home(tmp_path, marker)
    cache = home / "xdg-cache"
    ld_dir = tmp_path / "ld"
    env = dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(cache), PYTHONPATH=str(ROOT),
               SNAPFS_STORE=str(store_dir), LD_DEBUG="files")
    env.pop("SNAPFS_NO_NATIVE", None)
    npages = 4096
    with Target("oracle", str(npages), "2", "anon", "mixed") as t:
        # Throttled, so that most pages are saved by the fault path while the target writes.
        snap, snap_log = _run(env, ld_dir, "snapshot", str(t.pid), "--name", "s1", "--rate", "32M")
        assert_released(t.pid)
        # The same in this process, to see the native loop serve the faults.
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
        monkeypatch.delenv("SNAPFS_NO_NATIVE", raising=False)
        with Store.open(store_dir) as store:
            await capture_process(t.pid, store, "s0", CaptureOptions(rate=32 << 20))
        assert native_counts and native_counts[0] > npages // 8
        assert_released(t.pid)
        assert t.proc.poll() is None
    stream, _ = _run(env, ld_dir, "cat", "s1", "vmstate")
    inc, inc_log = _run(env, ld_dir, "incoming", "--name", "s2", stdin=stream.stdout)

    assert not marker.exists(), "a library planted in another user's cache ran as root"
    for log in (snap_log, inc_log):
        assert str(home) not in log, "the dynamic linker opened a file in another user's cache"
        assert f"file={store_native.__file__} " in log
    assert f"file={capture_native.__file__} " in snap_log
    assert b"SNAPFS_NO_NATIVE" not in snap.stderr + inc.stderr
    with Store.open(store_dir) as store:
        check_oracle(region_image(store.open_snapshot("s1"), t.addr, npages), mixed=True)
    # XXH3 hashes come only from the compiled helper.
    with contextlib.closing(sqlite3.connect(f"file:{store_dir}/catalog.sqlite?mode=ro", uri=True)) as db:
        assert db.execute("SELECT DISTINCT algo FROM hashes").fetchall() == [("xxh3-64",)]
    again, _ = _run(env, ld_dir, "cat", "s2", "vmstate")
    assert again.stdout == stream.stdout.replace(b'"snapshot": "s1"', b'"snapshot": "s2"')

    # Only on request, for tests and measurements, is every fault served in Python; said.
    with Target("oracle", str(npages), "2", "anon", "mixed") as t:
        slow, _ = _run(dict(env, SNAPFS_NO_NATIVE="1"), ld_dir, "snapshot", str(t.pid), "--name", "slow")
    assert b"warning: SNAPFS_NO_NATIVE=1" in slow.stderr
    assert not marker.exists()


def test_install_without_a_compiler_stops_and_says_why(tmp_path):
    """No C compiler: the build fails with one line naming the cause and the fix (there is
    no silent fallback to slower Python paths)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "snapfs", src / "snapfs", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "-w", str(tmp_path / "wheels"), str(src)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    out = build.stdout + build.stderr
    assert build.returncode != 0, out
    assert "snapfs needs a C compiler" in out and "apt-get install gcc" in out, out
    assert not list(tmp_path.rglob("*.whl"))
