"""Per-page 64-bit content hashes for content-comparison incrementals.

XXH3-64 through libxxhash (a dependency of apt, so present on Debian/Ubuntu) runs at several
GB/s, eight times blake2b through hashlib; blake2b-64 is the fallback. Many pages are hashed
in one call of a small C helper (``pagehash.c``, compiled at install time into
``snapfs.store._native``): no Python and no GIL per page, so the other compression thread runs
meanwhile. The algorithm is stored next to each hash chunk: a child only compares with a
parent hashed the same way (otherwise it simply stores every page — never a wrong match). Value 0 means "no data page";
real hashes have their low bit forced to 1.
"""

from __future__ import annotations

import ctypes
import hashlib
from itertools import repeat

import numpy as np

from snapfs import native

PAGE = 4096

# Through ctypes.PyDLL, which keeps the GIL across the call: XXH3 of a page takes ~0.3 us, less
# than releasing and re-taking the GIL per page would cost with a second put thread running.
# map() over precomputed addresses keeps the Python per page to one C-level call (~0.5 us).
try:
    _xxh3 = ctypes.PyDLL("libxxhash.so.0").XXH3_64bits
    _xxh3.restype = ctypes.c_uint64
    _xxh3.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ALGO = "xxh3-64"
except (OSError, AttributeError):                 # pragma: no cover - depends on the system
    _xxh3 = None
    ALGO = "blake2b-64"


NATIVE_MIN_PAGES = 16        # fewer: the per-page map below has less set-up

_ext = native.load("snapfs.store._native")
_ffi, _lib = _ext.ffi, _ext.lib
_xxh3_fn = _ffi.cast("void *", ctypes.cast(_xxh3, ctypes.c_void_p).value) if _xxh3 is not None else None


def _page_addresses(view: memoryview, idx: np.ndarray) -> list[int]:
    """Addresses of pages ``idx`` of ``view`` (valid while ``view`` is alive)."""
    base = np.frombuffer(view, np.uint8).ctypes.data
    return (np.asarray(idx, np.uint64) * np.uint64(PAGE) + np.uint64(base)).tolist()


def page_hashes(view: memoryview, idx: np.ndarray) -> np.ndarray:
    """Hashes of pages ``idx`` of ``view`` (uint64, low bit 1)."""
    if len(idx) == 0:
        return np.zeros(0, np.uint64)
    if _xxh3 is not None:
        if len(view) < (int(idx.max()) + 1) * PAGE or int(idx.min()) < 0:
            raise IndexError("page_hashes: page index outside the buffer")
        if len(idx) >= NATIVE_MIN_PAGES and not native.disabled():
            pages = np.ascontiguousarray(idx, np.int64)
            out = np.empty(len(pages), np.uint64)
            buf = _ffi.from_buffer
            _lib.snapfs_hash_pages(_xxh3_fn, buf("uint8_t[]", view), buf("int64_t[]", pages), len(pages),
                                   buf("uint64_t[]", out))
            return out
        addrs = _page_addresses(view, idx)
        out = np.fromiter(map(_xxh3, addrs, repeat(PAGE, len(addrs))), np.uint64, len(addrs))
    else:
        b2 = hashlib.blake2b
        digests = b"".join(b2(view[i * PAGE:(i + 1) * PAGE], digest_size=8).digest() for i in idx.tolist())
        out = np.frombuffer(digests, "<u8").copy()
    out |= np.uint64(1)
    return out


def page_hash_list(view: memoryview, idx: list[int]) -> list[int]:
    """:func:`page_hashes` for a handful of pages, as Python ints (no numpy set-up cost)."""
    if _xxh3 is not None:
        if any(i < 0 or (i + 1) * PAGE > len(view) for i in idx):
            raise IndexError("page_hash_list: page index outside the buffer")
        base = np.frombuffer(view, np.uint8).ctypes.data
        return [_xxh3(base + i * PAGE, PAGE) | 1 for i in idx]
    return [int.from_bytes(hashlib.blake2b(view[i * PAGE:(i + 1) * PAGE], digest_size=8).digest(), "little") | 1
            for i in idx]
