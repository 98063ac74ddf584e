"""A real PostgreSQL cluster (Debian's postgresql-15, started by the test in a temporary
directory, on 127.0.0.1 at a free port) under pgbench, snapshotted whole with ``snapfs
snapshot --tree``: one instant, shared memory (shared_buffers, the dynamic shared memory
control segment, the SysV header) protected in every process and stored once, and no
transaction of pgbench fails."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from snapfs.store import Store
from snapfs.store.tree import members, shared_objects
from tests.conftest import snapfs_cmd
from tests.support.postgres import Cluster, available
from tests.support.capture import assert_released

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def test_postgres_cluster_under_pgbench(snapfs_env, store_dir):
    with Cluster(shared_buffers="64MB") as pg:
        pg.pgbench("-i", "-s", "4", "-q")
        bench = pg.pgbench("-c", "4", "-j", "2", "-T", "60", "-P", "5", background=True)
        try:
            time.sleep(2)
            docs = []
            for i in range(2):
                assert bench.poll() is None, "pgbench ended before the snapshots were taken (machine too slow?)"
                snap = subprocess.run(
                    [*snapfs_cmd(), "snapshot", "--tree", str(pg.postmaster_pid), "--name", f"pg{i}", "--json"],
                    env=snapfs_env, capture_output=True, text=True, timeout=300)
                assert snap.returncode == 0, snap.stderr
                assert "not write-protected" not in snap.stderr, snap.stderr
                docs.append(json.loads(snap.stdout))
            for p in docs[-1]["members"]:
                try:
                    assert_released(p["pid"])
                except FileNotFoundError:
                    pass  # an autovacuum worker that ended meanwhile
        finally:
            out, err = bench.communicate(timeout=300)
        assert bench.returncode == 0, err
        processed = int(re.search(r"number of transactions actually processed: (\d+)", out)[1])
        assert processed > 0
        assert "number of failed transactions: 0 (" in out, out
        assert "aborted" not in err, err
    for doc in docs:
        # postmaster, checkpointer, background writer, walwriter, autovacuum launcher,
        # logical replication launcher and the four pgbench backends
        assert doc["processes"] >= 10, doc
        # Only a backend ending (pgbench's end, on a slow machine) may leave a warning: its
        # pages not saved yet went with it.
        assert all("exited during the capture" in w for w in doc["warnings"]), doc["warnings"]
    with Store.open(store_dir, create=False) as store:
        reader = store.open_snapshot("pg1")
        objects = {obj["path"]: (obj, region) for obj, region in shared_objects(reader)}
        # shared_buffers: anonymous shared memory, or hugetlb where the machine has huge
        # pages reserved (PostgreSQL's huge_pages=try).
        buffers = next(o for p, o in objects.items() if p.startswith(("/dev/zero", "/anon_hugepage")))
        assert buffers[0]["how"] == "write-protected" and buffers[1].length >= 64 << 20
        assert len(buffers[0]["mapped_by"]) == docs[1]["processes"]  # every process maps it
        assert any(o["how"].startswith("copied") for o, _ in objects.values())  # the SysV header
        # Each process's window on shared_buffers reads the bytes stored once under shared/.
        obj_bytes = reader.read(buffers[1].index, 0, 1 << 20)
        for m in members(reader)[:3]:
            r = next(r for r in m.regions if r.meta.get("shares", {}).get("region") == buffers[1].name)
            first = r.meta["shares"]["first_page"] * 4096
            assert m.read(r.index, 0, 4096) == obj_bytes[first: first + 4096]
        assert not store.check(verify_data=True)["problems"]
