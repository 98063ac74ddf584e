"""gc, a writer and readers at once on one store: readers never see wrong bytes."""

from __future__ import annotations

import threading

import numpy as np

from snapfs.errors import SnapshotNotFound
from snapfs.store import Store
from tests.support.synthetic import expected_image, write_synthetic

PAGES = 1200
PAGE = 4096


def test_gc_while_writing_and_reading(store_dir):
    writer_store, reader_store, gc_store = (Store.open(store_dir) for _ in range(3))
    write_synthetic(writer_store, "v0", 1, [PAGES])
    expected = {v: expected_image(1, 0, PAGES, version=v, changed_fraction=0.9) for v in range(7)}
    expected[0] = expected_image(1, 0, PAGES)
    done = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def write():
        try:
            for v in range(1, 7):
                write_synthetic(writer_store, f"v{v}", 1, [PAGES], version=v, parent=f"v{v - 1}",
                                changed_fraction=0.9)
                writer_store.remove([f"v{v - 1}"])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    def read():
        rng = np.random.default_rng(0)
        try:
            while not done.is_set():
                for info in reader_store.list_snapshots():
                    v = int(info.name[1:])
                    try:
                        r = reader_store.open_snapshot(info.name)
                        off = int(rng.integers(0, PAGES)) * PAGE
                        assert r.read(0, off, 64 * PAGE) == expected[v][off:off + 64 * PAGE], info.name
                        reads[0] += 1
                    except SnapshotNotFound:
                        pass              # removed meanwhile: never wrong bytes, a clean error
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    reclaimed = 0
    while not done.is_set():
        reclaimed += gc_store.gc()["bytes_reclaimed"]
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    reclaimed += gc_store.gc()["bytes_reclaimed"]
    assert reclaimed > 0 and reads[0] > 0
    assert [s.name for s in gc_store.list_snapshots()] == ["v6"]
    assert gc_store.open_snapshot("v6").read(0, 0, PAGES * PAGE) == expected[6]
    report = gc_store.check(verify_data=True)
    assert report["ok"] and report["garbage"]["unreferenced_frames"] == 0
    for s in (writer_store, reader_store, gc_store):
        s.close()
