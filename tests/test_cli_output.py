"""What `snapfs snapshot` and `snapfs demo` print: a progress line that tells the truth while
the copy runs, summaries of `--every` children, demo hints that run as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from snapfs.capture import CaptureOptions, capture_process
from snapfs.capture.types import CaptureResult, Progress, RecentRate
from snapfs.commands.snapshot import progress_text, summary
from snapfs.store import Store
from tests.conftest import snapfs_cmd
from tests.support.capture import Target

MiB = 1 << 20


def test_rate_is_recent_and_eta_is_never_zero_while_pages_remain():
    # 40 MiB saved in the pause (done at the first sample), then 10 MB/s, then 1 MB/s.
    recent, done = RecentRate(), 40 * MiB
    assert recent.add(0.0, done) is None  # no rate before a second has passed
    assert recent.add(0.5, done + 5_000_000) is None
    assert recent.add(1.0, done + 10_000_000) == pytest.approx(10e6)  # not 50 MB/s
    t = 1.0
    for _ in range(5):
        t += 1.0
        rate = recent.add(t, done + int(t * 10e6))
    assert rate == pytest.approx(10e6)
    base = done + int(t * 10e6)
    for i in range(1, 5):
        rate = recent.add(t + i, base + i * 1_000_000)
    assert rate == pytest.approx(1e6)  # the slowdown shows within the window

    total = 300 * MiB
    line = progress_text(Progress(40 * MiB, total, 0, 0.2, None))
    assert "- MB/s" in line and "ETA -" in line and "0 faults" in line
    line = progress_text(Progress(total - 100, total, 1, 5.0, 1e9))
    assert "ETA 1 s" in line and "1 fault ·" in line
    assert progress_text(Progress(total, total, 7, 6.0, 1e6)).endswith("finishing")
    assert "ETA 10 s" in progress_text(Progress(total - 10_000_000, total, 7, 6.0, 1e6))


async def test_progress_counts_faults_while_the_copy_runs(store_dir):
    """The native fault loop's faults show in the progress line as they happen, not only in
    the result (the line said "0 faults" during a copy that served 56 716)."""
    seen: list[Progress] = []
    with Target("oracle", "8192", "2") as t:
        with Store.open(store_dir, create=True) as store:
            result = await capture_process(t.pid, store, "p", CaptureOptions(rate=16 << 20), seen.append)
    assert len(seen) >= 3 and result.faults >= 50, (len(seen), result.faults)
    counts = [p.faults for p in seen]
    assert counts == sorted(counts) and 0 < counts[-1] <= result.faults, (counts, result.faults)
    # (faults stop when the scan ends, within a sample period of the last one)
    assert counts[-1] >= result.faults // 2, (counts, result.faults)


def test_every_child_summary_says_copied_and_inherited():
    child = CaptureResult(name="cont-2", pid=42, comm="app", pause_ms=3.0, duration_s=0.2,
                          resident_bytes=300 * MiB, zero_bytes=0, stored_bytes=MiB, faults=0,
                          region_count=1, copied_bytes=2 * MiB, parent="cont-1")
    text = summary(child)
    assert "copied 2.0 MiB written since cont-1" in text and "inherited 298.0 MiB unchanged" in text
    assert "captured" not in text and "resident in 1 region\n" in text
    assert child.to_json()["inherited_bytes"] == 298 * MiB and child.to_json()["parent"] == "cont-1"
    full = CaptureResult(name="s", pid=42, comm="app", pause_ms=3.0, duration_s=2.0,
                         resident_bytes=300 * MiB, zero_bytes=0, stored_bytes=MiB, faults=1, region_count=2)
    assert "captured 300.0 MiB" in summary(full) and "1 write fault served first" in summary(full)
    assert full.to_json()["copied_bytes"] == 300 * MiB and full.to_json()["inherited_bytes"] == 0


def test_demo_hints_run_as_printed(tmp_path):
    """The hints name a snapfs that runs (./tools/demo's .venv/bin/snapfs is not on PATH),
    count markers rather than lines, and the resident size is explained."""
    store = tmp_path / "store"
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no snapfs on PATH, as after ./tools/demo
    script = Path(sys.executable).parent / "snapfs"  # what ./tools/demo runs
    cmd = [str(script)] if script.exists() else snapfs_cmd()
    res = subprocess.run(cmd + ["demo", "--mib", "8", "--store", str(store)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    found = int(re.search(r"verified: block \S+ read back from the store, ([\d ]+) marker", out)[1].replace(" ", ""))
    assert found > 0
    assert re.search(r"^resident [\d.]+ MiB: [\d.]+ MiB of the 8.0 MiB buffer \(its other [\d.]+ MiB are zero pages",
                     out, re.M), out
    listing = re.search(r"^  (.*) list --store (\S+)$", out, re.M)
    assert listing and listing[1] == (str(script) if script.exists() else f"{sys.executable} -m snapfs"), out
    assert "| grep -c" not in out and "grep -ao snapfs-demo-marker /tmp/snaps/" in out
    ran = subprocess.run(listing[0].strip(), shell=True, capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 0 and "demo-" in ran.stdout, ran.stderr
    no_fuse = re.search(r"^Without FUSE: (.*)$", out, re.M)[1]
    ran = subprocess.run(["bash", "-c", f"set -o pipefail; {no_fuse}"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert int(ran.stdout) >= found  # the block may hold a little more than the demo buffer
