"""Image sources: an S3 prefix, a manifest of URIs, or a local folder, each listed as a stream.

Listing order is deterministic (S3's lexicographic key order, manifest order, sorted folder walk), so the
same source always yields the same batches.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from producer.constants import MAX_MANIFEST_URI_BYTES
from producer.errors import InvalidJobSpec, SourceError, StorageError
from producer.storage import Storage
from producer.uris import S3Uri, check_bucket_allowed, is_s3_uri, parse_location, parse_s3_uri

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".txt", ".csv", ".jsonl")

# Repeated manifest entries are dropped while at most this many distinct URIs have been seen. Each is kept
# as a 16-byte BLAKE2b digest, about 95 bytes per entry in a CPython 3.11 set (2 million took 187 MB,
# measured with ru_maxrss). After that, duplicate checking stops with a warning.
MAX_TRACKED_MANIFEST_URIS = 2_000_000
MAX_EXAMPLES = 5


class ManifestError(SourceError, InvalidJobSpec):
    """A manifest line is malformed; the job is rejected before anything is enqueued."""


@dataclass
class ListingStats:
    """Counts kept while a source is listed."""

    listed: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    duplicates: int = 0  # manifest entries dropped because the same URI came earlier
    duplicate_examples: list[str] = field(default_factory=list)
    duplicate_check_stopped: bool = False  # True once MAX_TRACKED_MANIFEST_URIS distinct URIs were seen

    def skip(self, uri: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(uri)

    def drop_duplicate(self, uri: str) -> None:
        self.duplicates += 1
        if len(self.duplicate_examples) < MAX_EXAMPLES:
            self.duplicate_examples.append(uri)


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES) and (is_s3_uri(source) or Path(source).is_file())


def iter_source(
    source: str,
    storage: Storage,
    extensions: Iterable[str],
    stats: ListingStats | None = None,
    allowed_buckets: Collection[str] = (),
) -> Iterator[str]:
    """Yield the image URIs of `source` whose extension is in `extensions` (compared case-insensitively).

    S3 sources yield `s3://` URIs with keys kept byte-exact; local sources yield absolute paths.
    Keys ending in `/` (folder markers) are dropped; other non-image keys are counted in `stats.skipped`.
    A manifest's repeated URIs are dropped and counted in `stats.duplicates` (see `iter_manifest`).
    Raises SourceError when the source cannot be read, and ManifestError (a SourceError and an
    InvalidJobSpec) when a manifest entry is invalid or outside a non-empty `allowed_buckets`.
    """
    stats = stats if stats is not None else ListingStats()
    suffixes = tuple(ext.lower() for ext in extensions)
    for uri in _iter_raw(source, storage, allowed_buckets, stats):
        if uri.endswith("/"):
            continue
        if not _is_utf8(uri):
            logger.warning("Skipping %r: its name is not valid UTF-8, so result rows cannot hold it", uri)
            stats.skip(uri)
            continue
        if not uri.lower().endswith(suffixes):
            stats.skip(uri)
            continue
        stats.listed += 1
        yield uri


def _is_utf8(uri: str) -> bool:
    # Local file names that are not UTF-8 arrive as lone surrogates (PEP 383), which JSON cannot encode.
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _iter_raw(source: str, storage: Storage, allowed_buckets: Collection[str], stats: ListingStats) -> Iterator[str]:
    try:
        if is_manifest(source):
            yield from iter_manifest(source, storage, allowed_buckets, stats)
            return
        location = parse_location(source)
        if isinstance(location, S3Uri):
            for key, _size in storage.iter_objects(location):
                yield str(S3Uri(location.bucket, key))
            return
        yield from iter_local_folder(location)
    except StorageError as e:
        raise SourceError(f"source {source!r} cannot be read: {e}") from e


def iter_local_folder(root: Path) -> Iterator[str]:
    """Yield the files under `root` as absolute paths, in the order S3 would list the same keys.

    Entries are sorted by name, a folder as its name plus `/`, so `a/c.jpg` comes before `a0.jpg` as in S3.
    Symbolic links are not followed: a link that points outside `root` could expose any file on the machine.
    """
    if not root.is_dir():
        if root.suffix.lower() in MANIFEST_SUFFIXES:
            raise SourceError(f"source {str(root)!r} does not exist: expected a folder or a manifest (.txt .csv .jsonl)")
        raise SourceError(f"source folder {str(root)!r} does not exist or is not a folder")
    yield from _walk_sorted(root)


def _walk_sorted(folder: Path) -> Iterator[str]:
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name)
    for entry in entries:
        if entry.is_symlink():
            logger.warning("Skipping symbolic link %s: links are not followed", entry.path)
        elif entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            yield entry.path


def iter_manifest(
    source: str, storage: Storage, allowed_buckets: Collection[str] = (), stats: ListingStats | None = None
) -> Iterator[str]:
    """Yield the URIs listed in a `.txt`, `.csv` or `.jsonl` manifest, each URI once.

    `.txt`: one URI per line. `.jsonl`: one object per line with a `uri` field. In both, blank lines and
    lines starting with `#` are ignored. `.csv`: a header row with a `uri` column (otherwise the first
    column is used).
    Relative local paths are resolved against the manifest's folder. A URI that came earlier in the
    manifest is dropped and counted in `stats.duplicates`, while at most MAX_TRACKED_MANIFEST_URIS distinct
    URIs have been seen. Raises ManifestError (a SourceError) on a malformed line, an invalid URI, an entry
    over MAX_MANIFEST_URI_BYTES, an S3 key over 1,024 bytes or an S3 URI outside a non-empty
    `allowed_buckets`. Every line is checked before the first URI is yielded, so a bad line fails the job
    before anything is enqueued. The text is parsed twice for that but held in memory once.
    """
    stats = stats if stats is not None else ListingStats()
    text = _read_manifest(source, storage)
    base = None if is_s3_uri(source) else Path(source).parent
    suffix = source.lower().rsplit(".", 1)[-1]
    reader = {"txt": _manifest_txt, "csv": _manifest_csv, "jsonl": _manifest_jsonl}[suffix]
    # The first pass only checks, so that no batch is enqueued before a bad line fails the listing.
    for line_number, raw in reader(text, source):
        _check_manifest_uri(raw, source, line_number, base, allowed_buckets)
    seen = _SeenUris(source, stats)
    for line_number, raw in reader(text, source):
        uri = _check_manifest_uri(raw, source, line_number, base, allowed_buckets)
        if seen.add(uri):
            yield uri
    seen.log_summary()


def _read_manifest(source: str, storage: Storage) -> str:
    try:
        return storage.get_bytes(source).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {source!r} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e


class _SeenUris:
    """The distinct URIs of one manifest, kept as 16-byte digests up to MAX_TRACKED_MANIFEST_URIS entries."""

    def __init__(self, manifest: str, stats: ListingStats) -> None:
        self.manifest = manifest
        self.stats = stats
        self._digests: set[bytes] = set()

    def add(self, uri: str) -> bool:
        """Return True for a URI not seen before (or seen after tracking stopped), False for a repeat."""
        if self.stats.duplicate_check_stopped:
            return True
        digest = hashlib.blake2b(uri.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in self._digests:
            self.stats.drop_duplicate(uri)
            return False
        if len(self._digests) >= MAX_TRACKED_MANIFEST_URIS:
            self._stop_tracking()
            return True
        self._digests.add(digest)
        return True

    def _stop_tracking(self) -> None:
        self.stats.duplicate_check_stopped = True
        self._digests = set()
        logger.warning(
            "Manifest %s lists more than %d distinct URIs; repeats after that are not dropped, so they are "
            "classified again and appear in the results more than once",
            self.manifest, MAX_TRACKED_MANIFEST_URIS,
        )

    def log_summary(self) -> None:
        if self.stats.duplicates:
            logger.warning(
                "Manifest %s lists %d URIs more than once; each repeat was dropped, so every image appears in "
                "the results once. Examples: %s",
                self.manifest, self.stats.duplicates, ", ".join(repr(uri) for uri in self.stats.duplicate_examples),
            )


def _manifest_txt(text: str, manifest: str) -> Iterator[tuple[int, str]]:
    # Split at "\n" only: str.splitlines also splits at U+2028, U+0085 and other characters S3 keys may contain.
    for number, line in enumerate(text.split("\n"), start=1):
        value = line.strip()
        if value and not value.startswith("#"):
            yield number, value


def _manifest_csv(text: str, manifest: str) -> Iterator[tuple[int, str]]:
    rows = csv.reader(io.StringIO(text))
    try:
        yield from _csv_uris(rows)
    except csv.Error as e:
        raise ManifestError(
            f"{manifest} line {rows.line_num}: invalid CSV ({e}); an entry is at most {MAX_MANIFEST_URI_BYTES} bytes"
        ) from e


def _csv_uris(rows: Iterator[list[str]]) -> Iterator[tuple[int, str]]:
    header = next(rows, None)
    if header is None:
        return
    normalised = [column.strip().lower() for column in header]
    if "uri" in normalised:
        column = normalised.index("uri")
    else:
        column = 0
        if header and header[0].strip():
            yield 1, header[0].strip()
    for number, row in enumerate(rows, start=2):
        if row and len(row) > column and row[column].strip():
            yield number, row[column].strip()


def _manifest_jsonl(text: str, manifest: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{manifest} line {number} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or not isinstance(record.get("uri"), str):
            raise ManifestError(f"{manifest} line {number} has no string field 'uri': {line[:100]!r}")
        yield number, record["uri"]


def _check_manifest_uri(
    value: str, manifest: str, line_number: int, base: Path | None, allowed_buckets: Collection[str]
) -> str:
    _check_uri_length(value, manifest, line_number)
    if is_s3_uri(value):
        try:
            check_bucket_allowed(parse_s3_uri(value), allowed_buckets)
        except ValueError as e:
            raise ManifestError(f"{manifest} line {line_number}: {e}") from e
        return value
    if base is None:
        raise ManifestError(
            f"{manifest} line {line_number}: {value[:100]!r} is not an s3:// URI; "
            "manifests stored in S3 must list s3://bucket/key URIs"
        )
    try:
        location = parse_location(value)
    except ValueError as e:
        raise ManifestError(f"{manifest} line {line_number}: {e}") from e
    path = location if Path(value).is_absolute() else (base / value)
    return str(path)


def _check_uri_length(value: str, manifest: str, line_number: int) -> None:
    # A character is at most 4 UTF-8 bytes, so most values skip the encoding.
    if len(value) * 4 <= MAX_MANIFEST_URI_BYTES:
        return
    size_bytes = len(value.encode("utf-8", "surrogatepass"))
    if size_bytes > MAX_MANIFEST_URI_BYTES:
        raise ManifestError(
            f"{manifest} line {line_number}: the entry is {size_bytes} bytes, starting {value[:60]!r}; "
            f"an entry is at most {MAX_MANIFEST_URI_BYTES} bytes (a local path or an S3 URI), so fix or remove that line"
        )

