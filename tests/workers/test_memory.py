"""glibc allocator thresholds set in worker processes."""

from __future__ import annotations

import platform

import pytest

from workers.memory import tune_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt exists only in glibc")
def test_tune_malloc_applies_on_glibc() -> None:
    assert tune_malloc() is True


def test_tune_malloc_twice_is_harmless() -> None:
    first = tune_malloc()
    assert tune_malloc() is first

