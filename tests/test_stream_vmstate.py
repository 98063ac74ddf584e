"""The ``vmstate`` view over real store snapshots: exact size, random access, determinism."""

from __future__ import annotations

import io
import random
import struct

import numpy as np
import pytest

from snapfs.store import RegionSpec, Store
from snapfs.stream import format as F
from snapfs.stream.reader import EV_BLOCKS, EV_END, EV_HEADER, EV_PAGE, EV_ZERO, read_stream
from snapfs.stream.vmstate import VmstateView, block_idstr

PAGE = 4096


def _images(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    heap = rng.integers(0, 256, size=(300, PAGE), dtype=np.uint8)
    heap[10:40] = 0  # zero pages
    heap[100:180] = 0  # becomes holes (never put)
    anon = rng.integers(0, 4, size=(64, PAGE), dtype=np.uint8)  # compressible data
    stack = np.zeros((16, PAGE), np.uint8)
    return {"heap": heap, "anon-7f0000001000": anon, "stack": stack}


def make_snapshot(store: Store, name: str = "p1") -> dict[str, np.ndarray]:
    """A process-kind snapshot with data, zero and hole pages; returns the expected images."""
    imgs = _images()
    w = store.begin_snapshot(name, {"kind": "process", "pid": 1234, "comm": "test"})
    for i, (rname, img) in enumerate(imgs.items()):
        kind = rname if rname in ("heap", "stack") else "anon"
        idx = w.add_region(RegionSpec(rname, 0x10000000 * (i + 1), img.size, kind=kind))
        if rname == "heap":
            w.put_pages(idx, 0, img[:100].tobytes())
            w.put_pages(idx, 180, img[180:].tobytes())
        elif rname == "anon-7f0000001000":
            w.put_pages(idx, 0, img.tobytes())
    w.commit({})
    return imgs


def replay(data: bytes) -> tuple[list, dict[str, bytearray], list[str]]:
    """Parse a stream and rebuild each RAMBlock; also list the record kinds seen per page."""
    blocks: list = []
    images: dict[str, bytearray] = {}
    kinds: list[str] = []
    for ev in read_stream(io.BytesIO(data)):
        if ev[0] == EV_BLOCKS:
            blocks = ev[2]
            images = {b.name: bytearray(b.length) for b in blocks}
        elif ev[0] in (EV_PAGE, EV_ZERO):
            img = images[blocks[ev[1]].name]
            img[ev[2] * PAGE : (ev[2] + 1) * PAGE] = ev[3] if ev[0] == EV_PAGE else bytes(PAGE)
            kinds.append(ev[0])
        elif ev[0] == EV_HEADER:
            assert ev[1].machine == "none"
        elif ev[0] == EV_END:
            assert b'"devices": []' in ev[1]
    return blocks, images, kinds


def test_process_snapshot_stream_is_exact_random_access_and_deterministic(store_dir):
    with Store.open(store_dir, create=True) as store:
        imgs = make_snapshot(store)
        reader = store.open_snapshot("p1")
        view = VmstateView(reader)
        size = view.size
        whole = b"".join(view.iter_chunks(100_000))
        assert len(whole) == size
        assert view.read(size, 10) == b"" and view.read(size - 3, 10) == whole[-3:]
        rng = random.Random(3)
        for _ in range(300):
            off = rng.randrange(size)
            n = rng.choice((1, 7, 4104, 131072, rng.randrange(1, 600_000)))
            assert view.read(off, n) == whole[off : off + n], (off, n)
        # Same snapshot, new view, new reader: same bytes.
        again = VmstateView(store.open_snapshot("p1"))
        assert again.size == size and again.read(0, size) == whole

        blocks, images, kinds = replay(whole)
        assert [(b.name, b.length) for b in blocks] == [(k, v.size) for k, v in imgs.items()]
        for name, img in imgs.items():
            assert images[name] == img.tobytes(), name
        # Every page is sent exactly once: holes and zero pages as ZERO, the rest as PAGE.
        total_pages = sum(v.shape[0] for v in imgs.values())
        data_pages = sum(int(v.any(axis=1).sum()) for v in imgs.values())
        assert len(kinds) == total_pages and kinds.count(EV_PAGE) == data_pages


def test_size_is_exact_before_any_read(store_dir):
    with Store.open(store_dir, create=True) as store:
        imgs = make_snapshot(store)
        view = VmstateView(store.open_snapshot("p1"))
        n_data = sum(int(v.any(axis=1).sum()) for v in imgs.values())
        n_zero = sum(v.shape[0] for v in imgs.values()) - n_data
        names = [block_idstr(n) for n in imgs]
        per_block = sum(5 + 1 + len(n) + 8 + 5 for n in names)  # PART hdr, idstr, EOS, footer
        start = 5 + 4 + 8 + 8 + sum(1 + len(n) + 8 for n in names) + 8 + 5
        tail_len = len(view.read(view.size - 2000, 2000)) - view.read(view.size - 2000, 2000).index(b"\x00\x06")
        expect = 8 + 9 + start + per_block + n_data * (8 + PAGE) + n_zero * 9 + tail_len
        assert view.size == expect


def test_vmdescription_length_never_contains_brace():
    for n in range(0x60, 0x90):
        doc = {"page_size": 4096, "devices": [], "x": "a" * n}
        raw = F.vmdescription(doc)
        (length,) = struct.unpack(">I", raw[1:5])
        assert 0x7B not in raw[1:5] and len(raw) == 5 + length


def test_long_region_names_become_valid_idstrs():
    name = "x" * 300 + "-7f00"
    idstr = block_idstr(name)
    assert len(idstr) == 255 and idstr != block_idstr("x" * 300 + "-7f01")


def _naive_records(region_pages: bytes, name: bytes, runs) -> bytes:
    """Reference encoding, one record at a time."""
    out = []
    first = True
    for p0, n, data in runs:
        for p in range(p0, p0 + n):
            flags = (F.RAM_PAGE if data else F.RAM_ZERO) | (0 if first else F.RAM_CONTINUE)
            rec = struct.pack(">Q", p * PAGE | flags) + (F.counted(name) if first else b"")
            rec += region_pages[p * PAGE : (p + 1) * PAGE] if data else b"\0"
            out.append(rec)
            first = False
    return b"".join(out)


@pytest.mark.parametrize("seed", range(12))
def test_block_records_match_naive_encoding_at_any_offset(seed):
    from snapfs.stream.writer import BlockRecords, StreamLayout

    rng = random.Random(seed)
    npages = rng.randrange(1, 3000)
    pages = np.random.default_rng(seed).integers(0, 256, size=npages * PAGE, dtype=np.uint8).tobytes()
    runs, p = [], rng.randrange(0, 3)
    while p < npages:
        n = min(rng.choice((1, 1, 2, 5, 40, 700)), npages - p)
        runs.append((p, n, rng.random() < 0.5))
        p += n + (rng.randrange(0, 3) if rng.random() < 0.2 else 0)  # gaps: pages not sent
    name = b"blk-%d" % seed
    expect = _naive_records(pages, name, runs)
    calls = []

    def read_pages(region, off, size):
        calls.append(size)
        return pages[off : off + size]

    layout = StreamLayout([BlockRecords(0, F.counted(name), runs)], read_pages)
    assert layout.size == len(expect)
    assert layout.read(0, layout.size) == expect
    for _ in range(200):
        off = rng.randrange(len(expect))
        n = rng.choice((1, 9, 4104, 70_000, rng.randrange(1, 200_000)))
        assert layout.read(off, n) == expect[off : off + n], (off, n)
    assert max(calls) <= 8192 * PAGE  # page data fetched per bounded window


def test_read_pages_into_scatter_rows(store_dir):
    """The scatter form behind the vmstate records: page ``pages[i]`` lands in ``dest[rows[i]]``
    of a destination whose 4096-byte rows start at arbitrary byte offsets (a strided view);
    holes and zero pages become zeros; bytes between the rows are left alone."""
    from numpy.lib.stride_tricks import as_strided

    with Store.open(store_dir, create=True) as store:
        imgs = make_snapshot(store)
        imgs["heap"][100:180] = 0
        reader = store.open_snapshot("p1")
        rng = np.random.default_rng(11)
        for region in reader.regions:
            img = imgs[region.name]
            for _ in range(20):
                pages = np.sort(rng.choice(len(img), size=rng.integers(1, len(img) + 1), replace=False))
                gaps = rng.integers(0, 20, size=len(pages))  # irregular spacing, like 9-byte records
                rows = np.cumsum(gaps + PAGE) - PAGE
                out = np.full(int(rows[-1]) + PAGE, 0xA5, np.uint8)
                dest = as_strided(out, shape=(len(out) - PAGE + 1, PAGE), strides=(1, 1))
                reader.read_pages_into(region.index, pages, dest, rows)
                expect = np.full_like(out, 0xA5)
                for p, r in zip(pages.tolist(), rows.tolist()):
                    expect[r : r + PAGE] = img[p]
                assert np.array_equal(out, expect)
        with pytest.raises(ValueError):
            reader.read_pages_into(0, np.arange(3), np.empty((3, PAGE), np.uint8))
