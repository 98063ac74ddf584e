"""CLI: snapfs list / info / rm / gc / check — output and exit codes, on a real store."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from snapfs.store import Store
from tests.support.synthetic import write_synthetic
from tests.conftest import snapfs_cmd


def run(env, *args):
    p = subprocess.run(snapfs_cmd() + list(args), env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    return p


@pytest.fixture
def populated(store_dir):
    with Store.open(store_dir) as store:
        write_synthetic(store, "base", 1, [600, 30])
        write_synthetic(store, "child", 1, [600, 30], version=1, parent="base")
    return store_dir


def test_list_and_info(populated, snapfs_env):
    p = run(snapfs_env, "list")
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["NAME", "CREATED", "TARGET", "PAUSE", "RESIDENT", "STORED", "SHARED", "PARENT"]
    assert lines[1].startswith("base ") and lines[2].startswith("child ")
    assert lines[2].rstrip().endswith(" base") and "4242 synthetic" in lines[2]
    listed = json.loads(run(snapfs_env, "list", "--json").stdout)
    assert [s["name"] for s in listed] == ["base", "child"]
    assert listed[1]["parent"] == "base" and listed[1]["shared_bytes"] > listed[1]["stored_bytes"] > 0
    p = run(snapfs_env, "info", "child")
    assert p.returncode == 0
    assert "parent:    base" in p.stdout and "shared with parents" in p.stdout and "region0" in p.stdout
    info = json.loads(run(snapfs_env, "info", "child", "--json").stdout)
    assert info["name"] == "child" and len(info["regions"]) == 2
    assert info["regions"][0]["length"] == 600 * 4096
    p = run(snapfs_env, "info", "missing")
    assert p.returncode == 7 and p.stderr.strip() == (
        f"snapfs: no snapshot named 'missing' in store {populated}: see `snapfs list`")


def test_missing_store_is_a_clear_error(store_dir, snapfs_env):
    p = run(snapfs_env, "list")
    assert p.returncode == 5 and "no snapfs store at" in p.stderr
    assert not store_dir.exists()


def test_rm_gc_check(populated, snapfs_env):
    p = run(snapfs_env, "rm", "base", "nope")
    assert p.returncode == 7 and "nothing removed" in p.stderr
    assert len(json.loads(run(snapfs_env, "list", "--json").stdout)) == 2
    p = run(snapfs_env, "rm", "base")
    assert p.returncode == 0 and p.stdout.startswith("removed base; reclaimed ")
    # The child says where its chain goes now.
    (line,) = run(snapfs_env, "list").stdout.splitlines()[1:]
    assert line.startswith("child ") and line.rstrip().endswith(" - (base removed)")
    assert "parent:    - (base removed)" in run(snapfs_env, "info", "child").stdout
    info = json.loads(run(snapfs_env, "info", "child", "--json").stdout)
    assert info["parent"] is None and info["removed_parents"] == ["base"]
    p = run(snapfs_env, "check", "--verify-data")
    assert p.returncode == 0 and p.stdout.strip().endswith("OK") and ": 1 snapshot, " in p.stdout
    p = run(snapfs_env, "gc", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["bytes_reclaimed"] == 0
    # An abandoned capture: gc removes it and says so.
    with Store.open(populated) as store:
        w = store.begin_snapshot("abandoned", {})
        from snapfs.store import RegionSpec
        w.add_region(RegionSpec("a", 0, 64 * 4096))
        w.put_pages(0, 0, os.urandom(64 * 4096))
        w._release()           # simulate death: the lock is gone, the rows and segment remain
    p = run(snapfs_env, "check")
    assert p.returncode == 0 and "reclaimable by `snapfs gc`: 1 unfinished snapshot\n" in p.stdout
    p = run(snapfs_env, "gc")
    assert p.returncode == 0 and "1 unfinished snapshot removed" in p.stdout
    assert "reclaimed 0 B" not in p.stdout


@pytest.mark.parametrize("command", ["list", "info", "rm", "gc", "check"])
def test_every_store_command_describes_itself(store_dir, snapfs_env, command):
    """`snapfs CMD --help` says what the command does, not only its usage line; `rm` says
    what becomes of a removed snapshot's children."""
    p = run(snapfs_env, command, "--help")
    assert p.returncode == 0
    usage, _, rest = p.stdout.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert not description.startswith(("positional arguments", "options")) and len(description) > 80
    if command == "rm":
        assert "Children" in description and "readable" in description


def test_check_reports_damage_with_exit_code(populated, snapfs_env):
    with Store.open(populated) as store:
        seg, off, flen = store.query("SELECT seg, off, flen FROM frames ORDER BY seg, off LIMIT 1")[0]
        path = store.segments.path(seg)
    with open(path, "r+b") as f:
        f.seek(off + 40)
        f.write(b"\xff\x00\xff")
    p = run(snapfs_env, "check", "--verify-data")
    assert p.returncode == 6
    assert ": 1 problem\n" in p.stdout and f"{path}@{off}" in p.stdout and "base:region0" in p.stdout
    report = json.loads(run(snapfs_env, "check", "--verify-data", "--json").stdout)
    assert report["ok"] is False and report["problems"][0]["offset"] == off
    assert run(snapfs_env, "check").returncode == 0     # without --verify-data frames are not read
    with open(populated / "catalog.sqlite", "r+b") as f:
        f.write(b"garbage!" * 20)
    for name in ("catalog.sqlite-wal", "catalog.sqlite-shm"):
        if (populated / name).exists():
            os.unlink(populated / name)
    p = run(snapfs_env, "check", "--json")
    assert p.returncode == 6 and json.loads(p.stdout)["problems"][0]["what"] == "catalog"
    p = run(snapfs_env, "list")
    assert p.returncode == 6 and p.stderr.count("\n") == 1 and "is damaged" in p.stderr
