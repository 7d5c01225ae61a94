"""Manifests: files that list image URIs, read as streams so memory does not grow with their size.

Formats, chosen by suffix (case-insensitive): `.txt`, `.csv`, `.jsonl` and `.parquet`, and `.txt.gz`,
`.csv.gz`, `.jsonl.gz` for gzip-compressed text. A manifest stored in S3 is first downloaded to a
temporary file. A local manifest is read in place.

Every entry is checked in a first pass before the second pass yields the first URI, so a bad line fails
the job before anything is enqueued. Both passes stream the file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import tempfile
import zlib
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from producer.constants import MAX_MANIFEST_URI_BYTES
from producer.errors import InvalidJobSpec, SourceError
from producer.fingerprints import FingerprintSet
from producer.storage import Storage
from producer.uris import check_bucket_allowed, is_s3_uri, parse_location, parse_s3_uri

logger = logging.getLogger(__name__)

GZIP_SUFFIX = ".gz"
MANIFEST_SUFFIXES = (".txt", ".csv", ".jsonl", ".parquet", ".txt.gz", ".csv.gz", ".jsonl.gz")
# A longer physical line is rejected before it is parsed, so one huge line cannot fill memory. It leaves
# room for the other fields of a JSONL or CSV line next to an entry of MAX_MANIFEST_URI_BYTES.
MAX_MANIFEST_LINE_CHARS = 1024 * 1024
PARQUET_BATCH_ROWS = 8192


class ManifestError(SourceError, InvalidJobSpec):
    """A manifest line is malformed; the job is rejected before anything is enqueued."""


def manifest_format(source: str) -> tuple[str, bool] | None:
    """Return `(format, gzip_compressed)` for a name with a manifest suffix, such as `("csv", True)` for `a.CSV.gz`."""
    name = source.lower()
    if not name.endswith(MANIFEST_SUFFIXES):
        return None
    compressed = name.endswith(GZIP_SUFFIX)
    stem = name.removesuffix(GZIP_SUFFIX)
    return stem.rsplit(".", 1)[-1], compressed


class Manifest:
    """One manifest, ready to read: a local file, or an S3 object downloaded to a temporary file.

    Not thread-safe. `check` runs the first pass; `iter_uris` the second.
    """

    def __init__(self, source: str, path: Path, base: Path | None, allowed_buckets: Collection[str]) -> None:
        found = manifest_format(source)
        if found is None:
            raise ValueError(f"{source!r} has no manifest suffix; expected one of {' '.join(MANIFEST_SUFFIXES)}")
        self.source = source
        self.path = path
        self.base = base  # relative local paths are resolved against this folder; None for a manifest in S3
        self.allowed_buckets = allowed_buckets
        self.format, self.compressed = found
        self.unit = "row" if self.format == "parquet" else "line"

    def check(self) -> None:
        """Check every entry. Raises ManifestError naming the manifest and the line (or row) of the first bad entry."""
        for number, raw in self._entries():
            self._checked_uri(raw, number)

    def iter_uris(self, seen: FingerprintSet, stats: "DuplicateCounter") -> Iterator[str]:
        """Yield each checked URI once: a URI already in `seen` is dropped and counted in `stats`."""
        repeats_before = stats.duplicates
        for number, raw in self._entries():
            uri = self._checked_uri(raw, number)
            if seen.add(uri):
                yield uri
            else:
                stats.drop_duplicate(uri)
        repeats = stats.duplicates - repeats_before
        if repeats:
            logger.warning(
                "Manifest %s repeats URIs %d times (counting those listed by an earlier manifest of the job); "
                "each repeat was dropped, so every image appears in the results once. Examples: %s",
                self.source, repeats, ", ".join(repr(uri) for uri in stats.duplicate_examples),
            )

    def _entries(self) -> Iterator[tuple[int, str]]:
        if self.format == "parquet":
            yield from _parquet_entries(self.path, self.source)
            return
        try:
            with _open_binary(self.path, self.compressed) as binary:
                newline = "" if self.format == "csv" else "\n"
                text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline=newline)
                yield from _TEXT_READERS[self.format](text, self.source)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise ManifestError(
                f"manifest {self.source!r} is not a valid gzip file ({e}); compress it again with gzip, "
                "or drop the .gz suffix if it is plain text"
            ) from e
        except OSError as e:
            raise SourceError(f"manifest {self.source!r} cannot be read: {e}") from e

    def _checked_uri(self, raw: str, number: int) -> str:
        return check_manifest_uri(raw, f"{self.source} {self.unit} {number}", self.base, self.allowed_buckets)


class DuplicateCounter(Protocol):
    """Counts of manifest entries dropped because the same URI came earlier, such as `ListingStats`."""

    duplicates: int
    duplicate_examples: list[str]

    def drop_duplicate(self, uri: str) -> None: ...


def open_manifest(source: str, storage: Storage, spool_folder: Path, allowed_buckets: Collection[str]) -> Manifest:
    """Return the manifest at `source`, downloading an S3 manifest into `spool_folder` first.

    Raises SourceError when the manifest cannot be read.
    """
    if not is_s3_uri(source):
        path = Path(source)
        if not path.is_file():
            raise SourceError(f"manifest {source!r} does not exist or is not a file")
        return Manifest(source, path, path.parent, allowed_buckets)
    local_copy = download_to_folder(source, storage, spool_folder)
    return Manifest(source, local_copy, None, allowed_buckets)


def download_to_folder(location: str, storage: Storage, folder: Path) -> Path:
    """Stream the S3 object at `location` into a new file in `folder` and return the file's path.

    The object is copied in parts by boto3's transfer manager and never held in memory whole. Raises
    SourceError naming the location when the download fails.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    target = parse_s3_uri(location)
    suffix = "".join(Path(target.key).suffixes[-2:])  # keep `.csv.gz` visible in the spool file's name
    with tempfile.NamedTemporaryFile(dir=folder, prefix="spool-", suffix=suffix, delete=False) as file:
        path = Path(file.name)
        try:
            storage.client.download_fileobj(target.bucket, target.key, file)
        except (BotoCoreError, ClientError, OSError) as e:
            path.unlink(missing_ok=True)
            raise SourceError(f"reading {location!r} failed: {e}") from e
    return path


