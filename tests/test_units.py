"""Sizes, durations and human formatting used by the CLI."""

import pytest

from snapfs.errors import UsageError
from snapfs.units import count_of, format_bytes, format_count, format_rate, parse_duration, parse_size


@pytest.mark.parametrize(
    "text,value",
    [("4096", 4096), ("200M", 200 << 20), ("1.5G", 3 << 29), ("64KiB", 64 << 10), ("2g", 2 << 30),
     ("10MB/s", 10 << 20)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1M", "0", "12X", "1.2.3"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="bad size"):
        parse_size(text)


@pytest.mark.parametrize("text,value", [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25), ("7", 7.0)])
def test_parse_duration(text, value):
    assert parse_duration(text) == value


def test_parse_duration_rejects():
    with pytest.raises(UsageError):
        parse_duration("soon")


def test_formatting():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3.1 * (1 << 30)) == "3.1 GiB"
    assert format_rate(1.6e9) == "1.6 GB/s"
    assert format_count(1873) == "1 873"
    assert count_of(1, "snapshot") == "1 snapshot" and count_of(0, "snapshot") == "0 snapshots"
    assert count_of(1873, "write fault") == "1 873 write faults"
    assert count_of(2, "copy", "copies") == "2 copies"
