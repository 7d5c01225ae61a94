"""Tests for producer.fingerprints: an on-disk set of 64-bit fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.fingerprints import FingerprintSet, fingerprint

SMALL_CACHE_KIB = 16
MANY_ENTRIES = 30_000


def test_add_returns_true_then_false(tmp_path: Path) -> None:
    with FingerprintSet(tmp_path) as seen:
        assert seen.add("s3://photos/a.jpg") is True
        assert seen.add("s3://photos/a.jpg") is False
        assert seen.add("s3://photos/b.jpg") is True


def test_contains_after_add(tmp_path: Path) -> None:
    with FingerprintSet(tmp_path) as seen:
        seen.add("s3://photos/a.jpg")

        assert "s3://photos/a.jpg" in seen
        assert "s3://photos/b.jpg" not in seen
        assert 42 not in seen


def test_len_counts_distinct(tmp_path: Path) -> None:
    with FingerprintSet(tmp_path) as seen:
        for text in ("a", "b", "a", "c", "b"):
            seen.add(text)

        assert len(seen) == 3


def test_lone_surrogate_accepted(tmp_path: Path) -> None:
    with FingerprintSet(tmp_path) as seen:
        assert seen.add("bad\udcffname.jpg") is True
        assert "bad\udcffname.jpg" in seen


def test_file_deleted_on_exit(tmp_path: Path) -> None:
    with FingerprintSet(tmp_path) as seen:
        path = seen.path
        assert path.exists()

    assert not path.exists()


def test_closed_set_raises(tmp_path: Path) -> None:
    seen = FingerprintSet(tmp_path)
    seen.close()
    seen.close()  # a second close does nothing

    with pytest.raises(ValueError, match="closed"):
        seen.add("a")


def test_invalid_cache_size_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache_kib must be at least 1, got 0"):
        FingerprintSet(tmp_path, cache_kib=0)


def test_entries_beyond_cache_stay_exact(tmp_path: Path) -> None:
    with FingerprintSet(tmp_path, cache_kib=SMALL_CACHE_KIB) as seen:
        added = [seen.add(f"s3://photos/{index:06d}.jpg") for index in range(MANY_ENTRIES)]
        repeated = [seen.add(f"s3://photos/{index:06d}.jpg") for index in range(MANY_ENTRIES)]
        size_bytes = seen.path.stat().st_size

    assert all(added)
    assert not any(repeated)
    assert size_bytes > SMALL_CACHE_KIB * 1024 * 10  # the table is far larger than the page cache


def test_fingerprint_is_signed_64_bit() -> None:
    values = [fingerprint(f"key-{index}") for index in range(1000)]

    assert all(-(2**63) <= value < 2**63 for value in values)
    assert any(value < 0 for value in values)
    assert len(set(values)) == 1000
