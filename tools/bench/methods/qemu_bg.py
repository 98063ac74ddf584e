"""QEMU's own background-snapshot (UFFD-WP inside QEMU) of a VM that keeps writing its RAM.

The guest (tools/guest-bench/guest.c, a multiboot kernel built here with gcc -m32) fills its
RAM with the same content mix as memwriter and keeps writing at a paced rate. The bench drives
QMP: background-snapshot capability, ``migrate "exec:cat > FILE"``, waits for the MIGRATION
completed event, and reads QEMU's own total-time and downtime from ``query-migrate``. KVM is
used when a guest actually boots under it within a few seconds, else TCG (stated in the result).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import statistics
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tools.bench.peers import kvm_usable
from tools.buildcache import cached_build

ROOT = Path(__file__).resolve().parents[3]
GUEST_SRC = ROOT / "tools" / "guest-bench"
BUILD_DIR = ROOT / "build" / "guest-bench"
QEMU = "qemu-system-x86_64"
GiB = 1 << 30
PAGE = 4096


def build_guest() -> Path:
    """Compile and link the guest if needed; return the ELF's path."""
    src, script = GUEST_SRC / "guest.c", GUEST_SRC / "guest.ld"

    def compile_to(tmp: Path) -> None:
        obj = tmp.with_suffix(".o")
        subprocess.run(["gcc", "-m32", "-ffreestanding", "-fno-pic", "-fno-pie",
                        "-fno-stack-protector", "-nostdlib", "-O2", "-Wall", "-c",
                        "-o", str(obj), str(src)], check=True)
        subprocess.run(["ld", "-m", "elf_i386", "--no-warn-rwx-segments", "-T", str(script),
                        "-o", str(tmp), str(obj)], check=True)
        obj.unlink()

    return cached_build(BUILD_DIR / "guest.elf", [src, script], compile_to)


class Qmp:
    """A minimal blocking QMP client: commands and the events seen meanwhile."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"QMP socket {path} did not appear") from None
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("r")
        self.events: list[dict] = []
        self._recv()  # greeting
        self.cmd("qmp_capabilities")

    def _recv(self) -> dict:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QEMU closed the QMP connection")
        return json.loads(line)

    def cmd(self, name: str, **args: object) -> object:
        """Run a command; return its ``return`` value (RuntimeError on an error reply)."""
        msg = {"execute": name, **({"arguments": args} if args else {})}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._recv()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error'].get('desc')}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, pred, timeout: float) -> dict:
        """Block until an event ``name`` with ``pred(data)`` true arrives (or was seen)."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["event"] == name and pred(ev.get("data", {})):
                    self.events.remove(ev)
                    return ev
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                reply = self._recv()
            except (TimeoutError, socket.timeout):
                raise TimeoutError(f"no {name} event in {timeout:.0f} s") from None
            if "event" in reply:
                self.events.append(reply)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


