"""`snapfs incoming --pid`: a live process restored from a snapshot's vmstate.

The target (C, built here) fills a region and a heap buffer, then on "mutate" overwrites
them and on "check" reports how many bytes differ from the state at start.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from snapfs.stream.restore import target_regions
from snapfs.stream.writer import image_layout
from tests.conftest import snapfs_cmd

TARGET_C = r'''
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define NP 64
static volatile unsigned long spins;

static void *spinner(void *arg) {
    (void)arg;
    for (;;) spins++;
    return NULL;
}

static int expected(long i) { return i < (NP / 2) * 4096L ? (int)((i * 7 + 3) & 0xff) : 0; }

int main(void) {
    long ps = 4096;
    char *m = mmap(NULL, (NP + 2) * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return 1;
    mprotect(m, ps, PROT_NONE);                 /* guards keep the region its own VMA */
    mprotect(m + (NP + 1) * ps, ps, PROT_NONE);
    char *r = m + ps;
    for (long i = 0; i < (NP / 2) * ps; i++) r[i] = (char)expected(i);
    char *heap = malloc(1 << 20);
    memset(heap, 0x11, 1 << 20);
    pthread_t t;
    pthread_create(&t, NULL, spinner, NULL);
    printf("%lx %lx %lx\n", (unsigned long)r, NP * ps, (unsigned long)heap);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "mutate", 6)) {
            memset(r, 0x5a, NP * ps);
            memset(heap, 0x22, 1 << 20);
            puts("mutated");
        } else if (!strncmp(line, "check", 5)) {
            long bad = 0, badheap = 0;
            for (long i = 0; i < NP * ps; i++) bad += r[i] != (char)expected(i);
            for (long i = 0; i < (1 << 20); i++) badheap += heap[i] != 0x11;
            printf("bad %ld %ld\n", bad, badheap);
        }
        fflush(stdout);
    }
    return 0;
}
'''


@pytest.fixture(scope="session")
def restore_target(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("restore-target")
    (d / "target.c").write_text(TARGET_C)
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(d / "target"), str(d / "target.c")], check=True)
    return d / "target"


class Target:
    """The running target: ``ask("check")`` -> its reply line."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        region, length, _heap = self.proc.stdout.readline().split()
        self.region, self.length = int(region, 16), int(length, 16)
        self.pid = self.proc.pid

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def target(restore_target):
    t = Target(restore_target)
    yield t
    t.close()


def run(env, *args, stdin=None):
    return subprocess.run([*snapfs_cmd(), *args], input=stdin, env=env, capture_output=True)


def test_snapshot_then_restore_live_process(target, snapfs_env):
    snap = run(snapfs_env, "snapshot", str(target.pid), "--name", "t1")
    assert snap.returncode == 0, snap.stderr
    assert target.ask("check") == "bad 0 0"
    assert target.ask("mutate") == "mutated"
    assert target.ask("check") == "bad 261632 1048576"
    vmstate = run(snapfs_env, "cat", "t1", "vmstate").stdout

    dry = run(snapfs_env, "incoming", "--pid", str(target.pid), "--dry-run", stdin=vmstate)
    assert dry.returncode == 0 and b"dry run" in dry.stdout
    assert target.ask("check") == "bad 261632 1048576"  # untouched

    done = run(snapfs_env, "incoming", "--pid", str(target.pid), "--json", stdin=vmstate)
    assert done.returncode == 0, done.stderr
    assert target.ask("check") == "bad 0 0"  # the memory of the snapshot instant
    assert target.proc.poll() is None
    assert target.ask("mutate") == "mutated"  # and it runs on


def _region_name(target: Target) -> str:
    return next(name for name, v in target_regions(target.pid).items() if v.start == target.region)


def _stream(images) -> bytes:
    layout = image_layout(images)
    return layout.read(0, layout.size)


def test_mismatched_blocks_are_listed_and_nothing_written(target, snapfs_env):
    target.ask("mutate")
    name = _region_name(target)
    good = bytes(target.length)
    stream = _stream([(name, good + bytes(4096)), ("anon-1000", bytes(4096)), ("heap", bytes(4096))])
    res = run(snapfs_env, "incoming", "--pid", str(target.pid), stdin=stream)
    assert res.returncode == 3
    err = res.stderr.decode()
    assert err.count("\n") == 1 and f"stream does not match process {target.pid}" in err
    assert f"block {name!r} is 0x41000 bytes but the region is 0x40000" in err
    assert "block 'anon-1000' has no region in the process" in err
    assert "block 'heap' is 0x1000 bytes" in err
    assert target.ask("check") == "bad 261632 1048576"


