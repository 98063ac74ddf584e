"""Runs of consecutive values and sets of address ranges, computed with numpy on endpoints.

*Runs*: sorted values split where they stop advancing by ``step`` (:func:`run_starts`). The
capture engine's page runs of a bool mask (:func:`runs_of`), the ranges of sorted page
addresses (:func:`ranges_of_values`) and the store's page-map runs (``store._runs.make_runs``)
all cut there.

*Range sets*: (n, 2) int64 arrays of [start, end), sorted and disjoint (:func:`norm` makes
one of any ranges): the capture engine's sets of written, populated and copied memory.
Every operation below works on range endpoints, never page by page, so a GiB costs what its
ranges cost. Operands must be range sets unless a docstring says otherwise.
"""

from __future__ import annotations

import numpy as np

EMPTY = np.empty((0, 2), dtype=np.int64)


# ---------------------------------------------------------------- runs
def run_starts(values: np.ndarray, step: int = 1) -> np.ndarray:
    """True per element that starts a run: the first, and every one that is not its
    predecessor plus ``step``."""
    heads = np.ones(len(values), bool)
    if len(values) > 1:
        heads[1:] = np.diff(np.asarray(values, np.int64)) != step
    return heads


def ranges_of_values(values: np.ndarray, step: int) -> np.ndarray:
    """The range set covered by sorted, distinct ``values`` taken as [v, v + step) each
    (page addresses with ``step`` the page size, or page numbers with 1)."""
    if not len(values):
        return EMPTY
    values = np.asarray(values, np.int64)
    heads = np.flatnonzero(run_starts(values, step))
    lasts = np.r_[heads[1:], len(values)] - 1
    return np.stack([values[heads], values[lasts] + step], axis=1)


def positions_in_runs(counts: np.ndarray) -> np.ndarray:
    """For runs of ``counts`` elements laid end to end, each element's position within its
    run: counts [2, 3] give [0, 1, 0, 1, 2]."""
    counts = np.asarray(counts, np.int64)
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """``(first, count)`` runs of True in a bool array."""
    r = ranges_of_values(np.flatnonzero(mask), 1)
    return [(int(s), int(e - s)) for s, e in r.tolist()]


# ---------------------------------------------------------------- range sets
def norm(r: np.ndarray) -> np.ndarray:
    """Any (n, 2) [start, end) ranges as a range set: sorted, overlapping or touching ones
    merged, empty ones dropped."""
    r = r[r[:, 1] > r[:, 0]]
    if len(r) < 2:
        return r
    r = r[np.argsort(r[:, 0], kind="stable")]
    reach = np.maximum.accumulate(r[:, 1])
    head = np.ones(len(r), bool)
    head[1:] = r[1:, 0] > reach[:-1]
    starts = np.flatnonzero(head)
    last = np.r_[starts[1:], len(r)] - 1
    return np.stack([r[starts, 0], reach[last]], axis=1)


def union(*sets: np.ndarray) -> np.ndarray:
    """The union of any ranges (normalised)."""
    return norm(np.concatenate(sets)) if sets else EMPTY


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a ∩ b."""
    if not len(a) or not len(b):
        return EMPTY
    lo = np.searchsorted(b[:, 1], a[:, 0], side="right")
    hi = np.searchsorted(b[:, 0], a[:, 1], side="left")
    count = np.maximum(hi - lo, 0)
    ai = np.repeat(np.arange(len(a)), count)
    bi = positions_in_runs(count) + np.repeat(lo, count)
    s = np.maximum(a[ai, 0], b[bi, 0])
    e = np.minimum(a[ai, 1], b[bi, 1])
    keep = e > s
    return np.stack([s[keep], e[keep]], axis=1)


def subtract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a \\ b."""
    if not len(a) or not len(b):
        return a
    lo, hi = min(int(a[0, 0]), int(b[0, 0])), max(int(a[-1, 1]), int(b[-1, 1]))
    gaps = np.stack([np.r_[lo, b[:, 1]], np.r_[b[:, 0], hi]], axis=1)
    return intersect(a, gaps[gaps[:, 1] > gaps[:, 0]])


def clip(r: np.ndarray, start: int, end: int) -> np.ndarray:
    """r ∩ [start, end)."""
    return intersect(r, np.array([[start, end]], dtype=np.int64))


def nbytes(r: np.ndarray) -> int:
    """The total length of the ranges."""
    return int((r[:, 1] - r[:, 0]).sum()) if len(r) else 0


def contains(r: np.ndarray, addrs: np.ndarray) -> np.ndarray:
    """True per address that lies in one of the ranges."""
    if not len(r):
        return np.zeros(len(addrs), bool)
    i = np.searchsorted(r[:, 0], addrs, side="right") - 1
    return (i >= 0) & (addrs < r[np.maximum(i, 0), 1])


def starts_every(r: np.ndarray, step: int) -> np.ndarray:
    """Every multiple-of-``step`` offset from each range's start, ascending: the page
    addresses of ranges whose ends are page-aligned (the inverse of :func:`ranges_of_values`)."""
    n = (r[:, 1] - r[:, 0]) // step
    return np.repeat(r[:, 0], n) + positions_in_runs(n) * step


def coarsen(r: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` ranges covering ``r``: cut only at its largest gaps."""
    if len(r) <= limit:
        return r
    gaps = r[1:, 0] - r[:-1, 1]
    cut = np.sort(np.argsort(gaps, kind="stable")[len(gaps) - (limit - 1):])
    return np.stack([r[np.r_[0, cut + 1], 0], r[np.r_[cut, len(r) - 1], 1]], axis=1)
