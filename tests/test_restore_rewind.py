"""`snapfs incoming --pid` rewinds a live, busy, multi-threaded process exactly, or refuses.

The target (tools/targets/ptrchase.c) rewrites a ring of heap nodes at full speed in one
thread (pointers to half-linked nodes in its registers at any instant) while four threads
blocked in futex, nanosleep, epoll_wait and read each keep a private heap list; every thread
verifies the invariants after each wake-up and counts what it finds broken. A restore must
bring memory, layout and every thread's registers back together: the generation counter
goes back to the snapshot's and nothing is ever found broken.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import time

import pytest
import trio

from snapfs.capture import CaptureOptions, capture_process, snapshot_next
from snapfs.errors import RestoreRefused
from snapfs.store import Store
from snapfs.stream.restore import restore_process
from snapfs.stream.vmstate import VmstateView
from tests.conftest import snapfs_cmd
from tools.torture_restore import Target


@pytest.fixture
def chase(target_bin):
    c = Target(target_bin("ptrchase"))
    time.sleep(0.2)  # every thread in its loop
    yield c
    c.close()


def snapshot(store_dir, pid: int, name: str) -> None:
    with Store.open(store_dir, create=True) as store:
        trio.run(capture_process, pid, store, name, CaptureOptions())


def vmstate(store_dir, name: str) -> bytes:
    with Store.open(store_dir) as store:
        view = VmstateView(store.open_snapshot(name))
        return b"".join(bytes(c) for c in view.iter_chunks())


def recorded_u64(store_dir, name: str, addr: int) -> int:
    """The 8 bytes at ``addr`` in the snapshot (the target's generation at the instant)."""
    with Store.open(store_dir) as store:
        r = store.open_snapshot(name)
        region = next(x for x in r.regions if x.start <= addr < x.start + x.length)
        return struct.unpack("<Q", r.read(region.index, addr - region.start, 8))[0]


def test_twenty_rounds_under_full_speed_mutation(chase, store_dir):
    for round_ in range(20):
        name = f"r{round_}"
        snapshot(store_dir, chase.pid, name)
        at_snapshot = recorded_u64(store_dir, name, chase.gen_addr)
        assert recorded_u64(store_dir, name, chase.broken_addr) == 0
        time.sleep(0.2)  # it runs on: millions of generations
        before, _ = chase.generation()
        assert before > at_snapshot
        result = restore_process(io.BytesIO(vmstate(store_dir, name)), chase.pid)
        assert result.restored and result.threads == 6 and not result.forced
        after, broken = chase.generation()
        # It continues from the snapshot's state: back below where it was, from the instant on.
        assert at_snapshot <= after < before, (round_, at_snapshot, after, before)
        assert broken == 0
        chase.assert_sound("after the restore")


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_heap_grown_or_shrunk_since_is_brought_back(chase, store_dir, change):
    if change == "shrink":
        assert chase.ask("grow") == "grown"  # the snapshot has the big heap and 4 mappings
    snapshot(store_dir, chase.pid, "s")
    assert chase.ask(change) in ("grown", "shrunk")
    data = vmstate(store_dir, "s")
    dry = restore_process(io.BytesIO(data), chase.pid, dry_run=True)
    ops = [op.split()[0] for op in dry.layout]
    # The 4 mappings (adjacent or not, as mmap placed them) go or come back, the heap's end moves.
    if change == "grow":
        assert "brk" in ops and set(ops) == {"munmap", "brk"}, dry.layout
    else:
        assert ops[0] == "brk" and set(ops[1:]) == {"mmap"}, dry.layout
    assert not dry.refused
    result = restore_process(io.BytesIO(data), chase.pid)
    assert result.restored and result.layout == dry.layout
    chase.assert_sound("after the restore")  # the extra list (heap chunks and mappings) checks out again
    # Its heap is its own again: it can free and grow it.
    assert chase.ask("shrink" if change == "shrink" else "grow") in ("shrunk", "grown")
    chase.assert_sound("after the restore")


def test_fd_table_change_refuses_untouched_and_force_says_what_it_skipped(chase, store_dir, snapfs_env):
    snapshot(store_dir, chase.pid, "s")
    fd = int(chase.ask("openfd").split()[1])
    data = vmstate(store_dir, "s")
    before, _ = chase.generation()
    with pytest.raises(RestoreRefused) as refused:
        restore_process(io.BytesIO(data), chase.pid)
    msg = str(refused.value)
    assert f"fd {fd} (pipe:[" in msg and "was opened since the snapshot" in msg and "nothing written" in msg
    assert "\n" not in msg
    assert chase.generation()[0] > before  # untouched: it ran on
    chase.assert_sound("after the restore")

    env = dict(snapfs_env, SNAPFS_STORE=str(store_dir))
    dry = subprocess.run([*snapfs_cmd(), "incoming", "--pid", str(chase.pid), "--dry-run"], input=data,
                         env=env, capture_output=True)
    assert dry.returncode == 3 and b"would refuse (--force restores anyway)" in dry.stdout
    assert f"fd {fd} (pipe:[".encode() in dry.stdout

    done = subprocess.run([*snapfs_cmd(), "incoming", "--pid", str(chase.pid), "--force"], input=data,
                          env=env, capture_output=True)
    assert done.returncode == 0, done.stderr
    err = done.stderr.decode()
    assert "--force: restored although" in err and f"not rewound: fd {fd} (pipe:[" in err
    chase.assert_sound("after the forced restore")


def test_snapshot_of_an_older_version_restores_memory_only_with_force(chase, store_dir, snapfs_env):
    snapshot(store_dir, chase.pid, "s")
    # What an older snapfs wrote: no recorded state (registers, kernel state, maps).
    import sqlite3

    with sqlite3.connect(store_dir / "catalog.sqlite") as db:
        db.execute("DELETE FROM blobs WHERE name = 'process.state'")
    data = vmstate(store_dir, "s")
    with pytest.raises(RestoreRefused, match="no recorded registers or kernel state"):
        restore_process(io.BytesIO(data), chase.pid)
    chase.assert_sound("untouched by the refusal")
    # With --force only the memory is written: the threads keep their registers. The
    # mutator's ring is then a mix of two instants, which the target may well detect or
    # crash on; what the user was told is that it may break.
    env = dict(snapfs_env, SNAPFS_STORE=str(store_dir))
    done = subprocess.run([*snapfs_cmd(), "incoming", "--pid", str(chase.pid), "--force", "--json"],
                          input=data, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["restored"] and result["threads"] == 0
    assert any("older snapfs" in f for f in result["forced"])


def test_an_every_child_records_the_state_and_restores(chase, store_dir):
    """`snapshot --every` children are restorable as exactly as full snapshots."""

    async def series() -> None:
        with Store.open(store_dir, create=True) as store:
            first = await capture_process(chase.pid, store, "c0", CaptureOptions(continuous=True))
            try:
                await trio.sleep(0.2)
                await snapshot_next(first.tracking, store, "c1")
            finally:
                first.tracking.close()

    trio.run(series)
    at_child = recorded_u64(store_dir, "c1", chase.gen_addr)
    time.sleep(0.2)
    before, _ = chase.generation()
    result = restore_process(io.BytesIO(vmstate(store_dir, "c1")), chase.pid)
    assert result.restored and result.threads == 6 and not result.forced
    after, broken = chase.generation()
    assert at_child <= after < before and broken == 0
    chase.assert_sound("after the restore")