@pytest.mark.parametrize("cut", [100, 5000, -20])
def test_bad_stream_leaves_target_untouched(target, snapfs_env, cut):
    target.ask("mutate")
    name = _region_name(target)
    image = bytes((i * 7 + 3) & 0xFF for i in range(256)) * (target.length // 256)
    stream = _stream([(name, image)])
    res = run(snapfs_env, "incoming", "--pid", str(target.pid), stdin=stream[:cut])
    assert res.returncode == 9, res.stderr
    assert "byte" in res.stderr.decode()
    assert target.ask("check") == "bad 261632 1048576"
    # The full stream carries no process description (no registers, no recorded kernel
    # state): refused, untouched; with --force it restores exactly that region's memory
    # (pages the image sends as data or zero) and says what it did not rewind.
    res = run(snapfs_env, "incoming", "--pid", str(target.pid), stdin=stream)
    assert res.returncode == 3 and b"no process description" in res.stderr and b"--force" in res.stderr
    assert target.ask("check") == "bad 261632 1048576"
    res = run(snapfs_env, "incoming", "--pid", str(target.pid), "--force", stdin=stream)
    assert res.returncode == 0, res.stderr
    assert b"not rewound: the stream carries no process description" in res.stderr
    assert target.ask("check").startswith("bad ") and target.ask("check") != "bad 261632 1048576"


def test_unknown_pid_fails_before_reading(snapfs_env):
    res = run(snapfs_env, "incoming", "--pid", "999999999", stdin=b"QEVM")
    assert res.returncode == 3 and res.stderr.decode().count("\n") == 1
    res = run(snapfs_env, "incoming", "--pid", "999999", "--dry-run", stdin=b"")
    assert res.returncode == 3 and res.stderr.decode() == "snapfs: no process with PID 999999: check the PID (ps -p 999999)\n"


def test_empty_stream_is_said_to_be_empty(snapfs_env):
    """Nothing on stdin (a pipe whose writer failed at once): "empty stream", not a
    truncation at byte 0 — for a restore and for an ingest alike."""
    res = run(snapfs_env, "incoming", "--pid", str(os.getpid()), "--dry-run", stdin=b"")
    assert res.returncode == 9 and res.stderr.decode().startswith("snapfs: empty stream: "), res.stderr
    res = run(snapfs_env, "incoming", "--name", "e", stdin=b"")
    assert res.returncode == 9 and res.stderr.decode().startswith("snapfs: empty stream: "), res.stderr
    assert b"truncated" not in res.stderr


def test_reingested_process_stream_is_the_same_process_snapshot(target, snapfs_env):
    """`snapfs cat t1 vmstate | snapfs incoming --name t2`: the stream's snapfs description
    gives t2 the process, the regions' addresses and kinds and the threads' registers; its
    vmstate is t1's and restores the process."""
    import json

    assert run(snapfs_env, "snapshot", str(target.pid), "--name", "t1").returncode == 0
    vmstate = run(snapfs_env, "cat", "t1", "vmstate").stdout
    res = run(snapfs_env, "incoming", "--name", "t2", stdin=vmstate)
    assert res.returncode == 0, res.stderr
    t1, t2 = (json.loads(run(snapfs_env, "info", n, "--json").stdout) for n in ("t1", "t2"))
    assert (t2["kind"], t2["pid"], t2["comm"], t2["exe"]) == ("process", target.pid, t1["comm"], t1["exe"])
    assert t2["created"] == t1["created"]
    # (zero_pages differ: the stream sends an anonymous region's never-touched pages as zeros)
    fields = ("name", "start", "length", "perms", "offset", "path", "kind", "data_pages")
    assert [[r[f] for f in fields] for r in t2["regions"]] == [[r[f] for f in fields] for r in t1["regions"]]
    assert any(r["kind"] == "heap" for r in t2["regions"]) and all(r["kind"] != "ramblock" for r in t2["regions"])
    listed = run(snapfs_env, "list").stdout.decode()
    assert f"{target.pid} {t1['comm']}" in next(line for line in listed.splitlines() if line.startswith("t2 "))
    assert sorted(t2["meta"]["threads"]) == sorted(t1["meta"]["threads"])
    assert run(snapfs_env, "cat", "t2", "vmstate").stdout == vmstate.replace(b'"snapshot": "t1"', b'"snapshot": "t2"')
    heap = next(r for r in t2["regions"] if r["kind"] == "heap")
    assert (run(snapfs_env, "cat", "t2", f"ramblocks/{heap['name']}/data").stdout
            == run(snapfs_env, "cat", "t1", f"ramblocks/{heap['name']}/data").stdout)

    target.ask("mutate")
    again = run(snapfs_env, "cat", "t2", "vmstate").stdout
    done = run(snapfs_env, "incoming", "--pid", str(target.pid), stdin=again)
    assert done.returncode == 0, done.stderr
    assert target.ask("check") == "bad 0 0"
