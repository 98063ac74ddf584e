"""The one-cut oracle of tools/targets/treecounter.c: is an image of the whole tree (its shared
region and every worker's private region) the memory of one instant?"""

from __future__ import annotations

import numpy as np

WORDS = 512
_MASK = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def pages_of(steps: np.ndarray, tag: int) -> np.ndarray:
    """(n, 512) uint64: the pages filled with each step of ``steps`` (int64, may be <= 0)."""
    v = (np.asarray(steps, np.int64).astype(np.uint64))[:, None]
    i = np.arange(WORDS, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        out = _splitmix64(v * np.uint64(WORDS) + i) ^ np.uint64(tag)
    out[:, 0] = v[:, 0]
    return out


def _check_pages(image: np.ndarray, expected_steps: np.ndarray, tag: int, inflight: int | None,
                 next_step: int, what: str) -> bool:
    """Every page holds its expected step, except page ``inflight`` which may hold a prefix of
    ``next_step`` (old word 0) or all of it. Returns whether the in-flight page is complete."""
    expected = pages_of(expected_steps, tag)
    bad = np.flatnonzero((image != expected).any(axis=1))
    complete = False
    if inflight is not None and inflight in bad.tolist():
        row = image[inflight]
        new = pages_of(np.array([next_step]), tag)[0]
        if (row == new).all():
            complete = True
        else:
            is_new = row[1:] == new[1:]
            k = int(np.argmin(is_new)) if not is_new.all() else WORDS - 1
            assert row[0] == expected[inflight][0], f"{what}: in-flight page {inflight} has a wrong word 0"
            assert is_new[:k].all() and (row[1:] == expected[inflight][1:])[k:].all(), \
                f"{what}: in-flight page {inflight} is not a prefix write"
        bad = bad[bad != inflight]
    assert len(bad) == 0, (
        f"{what} is not at the instant: {len(bad)} bad pages, first {bad[:6].tolist()}, word 0 "
        f"{[int(x) - (1 << 64) if x >> 63 else int(x) for x in image[bad[:6], 0]]}, expected "
        f"{expected_steps[bad[:6]].tolist()}"
    )
    return complete


def check_tree(shared: np.ndarray, privates: dict[int, np.ndarray]) -> int:
    """Assert that ``shared`` (the shared region, header page first, as (n, 512) uint64) and
    ``privates`` (worker -> its private region, header page first) are one instant of
    treecounter's memory; returns that instant's step M."""
    head = shared[0]
    m = int(head[0])
    raw = head[1:3].view(np.uint32)  # ftx, nworkers, shared_pages, private_pages
    n, ns, np_ = int(raw[1]), int(raw[2]), int(raw[3])
    assert sorted(privates) == list(range(n)), f"workers {sorted(privates)} != 0..{n - 1}"
    nxt = m + 1
    p = np.arange(ns, dtype=np.int64)
    shared_steps = m - np.mod(m - p, ns)
    shared_done = _check_pages(shared[1 : ns + 1], shared_steps, 0, nxt % ns, nxt, "shared region")
    for w, img in privates.items():
        tag = (w + 1) << 56
        ph = img[0]
        assert int(ph[0]) == 0x72746365657274 and int(ph[1]) == w, f"worker {w}: bad private header"
        top = (m - w) // n
        j = np.arange(np_, dtype=np.int64)
        steps = (top - np.mod(top - j, np_)) * n + w
        mine = nxt % n == w
        inflight = (nxt // n) % np_ if mine else None
        done = _check_pages(img[1 : np_ + 1], steps, tag, inflight, nxt, f"worker {w}'s private region")
        last = int(ph[2]) - (1 << 64) if int(ph[2]) >> 63 else int(ph[2])
        if mine and inflight is not None and not shared_done:
            # Step M+1 writes its shared page first: its private page cannot have begun.
            assert (img[1 + inflight] == pages_of(steps[inflight : inflight + 1], tag)[0]).all(), \
                f"worker {w}: private page of step {nxt} written before its shared page"
        expected_last = top * n + w
        assert last == expected_last or (mine and done and last == nxt), \
            f"worker {w}: last step {last}, expected {expected_last} at M={m}"
    return m