def _open_binary(path: Path, compressed: bool) -> IO[bytes]:
    if compressed:
        return gzip.open(path, "rb")
    return path.open("rb")


def _bounded_lines(text: IO[str], manifest: str) -> Iterator[tuple[int, str]]:
    """Yield `(line_number, line)`, reading at most MAX_MANIFEST_LINE_CHARS + 1 characters per line."""
    number = 0
    while True:
        try:
            line = text.readline(MAX_MANIFEST_LINE_CHARS + 1)
        except UnicodeDecodeError as e:
            # The decoder works on blocks of a few KiB, so the bad byte may lie a few lines further on.
            raise ManifestError(
                f"{manifest} near line {number + 1} is not UTF-8 text ({e.reason}); save the manifest as UTF-8"
            ) from e
        if not line:
            return
        number += 1
        if len(line) > MAX_MANIFEST_LINE_CHARS:
            raise ManifestError(
                f"{manifest} line {number}: the line is longer than {MAX_MANIFEST_LINE_CHARS} characters; "
                f"an entry is at most {MAX_MANIFEST_URI_BYTES} bytes, so fix or remove that line"
            )
        yield number, line


def _txt_entries(text: IO[str], manifest: str) -> Iterator[tuple[int, str]]:
    # Lines end at "\n" only: S3 keys may contain "\r", U+2028, U+0085 and other line breaks.
    for number, line in _bounded_lines(text, manifest):
        value = line.strip()
        if value and not value.startswith("#"):
            yield number, value


def _jsonl_entries(text: IO[str], manifest: str) -> Iterator[tuple[int, str]]:
    for number, line in _bounded_lines(text, manifest):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{manifest} line {number} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or not isinstance(record.get("uri"), str):
            raise ManifestError(f"{manifest} line {number} has no string field 'uri': {stripped[:100]!r}")
        yield number, record["uri"]


