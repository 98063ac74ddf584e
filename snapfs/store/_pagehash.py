"""Per-page 64-bit content hashes for content-comparison incrementals.

XXH3-64 through libxxhash (a dependency of apt, so present on Debian/Ubuntu) runs at several
GB/s, eight times blake2b through hashlib; blake2b-64 is the fallback. Pages are hashed in
one call of a small C helper (``pagehash.c``, compiled at install time into
``snapfs.store._native``, which finds libxxhash by its soname): no Python and no GIL per
page, so the other compression thread runs meanwhile. The algorithm is stored next to each
hash chunk: a child only compares with a parent hashed the same way (otherwise it simply
stores every page — never a wrong match). Value 0 means "no data page"; real hashes have
their low bit forced to 1.
"""

from __future__ import annotations

import hashlib

import numpy as np

from snapfs import native
from snapfs.store.model import STORE_PAGE

_ext = native.load("snapfs.store._native")
_ffi, _lib = _ext.ffi, _ext.lib
_xxh3 = bool(_lib.snapfs_xxh3_available())
ALGO = "xxh3-64" if _xxh3 else "blake2b-64"


def _check_bounds(view: memoryview, lo: int, hi: int) -> None:
    if lo < 0 or len(view) < (hi + 1) * STORE_PAGE:
        raise IndexError("page hashes: page index outside the buffer")


def page_hashes(view: memoryview, idx: np.ndarray) -> np.ndarray:
    """Hashes of pages ``idx`` of ``view`` (uint64, low bit 1)."""
    if len(idx) == 0:
        return np.zeros(0, np.uint64)
    pages = np.ascontiguousarray(idx, np.int64)
    _check_bounds(view, int(pages.min()), int(pages.max()))
    if _xxh3:
        out = np.empty(len(pages), np.uint64)
        buf = _ffi.from_buffer
        _lib.snapfs_hash_pages(buf("uint8_t[]", view), buf("int64_t[]", pages), len(pages), buf("uint64_t[]", out))
        return out
    b2 = hashlib.blake2b
    digests = b"".join(b2(view[i * STORE_PAGE:(i + 1) * STORE_PAGE], digest_size=8).digest() for i in pages.tolist())
    out = np.frombuffer(digests, "<u8").copy()
    out |= np.uint64(1)
    return out


def page_hash_list(view: memoryview, idx: list[int]) -> list[int]:
    """:func:`page_hashes` for a handful of pages, as Python ints."""
    return page_hashes(view, np.array(idx, np.int64)).tolist() if idx else []
