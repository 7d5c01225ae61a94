"""Argument types shared by the benchmark scripts. argparse names the option and the type in its error."""

from __future__ import annotations

import argparse
import math
from typing import Any


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


def fill_defaults(args: argparse.Namespace, defaults: dict[str, tuple[Any, Any]]) -> None:
    """Set each option of `defaults` that was not given to its quick value with --quick, else to its full value."""
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if args.quick else full_value)


positive_int.__name__ = "positive integer"
positive_float.__name__ = "positive number"
