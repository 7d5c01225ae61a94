"""Argument types shared by the benchmark scripts. argparse names the option and the type in its error."""

from __future__ import annotations

import math


def positive_int(text: str) -> int:
    """Parse a positive integer argument; argparse reports the ValueError with the option's name."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def positive_float(text: str) -> float:
    """Parse a finite number above 0."""
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"
positive_float.__name__ = "positive number"
