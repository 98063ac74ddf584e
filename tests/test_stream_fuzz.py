"""Fuzzing the parser: mutated streams only ever raise StreamError, with bounded memory
(the stream-fuzz campaign of ``python -m tools.torture``, at its default size, plus a
hypothesis search)."""

from __future__ import annotations

import io
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.stream.reader import read_stream
from tools.torture.stream_fuzz import SEEDS, mutations, parse_bounded


def test_thousands_of_random_mutations():
    tracemalloc.start()
    try:
        for data, chunk in mutations():
            problem = parse_bounded(data, chunk)
            assert problem is None, problem
    finally:
        tracemalloc.stop()


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_hypothesis_mutations(seed: bytes, data: st.DataObject):
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(seed)), st.binary(max_size=9),
                                         st.integers(0, 16)), max_size=4))
    buf = bytearray(seed)
    for pos, new, cut in edits:
        buf[pos : pos + cut] = new
    tracemalloc.start()
    try:
        problem = parse_bounded(bytes(buf))
        assert problem is None, problem
    finally:
        tracemalloc.stop()


def test_seeds_are_valid():
    for seed in SEEDS:
        events = list(read_stream(io.BytesIO(seed)))
        assert events[-1][0] in ("end", "devices")