def _csv_entries(text: IO[str], manifest: str) -> Iterator[tuple[int, str]]:
    rows = csv.reader(line for _, line in _bounded_lines(text, manifest))
    try:
        yield from _csv_uris(rows)
    except csv.Error as e:
        raise ManifestError(
            f"{manifest} line {rows.line_num}: invalid CSV ({e}); an entry is at most {MAX_MANIFEST_URI_BYTES} bytes"
        ) from e


def _csv_uris(rows: Any) -> Iterator[tuple[int, str]]:
    """Yield the `uri` column, or the first column when the header has no `uri`, with line numbers."""
    header = next(rows, None)
    if header is None:
        return
    normalised = [column.strip().lower() for column in header]
    if "uri" in normalised:
        column = normalised.index("uri")
    else:
        column = 0
        if header and header[0].strip():
            yield rows.line_num, header[0].strip()
    for row in rows:
        if row and len(row) > column and row[column].strip():
            yield rows.line_num, row[column].strip()


_TEXT_READERS = {"txt": _txt_entries, "csv": _csv_entries, "jsonl": _jsonl_entries}


def _parquet_entries(path: Path, manifest: str) -> Iterator[tuple[int, str]]:
    """Yield `(row_number, uri)` from the string column `uri`, read in record batches. Null and blank values are skipped."""
    import pyarrow as pa

    try:
        file = open_parquet(path, manifest)
        _check_uri_column(file.schema_arrow, manifest)
        row = 0
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["uri"]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is not None and value.strip():
                    yield row, value.strip()
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(_invalid_parquet_message(manifest, e)) from e


def open_parquet(path: Path, name: str) -> Any:
    """Return a `pyarrow.parquet.ParquetFile`. Raises ManifestError naming `name` when it is not a readable Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(_invalid_parquet_message(name, e)) from e


def _invalid_parquet_message(name: str, error: BaseException) -> str:
    return f"{name} is not a valid Parquet file ({error}); write it again with a Parquet writer such as pyarrow"


def _check_uri_column(schema: Any, manifest: str) -> None:
    import pyarrow as pa

    if "uri" not in schema.names:
        raise ManifestError(f"{manifest} has no column 'uri' (its columns: {', '.join(schema.names)}); add a string column 'uri'")
    kind = schema.field("uri").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ManifestError(f"{manifest}: column 'uri' has type {kind}; write it as a string column")


def check_manifest_uri(value: str, where: str, base: Path | None, allowed_buckets: Collection[str]) -> str:
    """Return the URI or absolute path that a manifest entry names. `where` names the entry, like `list.txt line 3`.

    Raises ManifestError for an entry over MAX_MANIFEST_URI_BYTES, an invalid S3 URI or one outside a
    non-empty `allowed_buckets`, any other URI scheme, and a local path in a manifest stored in S3 (`base` None).
    """
    _check_uri_length(value, where)
    if is_s3_uri(value):
        try:
            check_bucket_allowed(parse_s3_uri(value), allowed_buckets)
        except ValueError as e:
            raise ManifestError(f"{where}: {e}") from e
        return value
    if base is None:
        raise ManifestError(
            f"{where}: {value[:100]!r} is not an s3:// URI; manifests stored in S3 must list s3://bucket/key URIs"
        )
    try:
        location = parse_location(value)
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from e
    path = location if Path(value).is_absolute() else (base / value)
    return str(path)


def _check_uri_length(value: str, where: str) -> None:
    # A character is at most 4 UTF-8 bytes, so most values skip the encoding.
    if len(value) * 4 <= MAX_MANIFEST_URI_BYTES:
        return
    size_bytes = len(value.encode("utf-8", "surrogatepass"))
    if size_bytes > MAX_MANIFEST_URI_BYTES:
        raise ManifestError(
            f"{where}: the entry is {size_bytes} bytes, starting {value[:60]!r}; an entry is at most "
            f"{MAX_MANIFEST_URI_BYTES} bytes (a local path or an S3 URI), so fix or remove that line"
        )
