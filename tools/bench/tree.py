"""Process trees: ``snapfs snapshot --tree`` against freezing the whole tree (CRIU's way:
stop every process, copy every process's memory and the shared memory once, resume) and
against fork() in every process (the pause a fork-based snapshot costs each of them), on
treewriter (tools/targets/treewriter.c): NPROC processes writing their private memory and one
shared region, each timing its own longest stall.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from tools.bench.copying import copy_ranges
from tools.bench.methods.snapfs_uffd import ROOT, snapfs_argv, snapfs_env
from tools.bench.sink import ImageSink
from tools.targets import build

SLOT_WORDS = 8  # struct slot in treewriter.c: pid, writes, stall_ns, fork_ns, generation_seen, forks_seen, pad[2]
HEAD_WORDS = 8  # generation, fork_request, ready, nproc, pad[4]


class TreeWriter:
    """A running treewriter; its stats page is read and driven through /proc/PID/mem."""

    def __init__(self, nproc: int, shared_mib: int, private_mib: int, rate: float) -> None:
        self.proc = subprocess.Popen([str(build("treewriter")), str(nproc), str(shared_mib), str(private_mib), str(rate)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.match(r"ready shared=(0x[0-9a-f]+) stats=(0x[0-9a-f]+) pids=([\d,]+)", line)
        if not m:
            self.close()
            raise RuntimeError(f"treewriter did not start: {line!r}")
        self.pid = self.proc.pid
        self.shared, self.stats = int(m[1], 16), int(m[2], 16)
        self.shared_len, self.private_len = shared_mib << 20, private_mib << 20
        self.workers = [int(p) for p in m[3].split(",")]

    def _words(self, first: int, count: int) -> list[int]:
        with open(f"/proc/{self.pid}/mem", "rb") as f:
            f.seek(self.stats + 8 * first)
            raw = f.read(8 * count)
        return [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, len(raw), 8)]

    def _poke(self, word: int, value: int) -> None:
        with open(f"/proc/{self.pid}/mem", "r+b") as f:
            f.seek(self.stats + 8 * word)
            f.write(value.to_bytes(8, "little", signed=True))

    def _slots(self) -> list[list[int]]:
        words = self._words(HEAD_WORDS, SLOT_WORDS * len(self.workers))
        return [words[i * SLOT_WORDS:(i + 1) * SLOT_WORDS] for i in range(len(self.workers))]

    def _until(self, index: int, value: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while any(s[index] != value for s in self._slots()):
            if time.monotonic() > deadline:
                raise RuntimeError("treewriter workers did not answer")
            time.sleep(0.001)

    def reset(self) -> None:
        """Start a new stall window in every worker."""
        gen = self._words(0, 1)[0] + 1
        self._poke(0, gen)
        self._until(4, gen)

    def stalls_ms(self) -> list[float]:
        """Each worker's longest stall since the last reset."""
        return [s[2] / 1e6 for s in self._slots()]

    def fork_all_ms(self) -> list[float]:
        """Make every worker fork once; how long each fork() took."""
        req = self._words(1, 1)[0] + 1
        self._poke(1, req)
        self._until(5, req)
        return [s[3] / 1e6 for s in self._slots()]

    def private_region(self, pid: int) -> tuple[int, int]:
        """The worker's private memory (the anonymous private mapping of its size)."""
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if hi - lo == self.private_len and line.split()[1] == "rw-p":
                return lo, hi - lo
        raise RuntimeError(f"no private region in {pid}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _snapfs_tree(tw: TreeWriter, workdir: Path) -> dict:
    store = workdir / "tree-store"
    argv = [*snapfs_argv(), "snapshot", "--tree", str(tw.pid), "--json", "--store", str(store), "--name", "tree"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=snapfs_env(), cwd=ROOT, timeout=900)
    wall = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"snapfs snapshot --tree failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    info = json.loads(proc.stdout)
    return {"tool_pause_ms": info["pause_ms"], "attach_pause_ms": info["attach_pause_ms"],
            "duration_s": info["duration_s"], "wall_s": round(wall, 3), "image_bytes": info["stored_bytes"],
            "resident_bytes": info["resident_bytes"], "shared_bytes": info["shared_bytes"],
            "faults": info["faults"], "warnings": info["warnings"], "members": info["members"]}


def _stop_copy_tree(tw: TreeWriter, workdir: Path, threads: int) -> dict:
    """Stop every process (ptrace, from this thread), copy each one's private memory and the
    shared memory once, compress, resume: the pause of each process is all of it."""
    from snapfs.capture.ptrace import StoppedProcess

    sink = ImageSink(str(workdir / "tree-stopcopy.img"), threads)
    try:
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for pid in [tw.pid, *tw.workers]:
                proc = StoppedProcess(pid)
                proc.stop()
                stack.callback(proc.release)
            copy_ranges(tw.workers[0], [(tw.shared, tw.shared_len)], sink)
            for pid in tw.workers:
                copy_ranges(pid, [tw.private_region(pid)], sink)
            sink.flush()
        t1 = time.perf_counter()
        return {"tool_pause_ms": (t1 - t0) * 1e3, "duration_s": t1 - t0, "image_bytes": sink.image_bytes}
    finally:
        sink.close()


def run(plan, workdir: Path, log) -> dict:
    """The process-tree rows: every method on one treewriter, each bracketed by a stall window."""
    try:
        tw = TreeWriter(plan.tree_procs, plan.tree_shared_mib, plan.tree_private_mib, plan.tree_rate)
    except (OSError, RuntimeError) as e:
        return {"skipped": str(e)}
    out = {"procs": plan.tree_procs, "shared_bytes": plan.tree_shared_mib << 20,
           "private_bytes_each": plan.tree_private_mib << 20, "rate_per_process": plan.tree_rate, "rows": []}
    try:
        tw.reset()
        time.sleep(plan.settle_s)
        out["baseline_stall_ms"] = tw.stalls_ms()
        methods = [("snapfs --tree", lambda: _snapfs_tree(tw, workdir)),
                   ("stop-copy of the tree", lambda: _stop_copy_tree(tw, workdir, plan.compress_threads)),
                   ("fork() in every process", lambda: {"fork_ms": tw.fork_all_ms()})]
        for name, method in methods:
            tw.reset()
            try:
                row = method()
                row["error"] = None
            except Exception as e:  # noqa: BLE001 - a failing method is a result
                row = {"error": f"{type(e).__name__}: {e}"}
            time.sleep(0.2)
            row["method"] = name
            row["stall_ms"] = tw.stalls_ms()
            out["rows"].append(row)
            log(f"  {name:<24} worst stall per process {max(row['stall_ms']):9.2f} ms"
                + (f"  tool pause {row['tool_pause_ms']:.2f} ms" if "tool_pause_ms" in row else "")
                + (f"  FAILED: {row['error']}" if row["error"] else ""))
    finally:
        tw.close()
    return out


def markdown(sec: dict | None) -> list[str]:
    """The report's section for these rows."""
    L = ["## Process trees", ""]
    if not sec:
        return L + ["Not run.", ""]
    if "skipped" in sec:
        return L + [f"Skipped: {sec['skipped']}", ""]
    if sec.get("command"):
        L += [f"Measured separately by `{sec['command']}` (load average then: {sec.get('loadavg')}).", ""]
    L += [f"treewriter: {sec['procs']} processes, each writing {sec['rate_per_process']:.0f} times/s "
          f"(0: as fast as it can), alternately into its {sec['private_bytes_each'] >> 20} MiB of private "
          f"memory and into {sec['shared_bytes'] >> 20} MiB of memory they all share. The stall is "
          "what each process measured itself: its longest write-loop iteration during the run "
          f"(undisturbed window before: worst {max(sec['baseline_stall_ms']):.2f} ms).", "",
          "| method | worst stall, any process (ms) | stall per process (ms) | tool's pause (ms) | "
          "duration (s) | image MiB |", "|---|---:|---|---:|---:|---:|"]
    for r in sec["rows"]:
        if r.get("error"):
            L.append(f"| {r['method']} | – | – | failed: {r['error']} | – | – |")
            continue
        pause = r.get("tool_pause_ms")
        if "fork_ms" in r:
            pause_txt = f"fork() {max(r['fork_ms']):.2f} (per process: {', '.join(f'{x:.2f}' for x in r['fork_ms'])})"
        else:
            pause_txt = f"{pause:.2f}" + (f" (+{r['attach_pause_ms']:.2f} attach)" if r.get("attach_pause_ms") else "")
        dur = f"{r['duration_s']:.3f}" if "duration_s" in r else "–"
        img = f"{r['image_bytes'] / 2**20:.1f}" if "image_bytes" in r else "–"
        L.append(f"| {r['method']} | {max(r['stall_ms']):.2f} | {', '.join(f'{x:.1f}' for x in r['stall_ms'])} | "
                 f"{pause_txt} | {dur} | {img} |")
    L += ["", "- **snapfs --tree**: `snapfs snapshot --tree PID --json`: every process attached one by one "
          "(the attach), then all frozen at one instant (the tool's pause: the longest any process was "
          "stopped for it), then copied live.",
          "- **stop-copy of the tree** (CRIU's way, simulated): every process stopped with ptrace, every "
          "private region and the shared region (once) copied with process_vm_readv and compressed "
          "as stop-copy does, then every process resumed.",
          "- **fork() in every process**: each process forks a child that exits at once; the "
          "tool's pause is how long the fork() call took in it (what a fork-based snapshot, like "
          "Redis's BGSAVE, costs each process).", ""]
    return L
