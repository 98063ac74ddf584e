"""The freeze's union of the populated pages known from pre-protection with the pages found
written since (protect._with_written): every page once, written ones marked, each piece in
its VMA, sorted — on both of its paths (few known pieces: all merged; many: only those a
written piece overlaps are cut)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs.capture import kernel as k
from snapfs.capture.protect import _with_written

PAGE = k.PAGE_SIZE
N = 160  # pages


def _pieces(pages: set[int], vma_of: np.ndarray, cat: dict[int, int]):
    """Sorted maximal runs of ``pages``, cut where the VMA or the category changes."""
    lo, hi, c, vi = [], [], [], []
    for p in sorted(pages):
        if lo and hi[-1] == p and vi[-1] == vma_of[p] and c[-1] == cat.get(p, 0):
            hi[-1] = p + 1
            continue
        lo.append(p), hi.append(p + 1), c.append(cat.get(p, 0)), vi.append(int(vma_of[p]))
    u = np.uint64
    return (np.array(lo, u) * u(PAGE), np.array(hi, u) * u(PAGE), np.array(c, u), np.array(vi, np.int64))


@settings(max_examples=300, deadline=None)
@given(cuts=st.sets(st.integers(1, N - 1), max_size=30),
       gaps=st.sets(st.integers(0, N - 1), max_size=40),
       known=st.sets(st.integers(0, N - 1)),
       dense=st.booleans(),
       written=st.sets(st.integers(0, N - 1), max_size=12),
       huge=st.sets(st.integers(0, N - 1), max_size=40))
def test_union_of_known_and_written_pages(cuts, gaps, known, dense, written, huge):
    if dense:  # many known pieces (80+) against at most 12 written: the cutting path
        known = known | set(range(0, N, 2))
    bounds = [0, *sorted(cuts), N]
    vma_of = np.searchsorted(np.array(bounds[1:]), np.arange(N), side="right")
    starts = np.array(bounds[:-1], np.uint64) * np.uint64(PAGE)
    # Pages outside any VMA ("gaps") hold nothing.
    known, written = known - gaps, written - gaps
    cat = {p: k.PAGE_IS_HUGE for p in huge}
    base = _pieces(known, vma_of, cat)
    wr = _pieces(written, vma_of, {})
    lo, hi, c, vi = _with_written(base, wr, starts)
    assert np.all(lo[1:] >= hi[:-1]) and np.all(hi > lo)  # sorted, disjoint, not empty
    got: dict[int, tuple[int, int]] = {}
    for a, b, cc, v in zip(lo.tolist(), hi.tolist(), c.tolist(), vi.tolist()):
        for p in range(a // PAGE, b // PAGE):
            assert p not in got
            got[p] = (cc, v)
    assert set(got) == known | written
    for p, (cc, v) in got.items():
        assert v == vma_of[p]
        assert bool(cc & k.PAGE_IS_WRITTEN) == (p in written)
        if p not in written:
            assert cc == cat.get(p, 0)


# ---------------------------------------------------------------- the split scans
_MIB = 1 << 20


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 600)), min_size=1, max_size=12),
       st.integers(2, 4))
def test_split_scans_cover_the_spans_once_in_order_and_balance_mapped_bytes(vmas, parts):
    """The instant's scans split into shares (protect._scan_cuts, _cut_spans): together
    exactly the spans, in address order, cut on 2 MiB boundaries only inside a VMA, and
    balanced by the bytes mapped (not by address distance: a gap between mappings costs
    nothing to walk)."""
    from snapfs.capture.protect import _cut_spans, _scan_cuts

    starts, ends, at = [], [], 0
    for gap, size in vmas:  # VMAs of `size` MiB, `gap` GiB apart
        at += gap << 30
        starts.append(at)
        ends.append(at + size * _MIB)
        at += size * _MIB
    spans = [(starts[0], ends[-1])]  # one span over all of them, gaps included
    cuts = _scan_cuts(spans, np.array(starts, np.uint64), np.array(ends, np.uint64), parts, 2 * _MIB)
    groups = _cut_spans(spans, cuts)
    flat = [r for g in groups for r in g]
    assert flat[0][0] == spans[0][0] and flat[-1][1] == spans[0][1]
    assert all(a < b for a, b in flat) and all(b == c for (_, b), (c, _) in zip(flat, flat[1:]))
    assert all(c % (2 * _MIB) == 0 or c in starts for c in cuts)
    mapped = [sum(max(0, min(b, e) - max(a, s)) for a, b in g for s, e in zip(starts, ends)) for g in groups]
    total = sum(e - s for s, e in zip(starts, ends))
    # Each share within a VMA's worth of rounding (2 MiB) of its part, unless one VMA alone
    # is more than a share (then it is cut: still within 2 MiB).
    assert max(mapped) - min(mapped) <= 2 * 2 * _MIB + (total // parts if len(groups) < parts else 0)
