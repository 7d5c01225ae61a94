"""Peak memory of listing a manifest does not grow with its number of URIs.

Each listing runs in a fresh Python process, which reports its own peak RSS (`ru_maxrss`), so the
measurement covers the listing alone.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

SMALL_URIS = 100_000
LARGE_URIS = 4 * SMALL_URIS
# Keeping the 300,000 extra URIs as str objects in a list would take about 30 MB, and their 16-byte
# digests in a set about 28 MB (CPython 3.11), so a 10 MiB bound fails any listing that keeps them.
MAX_GROWTH_BYTES = 10 * 1024 * 1024
LISTING_TIMEOUT_S = 60

LISTING_SCRIPT = """
import resource, sys
from producer.constants import DEFAULT_IMAGE_EXTENSIONS
from producer.sources import ListingStats, iter_source
from producer.storage import Storage

stats = ListingStats()
count = sum(1 for _ in iter_source(sys.argv[1], Storage(), DEFAULT_IMAGE_EXTENSIONS, stats))
print(count, stats.duplicates, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_manifest(path: Path, distinct: int) -> None:
    """Write `distinct` URIs and then the first tenth of them again, gzip-compressed."""
    lines = [f"s3://photos/2026/batch-{index // 1000:04d}/image-{index:08d}.jpg\n" for index in range(distinct)]
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as file:
        file.writelines(lines)
        file.writelines(lines[: distinct // 10])


def listing_peak_bytes(manifest: Path, expected: int) -> int:
    completed = subprocess.run(
        [sys.executable, "-c", LISTING_SCRIPT, str(manifest)],
        capture_output=True, text=True, timeout=LISTING_TIMEOUT_S, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    count, duplicates, peak_kib = (int(value) for value in completed.stdout.split())
    assert count == expected
    assert duplicates == expected // 10
    return peak_kib * 1024  # ru_maxrss is in KiB on Linux


def test_manifest_listing_memory_flat(tmp_path: Path) -> None:
    small, large = tmp_path / "small.txt.gz", tmp_path / "large.txt.gz"
    write_manifest(small, SMALL_URIS)
    write_manifest(large, LARGE_URIS)

    small_peak = listing_peak_bytes(small, SMALL_URIS)
    large_peak = listing_peak_bytes(large, LARGE_URIS)

    assert large_peak - small_peak < MAX_GROWTH_BYTES, (small_peak, large_peak)
