"""The one-copy page path (``SnapshotReader.read_pages_into``) behind the ``vmstate`` view and the ``data`` files.

Compared byte for byte with the store's own ``SnapshotReader.read`` path, on a snapshot whose
page runs are fragmented (many short data runs between zero pages and holes, dedup references
to earlier frames) and on one with long runs, at random offsets and sizes.
"""

from __future__ import annotations

import random

import numpy as np

from snapfs.fs.views import RegionDataView
from snapfs.store import RegionSpec, Store
from snapfs.stream.vmstate import VmstateView
from snapfs.stream.writer import StreamLayout

PAGE = 4096


def _snapshot(store: Store) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    frag = rng.integers(0, 256, size=(3000, PAGE), dtype=np.uint8)
    frag[rng.random(3000) < 0.4] = 0  # scattered zero pages: hundreds of short data runs
    frag[2000:2100] = frag[100:200]  # duplicates: dedup points back at earlier frames
    long = rng.integers(0, 3, size=(700, PAGE), dtype=np.uint8)
    imgs = {"frag": frag, "long": long}
    w = store.begin_snapshot("p", {"kind": "process", "pid": 1, "comm": "t"})
    a = w.add_region(RegionSpec("frag", 0x10000000, frag.size, kind="anon"))
    w.put_pages(a, 0, frag[:1500].tobytes())
    w.put_pages(a, 1700, frag[1700:].tobytes())  # pages 1500..1699 stay holes
    b = w.add_region(RegionSpec("long", 0x20000000, long.size, kind="anon"))
    w.put_pages(b, 0, long.tobytes())
    w.commit({})
    return imgs


def test_vmstate_one_copy_path_matches_reader_path(store_dir):
    with Store.open(store_dir, create=True) as store:
        _snapshot(store)
        reader = store.open_snapshot("p")
        view = VmstateView(reader)
        assert view._layout._read_into == reader.read_pages_into  # the fast path is under test
        reference = StreamLayout(view._layout._pieces, reader.read)  # reader.read only
        whole = reference.read(0, reference.size)
        assert len(whole) == view.size
        rnd = random.Random(5)
        for _ in range(400):
            off = rnd.randrange(view.size)
            n = rnd.choice([1, 9, 4104, 4105, 65536, 1 << 20, 5 << 20])
            got = view.read_buffer(off, n)
            assert bytes(got) == whole[off : off + n] == view.read(off, n)
        assert b"".join(view.iter_chunks(1 << 20)) == whole


def test_data_file_read_buffer_matches_images(store_dir):
    with Store.open(store_dir, create=True) as store:
        imgs = _snapshot(store)
        imgs["frag"][1500:1700] = 0
        reader = store.open_snapshot("p")
        rnd = random.Random(6)
        for region in reader.regions:
            view = RegionDataView(reader, region)
            image = imgs[region.name].tobytes()
            assert bytes(view.read_buffer(0, region.length)) == image
            for _ in range(200):
                off = rnd.randrange(0, region.length, PAGE) + rnd.choice([0, 0, 1, 100])
                n = rnd.choice([PAGE, 3 * PAGE, 1 << 20, 4095])
                assert bytes(view.read_buffer(off, n)) == image[off : off + n]
