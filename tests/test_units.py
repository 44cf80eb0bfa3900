"""
Parsing of sizes and durations given on the command line.
"""

import pytest

from dragonfly.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100", 100),
        ("0", 0),
        ("10K", 10 << 10),
        ("10k", 10 << 10),
        ("5M", 5 << 20),
        ("5MB", 5 << 20),
        ("5mb", 5 << 20),
        ("5MiB", 5 << 20),
        ("1.5G", int(1.5 * (1 << 30))),
        ("2T", 2 << 40),
        (" 20 M ", 20 << 20),
        ("512B", 512),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    """
    Bare numbers are bytes; K/M/G/T (optionally with B or iB) are powers
    of 1024, in any case, with surrounding spaces allowed.
    """
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["10xx", "", "M", "-5M", "5 MM", "1e3", "5Q", "1,5G"])
def test_parse_size_rejects_non_sizes(text: str) -> None:
    """
    Anything else is a ValueError whose message quotes the input.
    """
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30", 30.0),
        ("2.5", 2.5),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1H", 3600.0),
        (" 10 s ", 10.0),
    ],
)
def test_parse_duration(text: str, expected: float) -> None:
    """
    Bare numbers are seconds; ms, s, m and h scale them.
    """
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["10x", "", "s", "-1s", "5 min", "1d"])
def test_parse_duration_rejects_non_durations(text: str) -> None:
    """
    Anything else is a ValueError.
    """
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (int(12.5 * (1 << 20)), "12.5 MiB"),
        (3 << 30, "3.0 GiB"),
        (5 << 40, "5.0 TiB"),
    ],
)
def test_format_size(count: int, expected: str) -> None:
    """
    Byte counts are shown with binary units for people.
    """
    assert format_size(count) == expected
