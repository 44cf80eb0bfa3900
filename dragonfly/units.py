"""
Parsing of the human-friendly sizes, rates and durations that flags accept.

Sizes follow Dragonfly 1.x: a bare number is bytes, and the suffixes K, M, G
and T (optionally followed by B, any case) are powers of 1024.  Durations take
a bare number of seconds or a suffix of ms, s, m or h.
"""

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """
    Parse a size such as C{"20M"}, C{"1.5GiB"} or C{"4096"} into bytes.

    @raise ValueError: if C{text} is not a size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 512K, 20M, 1G)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_FACTORS[unit.lower()])


def parse_duration(text: str) -> float:
    """
    Parse a duration such as C{"30s"}, C{"5m"} or C{"2.5"} into seconds.

    @raise ValueError: if C{text} is not a duration.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (examples: 500ms, 30s, 5m, 1h)")
    number, unit = match.groups()
    return float(number) * _DURATION_FACTORS[(unit or "s").lower()]


def format_size(count: float) -> str:
    """
    Render a byte count for people, e.g. C{"12.5 MiB"}.
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"
