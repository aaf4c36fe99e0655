"""Sizes in bytes and durations as people write and read them, for the commands' arguments and messages.

Guarantees: ``parse_size`` accepts a whole number of bytes written with an optional binary unit and nothing else
(no sign, nan, inf or exponent); ``human`` never prints more than the number it is given. Imports nothing from
the rest of the package, so mkfs and the mount-option parser share it without depending on each other.
"""

from __future__ import annotations

import re
from fractions import Fraction

UNITS = "KMGTPE"
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGTPE])(?:I?B)?|B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512M', '2G', '1T', '4096', '64k', '1GiB', '1.5K' -> bytes. Raises ValueError on anything else: a sign,
    nan, inf, an exponent, or a fraction of a byte."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    value = Fraction(m[1]) * (1 << 10 * (UNITS.index(m[2].upper()) + 1) if m[2] else 1)
    if value.denominator != 1:
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|ms|us|µs)?\s*")


def parse_duration(text: str) -> float:
    """'5ms', '0.2ms', '20us', '1s', '0.5' (seconds) -> seconds. Raises ValueError on anything else (a sign, nan,
    inf, an exponent, an unknown unit)."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    scale = {"ms": 1e-3, "us": 1e-6, "µs": 1e-6}.get(m[2] or "s", 1.0)
    return float(m[1]) * scale


def human(n: int) -> str:
    """Bytes as a person reads them: '256 KiB', '16 TiB', '1.5 GiB', '15.99 TiB' (rounded down when not exact:
    never more than ``n``), '512 bytes'."""
    for i in reversed(range(len(UNITS))):
        unit = 1 << 10 * (i + 1)
        if n >= unit:
            hundredths = n * 100 // unit
            text = f"{hundredths // 100}.{hundredths % 100:02d}".rstrip("0").rstrip(".")
            return f"{text} {UNITS[i]}iB"
    return f"{n} bytes"
