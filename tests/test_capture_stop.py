"""The stop under adversity: a target that dies, execs, is replaced by another process with
the same PID, or has a thread that never stops; a signal to snapfs meanwhile; a thread id
given instead of a process; two captures of one process. snapfs must never hang, never
leave the target stopped, traced or holding a userfaultfd, and say what happened in one line.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from snapfs.capture import CaptureOptions, capture_process
from snapfs.capture.freeze import stopped, stopped_group
from snapfs.errors import TargetError
from snapfs.store import Store
from tests.conftest import ROOT, snapfs_cmd
from tests.support.capture import Target, assert_released, proc_status, wait_for, wait_scanning
from tools.targets import build

pytestmark = pytest.mark.timeout(180)


def _check(t: Target, rounds: int = 2) -> None:
    """The regcheck target found nothing wrong and still makes progress."""
    for _ in range(rounds):
        reply = t.send("c")
        assert reply.startswith("ok c"), reply or f"target died: {t.proc.wait()}"


def _one_line(err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapfs: "), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _strace_snapfs(env, pid: int, inject: str, *extra: str) -> subprocess.Popen:
    """``snapfs snapshot PID`` under strace with one ptrace fault injection."""
    return subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=ptrace", "-e", f"inject=ptrace:{inject}",
         *snapfs_cmd(), "snapshot", str(pid), *extra],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


# ---------------------------------------------------------------- target dies while stopped
def test_target_killed_while_stopped_is_reaped_and_injection_fails_fast():
    """The dead target's threads are reaped (the leader's exit waits for them), and a wait
    on the leader during an injection returns instead of hanging."""
    with Target("regcheck", "spin", "3") as t:
        with stopped(t.pid) as proc:
            assert len(proc.tids) == 4
            os.kill(t.pid, signal.SIGKILL)
            time.sleep(0.2)
            t0 = time.monotonic()
            with pytest.raises((TargetError, OSError)):
                proc.injector()("getpid")
            assert time.monotonic() - t0 < 5
        # Gone for good, no zombie left. (Here snapfs's process is also the target's parent:
        # its tracer thread reaps the leader itself, so Popen sees no status, only ECHILD.)
        t.proc.wait(timeout=10)
        assert not os.path.exists(f"/proc/{t.pid}")


def _position_of(env, pid: int, request: str, tmp_path: Path) -> int:
    """The per-thread position (strace's when=) of the first ``request`` (e.g.
    PTRACE_SYSCALL) in a capture of ``pid``, from a dry run under strace."""
    log = tmp_path / "ptrace.log"
    out = subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=ptrace",
                          *snapfs_cmd(), "snapshot", str(pid)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    calls = [line.split(None, 1) for line in log.read_text().splitlines() if "ptrace(" in line]
    tid = next(t for t, rest in calls if request in rest)
    mine = [rest for t, rest in calls if t == tid]
    return next(i for i, rest in enumerate(mine, 1) if request in rest)


def test_cli_target_killed_while_snapfs_waits_for_it(snapfs_env, store_dir, tmp_path):
    """SIGKILL of a 3-thread target just after snapfs resumed its injected thread: snapfs
    waits for that thread's syscall stop, which never comes (the leader's exit is held back
    until its traced, now zombie, threads are reaped). It must say so at once, and the
    target must not stay a zombie."""
    with Target("regcheck", "spin", "2") as t:
        when = _position_of(snapfs_env, t.pid, "PTRACE_SYSCALL", tmp_path)
        snap = _strace_snapfs(snapfs_env, t.pid, f"delay_exit=800000:when={when}")
        assert wait_for(lambda: proc_status(t.pid)["TracerPid"] != "0", timeout=30)
        time.sleep(0.3)  # inside the delayed return of PTRACE_SYSCALL
        t.proc.kill()
        _, err = snap.communicate(timeout=30)
        assert snap.returncode == 3, err
        _one_line(err, "exited")
        assert t.proc.wait(timeout=10) == -signal.SIGKILL


def _uffd_features_held(pids) -> list[tuple[int, str]]:
    """(pid, features) of every userfaultfd the processes hold, from fdinfo ("API:" line)."""
    from snapfs.capture.freeze import userfaultfds

    held = []
    for pid in pids:
        for fd in userfaultfds(pid):
            try:
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                api = next(line for line in info.splitlines() if line.startswith("API:"))
                held.append((pid, api.split()[1].split(":")[1]))
            except (OSError, StopIteration):
                continue
    return held


def test_fork_during_the_one_thread_attach(snapfs_env, store_dir, tmp_path):
    """The attach stops only the injected thread; another thread forking while the target
    holds its new userfaultfd (the window stretched by strace) must not leave the capture's
    uffd to a child (it would keep the protection alive after snapfs dies): the uffd is
    taken again with every thread stopped. A child may keep the first, idle one (never
    handshaked: features 0)."""
    exe = build("forker")
    proc = subprocess.Popen([str(exe), "1000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        log = tmp_path / "ptrace.log"
        out = subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=ptrace",
                              *snapfs_cmd(), "snapshot", str(proc.pid)], env=snapfs_env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        calls = [line for line in log.read_text().splitlines() if "ptrace(" in line]
        syscall_stops = [i for i, line in enumerate(calls, 1) if "PTRACE_SYSCALL" in line]
        when = syscall_stops[2]  # resuming into the close: the uffd exists in the target
        snap = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=ptrace",
             "-e", f"inject=ptrace:delay_enter=300000:when={when}",
             *snapfs_cmd(), "snapshot", str(proc.pid), "--json"],
            env=snapfs_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        holders = []

        def watch():  # while snapfs runs: who holds a handshaked uffd of the target's mm
            while snap.poll() is None:
                kids = []
                for tid in os.listdir(f"/proc/{proc.pid}/task"):
                    try:
                        kids += Path(f"/proc/{proc.pid}/task/{tid}/children").read_text().split()
                    except OSError:
                        pass
                holders.extend(h for h in _uffd_features_held(int(k) for k in kids) if h[1] != "0")
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        out, err = snap.communicate(timeout=120)
        watcher.join()
        assert snap.returncode == 0, err
        assert holders == [], f"children held the capture's uffd: {holders[:5]}"
        assert_released(proc.pid)
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- a thread that never stops
class FrozenThread:
    """One thread of a process put in a frozen cgroup-v1 freezer group (it cannot stop for
    ptrace until thawed)."""

    ROOT = Path("/sys/fs/cgroup/freezer")

    def __init__(self, pid: int, tid: int) -> None:
        if not (self.ROOT / "tasks").exists() or os.geteuid() != 0:
            pytest.skip("needs root and the cgroup v1 freezer")
        self.dir = self.ROOT / f"snapfs-test-{os.getpid()}-{tid}"
        self.dir.mkdir()
        self.tid = tid
        (self.dir / "tasks").write_text(str(tid))
        (self.dir / "freezer.state").write_text("FROZEN")
        assert wait_for(lambda: (self.dir / "freezer.state").read_text().strip() == "FROZEN", timeout=10)

    def thaw(self) -> None:
        (self.dir / "freezer.state").write_text("THAWED")
        try:
            (self.ROOT / "tasks").write_text(str(self.tid))
        except OSError:
            pass
        self.dir.rmdir()


def _a_worker(t: Target) -> int:
    return max(int(x) for x in os.listdir(f"/proc/{t.pid}/task") if int(x) != t.pid)


def test_thread_that_never_stops_is_given_up_with_its_name(snapfs_env, store_dir):
    with Target("regcheck", "spin", "3") as t:
        tid = _a_worker(t)
        frozen = FrozenThread(t.pid, tid)
        try:
            env = dict(snapfs_env, SNAPFS_STOP_TIMEOUT="1")
            t0 = time.monotonic()
            out = subprocess.run([*snapfs_cmd(), "snapshot", str(t.pid)], env=env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
            assert time.monotonic() - t0 < 45  # snapfs start-up included: slow on a loaded machine
            assert out.returncode == 3, out.stderr
            _one_line(out.stderr, f"thread {tid}", "did not stop within 1 s", "released")
            assert_released(t.pid)
        finally:
            frozen.thaw()
        _check(t)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_a_stuck_stop_releases_the_target(snapfs_env, store_dir, sig):
    with Target("regcheck", "spin", "3") as t:
        frozen = FrozenThread(t.pid, _a_worker(t))
        try:
            env = dict(snapfs_env, SNAPFS_STOP_TIMEOUT="60")
            snap = subprocess.Popen([*snapfs_cmd(), "snapshot", str(t.pid)], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert wait_for(lambda: proc_status(t.pid)["TracerPid"] != "0", timeout=30)
            time.sleep(0.3)
            t0 = time.monotonic()
            snap.send_signal(sig)
            _, err = snap.communicate(timeout=30)
            assert time.monotonic() - t0 < 15  # far below the 60 s stop deadline
            assert snap.returncode == 130, err
            _one_line(err, "interrupted", "released")
            assert_released(t.pid)
        finally:
            frozen.thaw()
        _check(t)


# ---------------------------------------------------------------- exec and PID reuse
def _generation(pid: int) -> int:
    """How many times reexec has started again (-1 while an exec is under way)."""
    try:
        return int(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1])
    except (IndexError, ValueError):
        return -1


def test_target_that_execs_every_millisecond(snapfs_env, store_dir):
    """Every attempt ends in bounded time with a one-line answer; the target keeps running
    (never left stopped or traced), also when snapfs is SIGKILLed at random moments."""
    exe = build("reexec")
    proc = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(4):
            out = subprocess.run([*snapfs_cmd(), "snapshot", str(proc.pid)], env=snapfs_env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode in (0, 3), out.stderr
            if out.returncode:
                _one_line(out.stderr)
        rng = random.Random(13)
        for _ in range(6):
            snap = subprocess.Popen([*snapfs_cmd(), "snapshot", str(proc.pid)], env=snapfs_env,
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.2, 0.9))  # Python start-up ~0.3 s, then the stops
            snap.kill()
            snap.wait()
        assert wait_for(lambda: proc_status(proc.pid)["TracerPid"] == "0", timeout=5)
        assert wait_for(lambda: _generation(proc.pid) >= 0)
        before = _generation(proc.pid)
        assert wait_for(lambda: _generation(proc.pid) > before + 20, timeout=10), "target stuck"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_target_that_execs_during_the_scan(snapfs_env, store_dir):
    """An exec while the background copy runs: the uffd belongs to the old address space;
    snapfs stops with one line saying so, publishes nothing, leaves nothing in the target."""
    with Target("oracle", "16384", "1") as t:  # 64 MiB at 4 MiB/s: ~16 s of scan
        snap = subprocess.Popen([*snapfs_cmd(), "snapshot", str(t.pid), "--rate", "4M"],
                                env=snapfs_env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert wait_scanning(snap.pid, t.pid)
            time.sleep(0.5)
            t.proc.stdin.write("x\n")
            t.proc.stdin.flush()
            _, err = snap.communicate(timeout=60)
        finally:
            snap.kill()
        assert snap.returncode == 3, err
        _one_line(err, "started a new program (exec)", "nothing published")
        assert wait_for(lambda: proc_status(t.pid)["Name"] == "sleep")
        assert_released(t.pid)


def test_static_program_without_gadgets(snapfs_env, store_dir):
    """No `syscall; ret` anywhere in its executable memory: refused in one line, unharmed."""
    exe = build("nolibc", ["-nostdlib", "-static", "-fno-stack-protector"])
    proc = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        out = subprocess.run([*snapfs_cmd(), "snapshot", str(proc.pid)], env=snapfs_env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 3, out.stderr
        _one_line(out.stderr, "0f 05 c3", "cannot inject a system call into it safely")
        assert_released(proc.pid)
        assert proc_status(proc.pid)["State"].startswith("S")  # still in its pause()
    finally:
        proc.kill()
        proc.wait()


_REUSE_SCRIPT = textwrap.dedent("""
    # Runs as PID 1 of a new PID namespace: a victim gets PID X, snapfs pins it and looks it
    # up, then (its first PTRACE_SEIZE delayed by strace) the victim dies and a regcheck
    # target is made to get PID X (ns_last_pid). snapfs must refuse, leaving it unharmed.
    import os, subprocess, sys, time
    regcheck, env = sys.argv[1], dict(os.environ)
    victim = subprocess.Popen(["sleep", "1000"])
    x = victim.pid
    snap = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=ptrace",
         "-e", "inject=ptrace:delay_enter=2000000:when=1",
         sys.executable, "-m", "snapfs", "snapshot", str(x)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def in_ptrace():  # a thread of snapfs (strace's child) sits in the delayed ptrace call
        try:
            kids = open(f"/proc/{snap.pid}/task/{snap.pid}/children").read().split()
            return any(open(f"/proc/{kids[0]}/task/{t}/syscall").read().startswith("101 ")
                       for t in os.listdir(f"/proc/{kids[0]}/task"))
        except (OSError, IndexError):
            return False
    deadline = time.monotonic() + 60
    while not in_ptrace():
        assert time.monotonic() < deadline, "snapfs never reached its first ptrace call"
        time.sleep(0.005)
    victim.kill(); victim.wait()
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(x - 1))
    new = subprocess.Popen([regcheck, "spin", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert new.stdout.readline().startswith("ready")
    out, err = snap.communicate(timeout=60)
    status = open(f"/proc/{new.pid}/status").read()
    tracer = [l for l in status.splitlines() if l.startswith("TracerPid")][0].split()[1]
    new.stdin.write("c\\n"); new.stdin.flush()
    check = new.stdout.readline().strip()
    new.kill()
    print(f"reused={new.pid == x} rc={snap.returncode} tracer={tracer} check={check!r}")
    print(err.strip())
""")


def test_pid_reused_between_lookup_and_attach(snapfs_env, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (a PID namespace and ns_last_pid)")
    script = tmp_path / "reuse.py"
    script.write_text(_REUSE_SCRIPT)
    for _ in range(3):
        out = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script), str(build("regcheck"))],
            env=dict(snapfs_env, SNAPFS_STOP_TIMEOUT="10"), cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        first, *rest = out.stdout.strip().splitlines()
        if "reused=True" in first:
            break
    else:
        pytest.skip(f"could not make the PID be reused: {first}")
    assert "rc=3" in first and "tracer=0" in first and "check='ok c 1'" in first, out.stdout
    assert len(rest) == 1 and "exited" in rest[0], out.stdout


# ---------------------------------------------------------------- what the user gives
def test_snapshot_of_a_thread_id(snapfs_env, store_dir):
    with Target("regcheck", "spin", "3") as t:
        tid = _a_worker(t)
        out = subprocess.run([*snapfs_cmd(), "snapshot", str(tid)], env=snapfs_env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 3, out.stderr
        _one_line(out.stderr, f"{tid} is a thread of process {t.pid}")
        assert_released(t.pid)
        _check(t)


async def test_two_captures_of_one_process(snapfs_env, store_dir):
    """While a capture holds a process (here: this test holds its lock), another one is
    refused in one line naming the holder; once it is released, captures work again."""
    from snapfs.capture.handle import ProcessHandle

    with Target("regcheck", "spin", "2") as t:
        holder = ProcessHandle.open(t.pid)
        holder.lock_capture()
        try:
            out = subprocess.run([*snapfs_cmd(), "snapshot", str(t.pid)], env=snapfs_env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 3, out.stderr
            _one_line(out.stderr, f"another capture holds PID {t.pid}", f"snapfs PID {os.getpid()}")
            with Store.open(store_dir, create=True) as store:
                with pytest.raises(TargetError, match="another capture holds"):
                    await capture_process(t.pid, store, "s", CaptureOptions())
            assert_released(t.pid)
        finally:
            holder.close()
        out = subprocess.run([*snapfs_cmd(), "snapshot", str(t.pid)], env=snapfs_env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _check(t)


def test_rate_has_a_floor(snapfs_env):
    out = subprocess.run([*snapfs_cmd(), "snapshot", "1", "--rate", "1"], env=snapfs_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "at least 1M" in out.stderr, out.stderr


async def test_rate_deadline_copies_the_rest_at_full_speed(store_dir):
    with Target("oracle", "16384", "1") as t:  # 64 MiB at 1 MiB/s would take a minute
        with Store.open(store_dir, create=True) as store:
            t0 = time.monotonic()
            result = await capture_process(t.pid, store, "s", CaptureOptions(rate=1 << 20, rate_deadline=1.0))
            assert time.monotonic() - t0 < 45  # snapfs start-up included: slow on a loaded machine
            assert any("deadline" in w for w in result.warnings), result.warnings
        assert_released(t.pid)


# ---------------------------------------------------------------- odd but legal targets
async def test_process_whose_main_thread_exited(store_dir):
    """A leader that called pthread_exit stays a zombie while the process runs: the stop
    takes its other threads (one of them takes an injection); a capture, which reads memory
    through /proc/PID (empty for such a process), refuses it in one line."""
    with Target("regcheck", "nomain", "2") as t:
        assert wait_for(lambda: proc_status(t.pid)["State"].startswith("Z"), timeout=5)
        with stopped(t.pid) as proc:
            assert t.pid not in proc.tids and len(proc.tids) == 3
            assert proc.injector()("getpid") == t.pid
        with Store.open(store_dir, create=True) as store:
            with pytest.raises(TargetError, match="main thread of process .* has exited"):
                await capture_process(t.pid, store, "s", CaptureOptions())
        assert proc_status(t.pid)["TracerPid"] == "0"
        _check(t)


def test_two_processes_stopped_at_one_instant():
    with Target("regcheck", "spin", "2") as a, Target("regcheck", "spin", "3") as b:
        with stopped_group([a.pid, b.pid]) as group:
            assert len(group[a.pid].tids) == 3 and len(group[b.pid].tids) == 4
            for t in (a, b):
                for tid in os.listdir(f"/proc/{t.pid}/task"):
                    stat = Path(f"/proc/{t.pid}/task/{tid}/stat").read_text()
                    assert stat.rsplit(")", 1)[1].split()[0] == "t"
        for t in (a, b):
            assert_released(t.pid)
            _check(t)


def test_queued_signals_survive_captures(store_dir):
    """Real-time signals sent all through several captures all arrive (none is held in
    snapfs, none is lost)."""
    import trio

    with Target("regcheck", "spin", "2") as t:
        sent = 0
        done = threading.Event()

        def sender():
            nonlocal sent
            while not done.is_set():
                os.kill(t.pid, signal.SIGRTMIN + 1)
                sent += 1
                time.sleep(0.0005)

        th = threading.Thread(target=sender)
        th.start()
        try:
            async def captures():
                with Store.open(store_dir, create=True) as store:
                    for i in range(4):
                        await capture_process(t.pid, store, f"s{i}", CaptureOptions())

            trio.run(captures)
        finally:
            done.set()
            th.join()
        time.sleep(0.2)
        assert t.send("s") == f"ok s {sent}"
        _check(t)


async def test_a_stop_that_raises_once_every_thread_stopped_holds_nothing():
    """A stop can fail after every thread is stopped (a cancellation reaching the trio side's
    wait just as the stop ends; here the step run on its hand-back fails): it must let go
    of them all, since its callers release only a stop that returned."""
    import trio

    from snapfs.capture.ptrace import StopGroup

    def boom() -> None:
        raise RuntimeError("boom")

    with Target("regcheck", "spin", "3") as t:
        group = StopGroup([t.pid])

        def stop() -> None:
            with pytest.raises(RuntimeError, match="boom"):
                group.stop(then_in_trio=boom)

        await trio.to_thread.run_sync(stop)
        assert_released(t.pid)
        _check(t)
