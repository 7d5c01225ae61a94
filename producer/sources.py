"""Image sources: an S3 prefix, a manifest of URIs, or a local folder, each listed as a stream.

Listing order is deterministic (S3's lexicographic key order, manifest order, sorted folder walk), so the
same source always yields the same batches.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from producer.errors import SourceError, StorageError
from producer.storage import Storage
from producer.uris import S3Uri, is_s3_uri, parse_location, parse_s3_uri

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".txt", ".csv", ".jsonl")


@dataclass
class ListingStats:
    """Counts kept while a source is listed."""

    listed: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, uri: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(uri)


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES) and (is_s3_uri(source) or Path(source).is_file())


def iter_source(
    source: str, storage: Storage, extensions: Iterable[str], stats: ListingStats | None = None
) -> Iterator[str]:
    """Yield the image URIs of `source` whose extension is in `extensions` (compared case-insensitively).

    S3 sources yield `s3://` URIs with keys kept byte-exact; local sources yield absolute paths.
    Keys ending in `/` (folder markers) are dropped; other non-image keys are counted in `stats.skipped`.
    Raises SourceError when the source cannot be read.
    """
    stats = stats if stats is not None else ListingStats()
    suffixes = tuple(ext.lower() for ext in extensions)
    for uri in _iter_raw(source, storage):
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


def _iter_raw(source: str, storage: Storage) -> Iterator[str]:
    try:
        if is_manifest(source):
            yield from iter_manifest(source, storage)
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


def iter_manifest(source: str, storage: Storage) -> Iterator[str]:
    """Yield the URIs listed in a `.txt`, `.csv` or `.jsonl` manifest.

    `.txt`: one URI per line; blank lines and lines starting with `#` are ignored.
    `.csv`: a header row with a `uri` column (otherwise the first column is used).
    `.jsonl`: one object per line with a `uri` field.
    Relative local paths are resolved against the manifest's folder. Raises SourceError on a malformed line.
    """
    try:
        text = storage.get_bytes(source).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"manifest {source!r} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    base = None if is_s3_uri(source) else Path(source).parent
    suffix = source.lower().rsplit(".", 1)[-1]
    readers = {"txt": _manifest_txt, "csv": _manifest_csv, "jsonl": _manifest_jsonl}
    for line_number, raw in readers[suffix](text, source):
        yield _check_manifest_uri(raw, source, line_number, base)


def _manifest_txt(text: str, manifest: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.strip()
        if value and not value.startswith("#"):
            yield number, value


def _manifest_csv(text: str, manifest: str) -> Iterator[tuple[int, str]]:
    rows = csv.reader(io.StringIO(text))
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
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{manifest} line {number} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or not isinstance(record.get("uri"), str):
            raise SourceError(f"{manifest} line {number} has no string field 'uri': {line[:100]!r}")
        yield number, record["uri"]


def _check_manifest_uri(value: str, manifest: str, line_number: int, base: Path | None) -> str:
    if is_s3_uri(value):
        try:
            parse_s3_uri(value)
        except ValueError as e:
            raise SourceError(f"{manifest} line {line_number}: {e}") from e
        return value
    if base is None:
        raise SourceError(
            f"{manifest} line {line_number}: {value[:100]!r} is not an s3:// URI; "
            "manifests stored in S3 must list s3://bucket/key URIs"
        )
    try:
        location = parse_location(value)
    except ValueError as e:
        raise SourceError(f"{manifest} line {line_number}: {e}") from e
    path = location if Path(value).is_absolute() else (base / value)
    return str(path)