class Vm:
    """The bench guest under QEMU; always killed on exit."""

    def __init__(self, mem: int, rate: float, accel: str, workdir: Path) -> None:
        self.qmp_path = str(workdir / f"qmp-{os.getpid()}-{accel}.sock")
        argv = [QEMU, "-machine", "pc", "-accel", accel, "-m", f"{mem >> 20}M", "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none",
                "-kernel", str(build_guest()), "-append", f"rate={int(rate)}",
                "-debugcon", "stdio", "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        # stderr (QEMU's and its exec: children's) to a file: a pipe nobody reads could fill up.
        self.log_path = workdir / f"qemu-{os.getpid()}-{accel}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.ready: dict | None = None
        self._ready_evt = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.qmp: Qmp | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.match(r"READY pages=(\d+) nonzero_pages=(\d+) counter=0x([0-9a-f]+)", line)
            if m:
                self.ready = {"pages": int(m[1]), "nonzero_pages": int(m[2]), "counter": int(m[3], 16)}
                self._ready_evt.set()
        self._ready_evt.set()

    def wait_ready(self, timeout: float) -> bool:
        """True once the guest has filled its RAM."""
        self._ready_evt.wait(timeout)
        return self.ready is not None

    def connect(self) -> Qmp:
        """The QMP connection."""
        if self.qmp is None:
            self.qmp = Qmp(self.qmp_path)
        return self.qmp

    def guest_writes(self) -> int:
        """The guest's write counter, read through the monitor."""
        assert self.ready
        out = self.connect().cmd("human-monitor-command",
                                 **{"command-line": f"xp /2wx {self.ready['counter']:#x}"})
        words = re.findall(r"0x([0-9a-f]{8})", str(out).split(":", 1)[-1])
        return int(words[0], 16) | (int(words[1], 16) << 32)

    def stderr_tail(self) -> str:
        """Last line QEMU wrote on stderr (after it exited)."""
        if self.proc.poll() is None:
            return ""
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def close(self) -> None:
        """Kill QEMU."""
        if self.qmp:
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()
        Path(self.qmp_path).unlink(missing_ok=True)


def _snapshot(qmp: Qmp, uri: str) -> dict:
    """One background-snapshot to ``uri``; QEMU's query-migrate once it has completed."""
    qmp.cmd("migrate", uri=uri)
    qmp.wait_event("MIGRATION", lambda d: d.get("status") in ("completed", "failed", "cancelled"),
                   timeout=600)
    # The MIGRATION event is sent when the state changes; total-time is filled in just after,
    # by the migration thread's cleanup: ask again until it is there.
    for _ in range(100):
        info = qmp.cmd("query-migrate")
        assert isinstance(info, dict)
        if info.get("status") != "completed" or info.get("total-time"):
            break
        time.sleep(0.01)
    if info.get("status") != "completed":
        raise RuntimeError(f"background-snapshot {info.get('status')}: {info.get('error-desc', '?')}")
    if not info.get("total-time"):
        raise RuntimeError("query-migrate gave no total-time after completion")
    return info


class QemuBackground:
    """QEMU background-snapshot of the bench guest to a file."""

    name = "qemu background-snapshot"
    how = ("QMP migrate-set-capabilities background-snapshot, migrate exec:cat > FILE; total-time "
           "and downtime from query-migrate; guest writes/s read from its counter via the monitor")

    def __init__(self, mem: int, guest_rate: float, kvm_probe_s: float = 4.0) -> None:
        self.mem = mem
        self.guest_rate = guest_rate
        self.kvm_probe_s = kvm_probe_s

    def available(self) -> str | None:
        if not shutil.which(QEMU):
            return f"{QEMU} not found (Debian package qemu-system-x86)"
        for tool in ("gcc", "ld"):
            if not shutil.which(tool):
                return f"{tool} not found: needed to build the guest"
        try:
            build_guest()
        except (subprocess.CalledProcessError, OSError) as e:
            return f"could not build the guest (gcc -m32): {e}"
        return None

    def _boot(self, workdir: Path) -> tuple[Vm, str, str]:
        """Boot under KVM if it really runs the guest, else TCG; (vm, accel, why)."""
        why = kvm_usable()
        if why is None:
            # A 32 MiB probe first: /dev/kvm may exist yet not run a plain protected-mode guest.
            probe = Vm(32 << 20, 0, "kvm", workdir)
            ok = probe.wait_ready(self.kvm_probe_s)
            tail = probe.stderr_tail() if probe.proc.poll() is not None else ""
            probe.close()
            if ok:
                vm = Vm(self.mem, self.guest_rate, "kvm", workdir)
                if vm.wait_ready(60 + self.mem / GiB * 60):
                    return vm, "kvm", "KVM works"
                vm.close()
                why = "KVM booted the probe guest but not the full-size one"
            else:
                why = (f"/dev/kvm opens but KVM did not boot the guest in {self.kvm_probe_s:.0f} s"
                       f"{': ' + tail if tail else ''}")
        vm = Vm(self.mem, self.guest_rate, "tcg", workdir)
        if not vm.wait_ready(120 + self.mem / GiB * 120):
            tail = vm.stderr_tail()
            vm.close()
            raise RuntimeError(f"the guest did not come up under TCG either: {tail or 'timeout'}")
        return vm, "tcg", why

    def run_vm(self, workdir: Path) -> dict:
        """Boot, settle, snapshot once, report."""
        vm, accel, why = self._boot(workdir)
        out = workdir / "qemu-bg.mig"
        try:
            assert vm.ready
            qmp = vm.connect()
            qmp.cmd("migrate-set-capabilities", capabilities=[
                {"capability": "background-snapshot", "state": True},
                {"capability": "events", "state": True}])
            w0, t0 = vm.guest_writes(), time.perf_counter()
            time.sleep(1.0)
            w1, t1 = vm.guest_writes(), time.perf_counter()
            info = _snapshot(qmp, f"exec:cat > {out}")
            w2, t2 = vm.guest_writes(), time.perf_counter()
            nonzero = vm.ready["nonzero_pages"] * PAGE
            size = out.stat().st_size
            total_s = info["total-time"] / 1e3
            before = (w1 - w0) / (t1 - t0)
            during = (w2 - w1) / (t2 - t1)
            # Drop the first image before the next snapshots: its gigabyte of dirty page
            # cache being written back slowed the next one (the first snapfs one) by ~1 s.
            out.unlink(missing_ok=True)
            return {
                "accel": accel, "accel_reason": why, "guest_mem": self.mem,
                "guest_rate_requested": self.guest_rate,
                "nonzero_bytes": nonzero, "total_s": total_s, "wall_s": t2 - t1,
                "downtime_ms": info.get("downtime"), "setup_ms": info.get("setup-time"),
                "image_bytes": size, "image_ratio": size / nonzero,
                "guest_writes_per_s_before": before, "guest_writes_per_s_during": during,
                "throughput_ratio": during / before if before else None,
                "seconds_per_nonzero_gib": total_s / (nonzero / GiB),
                "ram": {k: info.get("ram", {}).get(k) for k in ("total", "duplicate", "normal", "mbps")},
                "incoming": self._into_snapfs(qmp, workdir, total_s),
            }
        finally:
            vm.close()
            out.unlink(missing_ok=True)

    @staticmethod
    def _into_snapfs(qmp: Qmp, workdir: Path, file_total_s: float, rounds: int = 3) -> dict:
        """More background-snapshots of the same VM, alternating a file sink and ``snapfs
        incoming`` (ingest must not slow QEMU down): QEMU's total-time with each,
        medians compared (one pair is too noisy on a 2-vCPU machine)."""
        try:
            import snapfs.stream  # noqa: F401
        except ImportError as e:
            return {"skipped": f"snapfs.stream not importable yet: {e}"}
        files, snaps = [file_total_s], []
        out = workdir / "qemu-bg-again.mig"
        for i in range(rounds):
            store = workdir / f"qemu-incoming-store-{i}"
            cmd = (f"PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)} -m snapfs incoming "
                   f"--name vm --store {shlex.quote(str(store))} > /dev/null")
            try:
                info = _snapshot(qmp, f"exec:{cmd}")
                listed = subprocess.run([sys.executable, "-m", "snapfs", "list", "--json", "--store", str(store)],
                                        capture_output=True, text=True, cwd=ROOT, timeout=60,
                                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
                published = listed.returncode == 0 and any(s.get("name") == "vm" for s in json.loads(listed.stdout or "[]"))
                if i < rounds - 1:
                    files.append(_snapshot(qmp, f"exec:cat > {out}")["total-time"] / 1e3)
            except (RuntimeError, TimeoutError, ValueError) as e:
                return {"skipped": f"failed: {e}"}
            finally:
                shutil.rmtree(store, ignore_errors=True)
                out.unlink(missing_ok=True)
            if not published:
                return {"skipped": "QEMU completed but `snapfs incoming` published no snapshot (see the QEMU log)"}
            snaps.append(info["total-time"] / 1e3)
        total_s, file_s = statistics.median(snaps), statistics.median(files)
        return {"total_s": total_s, "file_total_s": file_s, "ratio_to_file": total_s / file_s,
                "rounds": rounds, "incoming_totals_s": snaps, "file_totals_s": files}
