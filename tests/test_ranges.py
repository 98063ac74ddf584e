"""snapfs.ranges against a model that counts every unit: runs and range-set algebra hold for
any input (hypothesis), including empty, touching and overlapping ranges."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs import ranges as rs

DOMAIN = 200  # small coordinates: overlaps, touching ends and duplicates come up often

pairs = st.lists(st.tuples(st.integers(0, DOMAIN), st.integers(0, DOMAIN)), max_size=12)


def raw(p: list[tuple[int, int]]) -> np.ndarray:
    """Any [start, end) ranges, unsorted, possibly empty or overlapping."""
    return np.array(p, dtype=np.int64).reshape(-1, 2)


def units(r: np.ndarray) -> set[int]:
    return {x for s, e in r.tolist() for x in range(s, e)}


def is_set(r: np.ndarray) -> bool:
    """Sorted, disjoint, non-touching, non-empty ranges: the normal form."""
    return r.shape[1:] == (2,) and bool((r[:, 1] > r[:, 0]).all()) and bool((r[1:, 0] > r[:-1, 1]).all())


@settings(deadline=None)
@given(pairs)
def test_norm_keeps_the_units_in_normal_form(p):
    r = rs.norm(raw(p))
    assert is_set(r) and units(r) == units(raw(p))
    assert np.array_equal(rs.norm(r), r)


@settings(deadline=None)
@given(pairs, pairs, pairs)
def test_union_intersect_subtract_are_the_set_operations(p, q, x):
    a, b, c = rs.norm(raw(p)), rs.norm(raw(q)), rs.norm(raw(x))
    ua, ub = units(a), units(b)
    for got, want in ((rs.union(a, b, c), ua | ub | units(c)), (rs.intersect(a, b), ua & ub),
                      (rs.subtract(a, b), ua - ub)):
        assert is_set(got) and units(got) == want
    assert len(rs.union()) == 0
    assert rs.nbytes(a) == len(ua)


@settings(deadline=None)
@given(pairs, st.integers(0, DOMAIN), st.integers(0, DOMAIN))
def test_clip(p, lo, hi):
    a = rs.norm(raw(p))
    got = rs.clip(a, lo, hi)
    assert is_set(got) and units(got) == {x for x in units(a) if lo <= x < hi}


@settings(deadline=None)
@given(pairs, st.lists(st.integers(-5, DOMAIN + 5), max_size=30))
def test_contains(p, addrs):
    a = rs.norm(raw(p))
    got = rs.contains(a, np.array(addrs, dtype=np.int64))
    assert got.tolist() == [x in units(a) for x in addrs]


@settings(deadline=None)
@given(st.sets(st.integers(0, DOMAIN)), st.sampled_from([1, 4096]))
def test_ranges_of_values_and_starts_every_are_inverse(u, step):
    values = np.array(sorted(u), dtype=np.int64) * step
    r = rs.ranges_of_values(values, step)
    assert is_set(r) and units(r // step) == u
    assert np.array_equal(rs.starts_every(r, step), values)


@settings(deadline=None)
@given(st.lists(st.booleans(), max_size=80))
def test_runs_of_mask(bits):
    runs = rs.runs_of(np.array(bits, dtype=bool))
    assert {first + i for first, n in runs for i in range(n)} == {i for i, b in enumerate(bits) if b}
    assert all(n > 0 for _, n in runs)
    # maximal: runs neither touch nor overlap
    assert all(f0 + n0 < f1 for (f0, n0), (f1, _) in zip(runs, runs[1:]))


@settings(deadline=None)
@given(st.lists(st.integers(-50, 50), max_size=40), st.sampled_from([1, 2]))
def test_run_starts(values, step):
    heads = rs.run_starts(np.array(values, dtype=np.int64), step)
    assert heads.tolist() == [i == 0 or values[i] != values[i - 1] + step for i in range(len(values))]


@settings(max_examples=200, deadline=None)
@given(pairs, st.integers(1, 6))
def test_coarsen_covers_with_at_most_limit_ranges_cutting_at_the_largest_gaps(p, limit):
    a = rs.norm(raw(p))
    got = rs.coarsen(a, limit)
    assert is_set(got) and len(got) <= limit and units(a) <= units(got)
    # Only gaps are filled, and the gaps left open are at least as wide as any filled one.
    filled = units(got) - units(a)
    open_gaps = [int(s - e) for e, s in zip(a[:-1, 1], a[1:, 0]) if int(e) not in filled]
    filled_gaps = [int(s - e) for e, s in zip(a[:-1, 1], a[1:, 0]) if int(e) in filled]
    assert len(open_gaps) == len(got) - 1 or len(a) <= limit
    assert not open_gaps or not filled_gaps or min(open_gaps) >= max(filled_gaps)



def test_positions_in_runs():
    assert rs.positions_in_runs(np.array([2, 0, 3])).tolist() == [0, 1, 0, 1, 2]
    assert rs.positions_in_runs(np.array([], np.int64)).tolist() == []
