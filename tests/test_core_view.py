"""The ``core`` view with real gdb on real processes: every thread's backtrace, locals and
globals at the snapshot instant, libraries found through NT_FILE, the same file through the
FUSE mount and ``snapfs cat``, a Python process, and gdb's own ``gcore`` side by side."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from snapfs.capture import CaptureOptions, capture_process, read_memory
from snapfs.fs.core import CoreView
from snapfs.store import Store
from tests.conftest import snapfs_cmd
from tests.support.fs import mounted_store, run
from tools.targets import build

pytestmark = [
    pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is installed by tools/setup.sh"),
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 register layout"),
]

FUNCTIONS = ("blocked_in_futex", "blocked_in_read", "blocked_in_nanosleep", "spin_forever", "main_wait")
LOCALS = {"blocked_in_futex": ("futex_local", 0x1111), "blocked_in_read": ("read_local", 0x2222),
          "blocked_in_nanosleep": ("sleep_local", 0x3333)}

# Per thread (by LWP): the function of every frame, and the locals the test asks for.
FRAMES_SCRIPT = textwrap.dedent("""\
    set pagination off
    python
    import gdb
    for t in sorted(gdb.selected_inferior().threads(), key=lambda t: t.ptid[1]):
        t.switch()
        f, names = gdb.newest_frame(), []
        while f is not None:
            names.append(f.name() or "??")
            if f.name() == "spin_forever":
                print("SPIN", int(f.read_var("spin_local")), int(gdb.parse_and_eval("g_counter")))
            for fn, (var, _) in %r.items():
                if f.name() == fn:
                    print("LOCAL", var, int(f.read_var(var)))
            f = f.older()
        print("FRAMES", t.ptid[1], " ".join(names))
    end
    """) % LOCALS


def gdb(exe: str, core: Path, *commands: str, script: str | None = None, tmp: Path | None = None) -> str:
    """``gdb -batch`` on a core; returns stdout + stderr."""
    argv = ["gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off",
            "-iex", "set auto-load safe-path /"]
    for c in commands:
        argv += ["-ex", c]
    if script is not None:
        path = (tmp or core.parent) / "frames.gdb"
        path.write_text(script)
        argv += ["-x", str(path)]
    res = subprocess.run(argv + [exe, str(core)], capture_output=True, text=True, timeout=300)
    return res.stdout + res.stderr


def frames(output: str) -> dict[int, list[str]]:
    """``FRAMES`` lines of :data:`FRAMES_SCRIPT`: LWP -> function names, innermost first."""
    return {int(m.group(1)): m.group(2).split() for m in re.finditer(r"^FRAMES (\d+) (.*)$", output, re.M)}


@dataclass
class Snapped:
    """A coretarget snapshotted once (module-wide), then changed."""

    exe: str
    pid: int
    tids: list[int]
    store_dir: Path
    counter_before: int
    counter_after: int
    counter_in_store: int
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        env = dict(os.environ, SNAPFS_STORE=str(self.store_dir))
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        return env


@pytest.fixture(scope="module")
def snapped(tmp_path_factory):
    exe = str(build("coretarget"))
    proc = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        ready = proc.stdout.readline()
        fields = dict(re.findall(r"(\w+)=(\S+)", ready))
        counter = int(fields["counter"], 16)
        store_dir = tmp_path_factory.mktemp("core") / "store"

        def live_counter() -> int:
            return struct.unpack("<Q", read_memory(proc.pid, counter, 8))[0]

        async def take() -> int:
            with Store.open(store_dir, create=True) as store:
                await capture_process(proc.pid, store, "snap", CaptureOptions())
                reader = store.open_snapshot("snap")
                region = next(r for r in reader.regions if r.start <= counter < r.start + r.length)
                return struct.unpack("<Q", reader.read(region.index, counter - region.start, 8))[0]

        before = live_counter()
        in_store = trio.run(take)
        after = live_counter()
        tids = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
        # Change what the test prints: gdb must show the values of the snapshot instant.
        proc.stdin.write("set 2\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok 2"
        yield Snapped(exe, proc.pid, tids, store_dir, before, after, in_store, proc)
    finally:
        proc.kill()
        proc.wait()


def check_core(s: Snapped, core: Path, tmp: Path) -> str:
    """gdb on ``core`` names every thread's function and prints the instant's values."""
    out = gdb(s.exe, core, "thread apply all bt", "print g_phase", "print g_message",
              "print g_point", "print g_counter", "info sharedlibrary", tmp=tmp)
    for fn in FUNCTIONS:
        assert fn in out, out
    assert "$1 = 1\n" in out, out  # g_phase: set to 2 after the snapshot
    assert '$2 = "phase one"' in out, out
    assert "$3 = {x = 12, y = 34}" in out, out
    counter = int(re.search(r"^\$4 = (\d+)$", out, re.M).group(1))
    assert counter == s.counter_in_store and s.counter_before <= counter <= s.counter_after
    # gdb found the C library through the dynamic linker's list (NT_FILE names the files).
    assert re.search(r"^0x[0-9a-f]+\s+0x[0-9a-f]+\s+Yes\s+\S*libc\.so\.6$", out, re.M), out
    assert "warning" not in out.lower(), out
    got = gdb(s.exe, core, script=FRAMES_SCRIPT, tmp=tmp)
    by_lwp = frames(got)
    assert sorted(by_lwp) == s.tids, got
    for fn in FUNCTIONS:
        assert sum(fn in names for names in by_lwp.values()) == 1, got
    # Registers and memory are of one instant: the busy thread's local and the global it
    # copies it into differ by at most the one store between them.
    spin, g = (int(x) for x in re.search(r"^SPIN (\d+) (\d+)$", got, re.M).groups())
    assert spin - g in (0, 1), got
    for var, value in LOCALS.values():
        assert f"LOCAL {var} {value}" in got, got
    return got


def core_from_view(s: Snapped, path: Path) -> Path:
    with Store.open(s.store_dir) as store:
        view = CoreView(store.open_snapshot("snap"))
        with open(path, "wb") as f:
            for off in range(0, view.size, 1 << 20):
                f.write(view.read(off, 1 << 20))
    return path


def test_gdb_shows_the_snapshot_instant(snapped, tmp_path):
    check_core(snapped, core_from_view(snapped, tmp_path / "core"), tmp_path)


def test_readelf_and_eu_readelf_accept_it(snapped, tmp_path):
    core = core_from_view(snapped, tmp_path / "core")
    for tool in ("readelf", "eu-readelf"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is installed by tools/setup.sh")
    res = run(["eu-readelf", "-h", "-l", "-n", str(core)], text=True)
    assert res.returncode == 0 and not res.stderr, res.stderr
    out = res.stdout
    assert "CORE (Core file)" in out
    assert out.count("PRSTATUS") == len(snapped.tids)
    assert out.count("X86_XSTATE") == len(snapped.tids)
    for note in ("PRPSINFO", "SIGINFO", "AUXV", "FILE", "FPREGSET"):
        assert note in out
    assert "fname: coretarget" in out and "libc.so.6" in out
    res = run(["readelf", "-W", "-h", "-l", "-n", str(core)], text=True)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr and "Error" not in res.stderr, res.stderr
    assert "NT_PRSTATUS" in res.stdout and "LOAD" in res.stdout


def test_snapfs_cat_gives_the_same_bytes_sparse(snapped, tmp_path):
    view_core = core_from_view(snapped, tmp_path / "view.core")
    out = tmp_path / "cat.core"
    with open(out, "wb") as f:
        res = subprocess.run(snapfs_cmd() + ["cat", "snap", "core"], stdout=f, stderr=subprocess.PIPE,
                             env=snapped.env(), timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    assert run(["cmp", str(view_core), str(out)]).returncode == 0
    st = out.stat()
    assert st.st_blocks * 512 < st.st_size // 4  # thread stacks are mostly holes
    # Through a pipe: the same bytes, zeros written out.
    res = subprocess.run(snapfs_cmd() + ["cat", "snap", "core"], capture_output=True, env=snapped.env(), timeout=300)
    assert res.stdout == view_core.read_bytes()
    check_core(snapped, out, tmp_path)


@pytest.mark.fuse
def test_gdb_on_the_mount(snapped, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted_store(mnt, snapped.env(), tmp_path / "mount.log"):
        core = mnt / "snap" / "core"
        info = (mnt / "snap" / "info.json").read_text()
        assert f'"open": "gdb {snapped.exe} core"' in info
        expected = core_from_view(snapped, tmp_path / "view.core")
        st = core.stat()
        assert st.st_size == expected.stat().st_size and st.st_blocks * 512 < st.st_size // 4
        check_core(snapped, core, tmp_path)
        assert run(["cmp", str(core), str(expected)]).returncode == 0


def test_gcore_of_the_same_target_has_the_same_threads_and_frames(snapped, tmp_path):
    ours = frames(gdb(snapped.exe, core_from_view(snapped, tmp_path / "core"), script=FRAMES_SCRIPT, tmp=tmp_path))
    res = run(["gcore", "-o", str(tmp_path / "gcore"), str(snapped.pid)], text=True)
    assert res.returncode == 0, res.stderr
    theirs = frames(gdb(snapped.exe, tmp_path / f"gcore.{snapped.pid}", script=FRAMES_SCRIPT, tmp=tmp_path))
    assert ours == theirs


def _has_avx512() -> bool:
    try:
        return " avx512f " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512(), reason="needs a CPU with AVX-512")
def test_gdb_reads_the_avx512_registers(tmp_path):
    """k and zmm registers as the target set them, whatever the CPU's XSAVE layout (AMD's
    differs from the Intel one gdb 13 assumes: the view writes Intel's, no "too small")."""
    exe = str(build("avx512regs"))
    proc = subprocess.Popen([exe], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")

        async def take() -> None:
            with Store.open(tmp_path / "store", create=True) as store:
                await capture_process(proc.pid, store, "avx", CaptureOptions())

        trio.run(take)
    finally:
        proc.kill()
        proc.wait()
    with Store.open(tmp_path / "store") as store:
        view = CoreView(store.open_snapshot("avx"))
        (tmp_path / "core").write_bytes(view.read(0, view.size))
    out = gdb(exe, tmp_path / "core", "info registers k1", "info registers k7", "p/x $zmm3.v8_int64",
              "p/x $zmm17.v8_int64")
    assert "warning" not in out.lower(), out
    assert re.search(r"^k1\s+0x5a5a\b", out, re.M) and re.search(r"^k7\s+0xc3\b", out, re.M), out
    for n in (3, 17):
        qwords = ", ".join(hex(int(f"{n:02d}" * 7, 16) << 8 | i) for i in range(8))
        assert f"{{{qwords}}}" in out, out


PY_TARGET = textwrap.dedent("""\
    import sys, threading, time
    def snapfs_py_sleeper():
        time.sleep(3600)
    def snapfs_py_waiter():
        print("ready", flush=True)
        sys.stdin.readline()
    threading.Thread(target=snapfs_py_sleeper, daemon=True).start()
    time.sleep(0.1)
    snapfs_py_waiter()
    """)


def snapshot_python(python: str, tmp_path: Path) -> Path:
    """A core of ``python`` running :data:`PY_TARGET` (through ``snapfs cat``)."""
    proc = subprocess.Popen([python, "-c", PY_TARGET], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        store_dir = tmp_path / "store"

        async def take() -> None:
            with Store.open(store_dir, create=True) as store:
                await capture_process(proc.pid, store, "py", CaptureOptions())

        trio.run(take)
    finally:
        proc.kill()
        proc.wait()
    core = tmp_path / "py.core"
    env = dict(os.environ, SNAPFS_STORE=str(store_dir))
    with open(core, "wb") as f:
        assert subprocess.run(snapfs_cmd() + ["cat", "py", "core"], stdout=f, env=env, timeout=300).returncode == 0
    return core


def test_python_process_c_level_backtrace(tmp_path):
    """Any CPython: the backtrace reaches the interpreter's eval loop and the sleep."""
    python = os.path.realpath(sys.executable)
    core = snapshot_python(python, tmp_path)
    out = gdb(python, core, "thread apply all bt")
    # The ELF header pages (build-ids) tell gdb the executable is the one that ran, even
    # where the command name differs from the file's ("python3" runs python3.11).
    assert "may not match" not in out, out
    assert "_PyEval_EvalFrameDefault" in out, out
    assert re.search(r"\b(pysleep|time_sleep|clock_nanosleep)\b", out), out


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3-dbg"), reason="python3-dbg is installed by tools/setup.sh")
def test_python_process_py_bt(tmp_path):
    """Debian's debug interpreter and its gdb extension: py-bt names the Python functions."""
    python = os.path.realpath("/usr/bin/python3-dbg")
    core = snapshot_python(python, tmp_path)
    out = gdb(python, core, "thread apply all py-bt")
    assert "snapfs_py_sleeper" in out and "snapfs_py_waiter" in out, out


def test_demo_opens_its_core_in_gdb(tmp_path):
    res = subprocess.run(snapfs_cmd() + ["demo", "--mib", "16", "--store", str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "shows every thread at the snapshot instant" in out, out
    assert re.search(r"^  #0 ", out, re.M) and re.search(r"^  #1 ", out, re.M), out
    assert re.search(r"^  gdb \S+ /tmp/snaps/demo-\S+/core -batch -ex 'thread apply all bt'$", out, re.M), out
