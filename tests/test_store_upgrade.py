"""Format version 1 stores (no catalog checksums) still open: read unverified with a warning,
upgraded to version 2 by the first write, which checksums every row as it is."""

from __future__ import annotations

import json
import logging
import sqlite3

import pytest

from snapfs.cli import main
from snapfs.store import Store
from snapfs.store._integrity import COLUMNS
from tests.support.synthetic import expected_image, write_synthetic

PAGE = 4096


def _as_version_1(store_dir) -> None:
    """Turn a store into what format 1 wrote: no checksum columns, config version 1."""
    conn = sqlite3.connect(store_dir / "catalog.sqlite")
    for table, column in COLUMNS:
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.commit()
    conn.close()
    cfg = json.loads((store_dir / "config.json").read_text())
    (store_dir / "config.json").write_text(json.dumps({**cfg, "version": 1}))


def _files(store_dir):
    return {p.name: p.read_bytes() for p in store_dir.iterdir() if p.is_file() and "-" not in p.name}


@pytest.fixture
def v1_store(store_dir):
    with Store.open(store_dir) as store:
        write_synthetic(store, "a", 1, [300, 20])
        write_synthetic(store, "b", 1, [300, 20], version=1, parent="a")
        write_synthetic(store, "c", 1, [300, 20], version=2, parent="b")
    # Format 1 left a removed parent's name in its child's row: make it so.
    conn = sqlite3.connect(store_dir / "catalog.sqlite")
    conn.execute("UPDATE snapshots SET parent_id=999, parent_name='gone' WHERE name='a'")
    conn.commit()
    conn.close()
    _as_version_1(store_dir)
    return store_dir


def test_version_1_is_read_unverified_and_never_changed_by_reading(v1_store, caplog, capsys):
    before = _files(v1_store)
    with caplog.at_level(logging.WARNING, logger="snapfs.store"):
        with Store.open(v1_store, create=False) as store:
            assert not store.checksums
            assert [s.name for s in store.list_snapshots()] == ["a", "b", "c"]
            r = store.open_snapshot("c")
            assert r.read(0, 0, 300 * PAGE) == expected_image(1, 0, 300, version=2)
            report = store.check(verify_data=True)
            assert report["ok"] and "format 1" in report["notes"][0]
    assert "format version 1" in caplog.text and "read unverified" in caplog.text
    assert main(["check", "--store", str(v1_store)]) == 0
    assert "note: catalog format 1" in capsys.readouterr().out
    assert _files(v1_store) == before
    assert json.loads((v1_store / "config.json").read_text())["version"] == 1


@pytest.mark.parametrize("write", ["snapshot", "rm", "gc"])
def test_first_write_upgrades_to_version_2(v1_store, write, caplog):
    with caplog.at_level(logging.WARNING, logger="snapfs.store"):
        with Store.open(v1_store) as store:
            if write == "snapshot":
                write_synthetic(store, "d", 1, [300, 20], version=3, parent="c")
            elif write == "rm":
                store.remove("b")
            else:
                store.gc()
            assert store.checksums
    assert "upgraded to format version 2" in caplog.text
    assert json.loads((v1_store / "config.json").read_text())["version"] == 2
    with Store.open(v1_store, create=False) as store:
        assert store.checksums
        report = store.check(verify_data=True)
        assert report["ok"] and report["notes"] == [], report
        assert store.open_snapshot("c").read(0, 0, 300 * PAGE) == expected_image(1, 0, 300, version=2)
        a = store.info("a")
        assert (a.parent, a.removed_parents) == (None, ["gone"])
        conn = sqlite3.connect(v1_store / "catalog.sqlite")
        assert conn.execute("SELECT count(*) FROM regions WHERE crc IS NULL OR map_crc IS NULL").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM snapshots WHERE crc IS NULL").fetchone()[0] == 0
        conn.close()


def test_a_map_already_damaged_stays_damaged_after_the_upgrade(v1_store):
    """The upgrade checksums what decodes; a map that does not stays without a checksum,
    which format 2 reports as damage (never certified)."""
    conn = sqlite3.connect(v1_store / "catalog.sqlite")
    conn.execute("UPDATE regions SET map=x'00112233' WHERE idx=1 AND snapshot_id="
                 "(SELECT id FROM snapshots WHERE name='b')")
    conn.commit()
    conn.close()
    with Store.open(v1_store) as store:
        store.remove("c")
        problems = store.check()["problems"]
        assert [(p["what"], p["snapshots"]) for p in problems] == [("map", ["b"])]
        assert store.open_snapshot("b").read(0, 0, 300 * PAGE) == expected_image(1, 0, 300, version=1)
