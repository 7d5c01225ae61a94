"""S3 Inventory reports as a source: the objects a report lists, read without any ListObjects call.

Facts relied on. The first comes from the Amazon S3 User Guide, page "Locating your inventory list".
The others describe S3 Inventory's CSV and Parquet output as the tests build it. No report written by
S3 itself was read, and the NOTE at `_decode_key` marks the least certain fact.

- A report is described by a `manifest.json` in the destination bucket. Its fields used here are
  `sourceBucket` (a bucket name), `destinationBucket` (an ARN, `arn:aws:s3:::NAME`), `fileFormat`
  (`CSV`, `ORC` or `Parquet`), `fileSchema` and `files`, a list of objects whose `key` names a data
  file in the destination bucket.
- CSV data files are gzip-compressed, have no header row, and hold the columns that `fileSchema` lists,
  comma-separated and in order (for example `Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size`).
  Their `Key` values are URL-encoded.
- Parquet data files have lowercase columns such as `bucket`, `key`, `is_latest` and `is_delete_marker`,
  and keys that are not encoded.
- A report that includes all versions has the `IsLatest` and `IsDeleteMarker` columns. Delete markers
  and versions that are not the latest are skipped here, so each key that exists is listed once.

Data files are downloaded one at a time to a temporary file and read as streams.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from producer.errors import SourceError, StorageError
from producer.manifests import ManifestError, download_to_folder, open_parquet
from producer.storage import Storage
from producer.uris import S3Uri, check_bucket_allowed, is_s3_uri, parse_s3_uri

logger = logging.getLogger(__name__)

INVENTORY_MANIFEST_NAME = "manifest.json"
REQUIRED_FIELDS = ("sourceBucket", "destinationBucket", "fileFormat", "fileSchema", "files")
BUCKET_ARN_PREFIX = "arn:aws:s3:::"
SUPPORTED_FORMATS = ("csv", "parquet")
PARQUET_BATCH_ROWS = 8192
# A manifest.json lists data files, not objects, so it stays small; this bounds what one read takes.
MAX_INVENTORY_MANIFEST_BYTES = 64 * 1024 * 1024


def is_inventory_manifest(source: str) -> bool:
    """Return True when `source`'s last path segment is `manifest.json` (compared case-insensitively)."""
    return source.rsplit("/", 1)[-1].lower() == INVENTORY_MANIFEST_NAME


@dataclass(frozen=True)
class InventoryReport:
    """The parts of an S3 Inventory `manifest.json` that listing needs."""

    source: str  # where the manifest.json was read
    source_bucket: str
    destination_bucket: str
    file_format: str  # "csv" or "parquet"
    columns: tuple[str, ...]  # from fileSchema, for CSV data files
    data_keys: tuple[str, ...]


def open_inventory(source: str, storage: Storage, allowed_buckets: Collection[str]) -> InventoryReport:
    """Read and check an S3 Inventory `manifest.json` (an S3 URI or a local path).

    Raises ManifestError (an InvalidJobSpec) when a required field is missing or invalid, the format is
    ORC, or `sourceBucket` is outside a non-empty `allowed_buckets`. Raises SourceError when the file
    cannot be read.
    """
    document = _read_document(source, storage)
    missing = [name for name in REQUIRED_FIELDS if name not in document]
    if missing:
        raise ManifestError(
            f"S3 Inventory manifest {source!r} has no field {', '.join(missing)}; expected the manifest.json "
            f"that S3 Inventory writes, with {', '.join(REQUIRED_FIELDS)}"
        )
    report = InventoryReport(
        source=source,
        source_bucket=_source_bucket(document, source),
        destination_bucket=_destination_bucket(document, source),
        file_format=_file_format(document, source),
        columns=tuple(column.strip() for column in str(document["fileSchema"]).split(",")),
        data_keys=_data_keys(document, source),
    )
    try:
        check_bucket_allowed(S3Uri(report.source_bucket, ""), allowed_buckets)
    except ValueError as e:
        raise ManifestError(f"S3 Inventory manifest {source!r}: sourceBucket {e}") from e
    if report.file_format == "csv" and "key" not in (column.lower() for column in report.columns):
        raise ManifestError(f"S3 Inventory manifest {source!r}: fileSchema {document['fileSchema']!r} has no Key column")
    return report


def _read_document(source: str, storage: Storage) -> dict[str, Any]:
    try:
        if is_s3_uri(source):
            data = storage.get_bytes(source)
        else:
            with Path(source).open("rb") as file:
                data = file.read(MAX_INVENTORY_MANIFEST_BYTES + 1)
    except (StorageError, OSError) as e:
        raise SourceError(f"S3 Inventory manifest {source!r} cannot be read: {e}") from e
    if len(data) > MAX_INVENTORY_MANIFEST_BYTES:
        raise ManifestError(f"S3 Inventory manifest {source!r} is larger than {MAX_INVENTORY_MANIFEST_BYTES} bytes; is it really a manifest.json?")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"S3 Inventory manifest {source!r} is not valid JSON ({e}); use the manifest.json that S3 Inventory wrote") from e
    if not isinstance(document, dict):
        raise ManifestError(f"S3 Inventory manifest {source!r} is not a JSON object")
    return document


def _source_bucket(document: dict[str, Any], source: str) -> str:
    bucket = document["sourceBucket"]
    try:
        return parse_s3_uri(f"s3://{bucket}/").bucket
    except (TypeError, ValueError) as e:
        raise ManifestError(f"S3 Inventory manifest {source!r}: sourceBucket {bucket!r} is not a bucket name ({e})") from e


def _destination_bucket(document: dict[str, Any], source: str) -> str:
    arn = document["destinationBucket"]
    if not isinstance(arn, str) or not arn.startswith(BUCKET_ARN_PREFIX):
        raise ManifestError(
            f"S3 Inventory manifest {source!r}: destinationBucket {arn!r} is not a bucket ARN like 'arn:aws:s3:::NAME'"
        )
    name = arn[len(BUCKET_ARN_PREFIX):]
    try:
        return parse_s3_uri(f"s3://{name}/").bucket
    except ValueError as e:
        raise ManifestError(f"S3 Inventory manifest {source!r}: destinationBucket {arn!r}: {e}") from e


def _file_format(document: dict[str, Any], source: str) -> str:
    value = str(document["fileFormat"]).strip().lower()
    if value == "orc":
        raise ManifestError(
            f"S3 Inventory manifest {source!r} lists ORC files, which clipfleet does not read; "
            "set the inventory configuration's output format to CSV or Parquet and use the next report"
        )
    if value not in SUPPORTED_FORMATS:
        raise ManifestError(f"S3 Inventory manifest {source!r}: fileFormat {document['fileFormat']!r} is not CSV or Parquet")
    return value


def _data_keys(document: dict[str, Any], source: str) -> tuple[str, ...]:
    files = document["files"]
    if not isinstance(files, list):
        raise ManifestError(f"S3 Inventory manifest {source!r}: files is not a list")
    keys = []
    for index, item in enumerate(files):
        key = item.get("key") if isinstance(item, dict) else None
        if not isinstance(key, str) or not key:
            raise ManifestError(f"S3 Inventory manifest {source!r}: files[{index}] has no string 'key'")
        keys.append(key)
    return tuple(keys)


def iter_inventory(report: InventoryReport, storage: Storage, spool_folder: Path) -> Iterator[str]:
    """Yield `s3://sourceBucket/key` for each current, non-deleted object, data file by data file.

    Each data file is downloaded into `spool_folder`, read, and deleted before the next. Raises
    ManifestError naming the data file when it is corrupt or a row is malformed, and SourceError when
    it cannot be downloaded.
    """
    for key in report.data_keys:
        location = str(S3Uri(report.destination_bucket, key))
        path = download_to_folder(location, storage, spool_folder)
        try:
            reader = _csv_keys if report.file_format == "csv" else _parquet_keys
            for object_key in reader(path, location, report.columns):
                yield str(S3Uri(report.source_bucket, object_key))
        finally:
            path.unlink(missing_ok=True)


def _csv_keys(path: Path, location: str, columns: tuple[str, ...]) -> Iterator[str]:
    lowered = [column.lower() for column in columns]
    key_index = lowered.index("key")
    latest_index = lowered.index("islatest") if "islatest" in lowered else None
    marker_index = lowered.index("isdeletemarker") if "isdeletemarker" in lowered else None
    try:
        with gzip.open(path, "rb") as binary:
            rows = csv.reader(io.TextIOWrapper(binary, encoding="utf-8", newline=""))
            for row in rows:
                if len(row) <= key_index:
                    raise ManifestError(
                        f"S3 Inventory data file {location} row {rows.line_num} has {len(row)} columns; "
                        f"fileSchema names {len(columns)}"
                    )
                if _is_true(row, marker_index) or _is_false(row, latest_index):
                    continue
                yield _decode_key(row[key_index], location, rows.line_num)
    except (gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(
            f"S3 Inventory data file {location} is not gzip-compressed CSV ({e}); check that the report is complete"
        ) from e


def _is_true(row: list[str], index: int | None) -> bool:
    return index is not None and index < len(row) and row[index].strip().lower() == "true"


def _is_false(row: list[str], index: int | None) -> bool:
    return index is not None and index < len(row) and row[index].strip().lower() == "false"


def _decode_key(encoded: str, location: str, row: int) -> str:
    # NOTE: keys are decoded as form data (`+` is a space, `%2B` a plus). That rule is assumed and has
    # not been checked against a report written by S3 itself.
    try:
        return unquote_plus(encoded, errors="strict")
    except UnicodeDecodeError as e:
        raise ManifestError(f"S3 Inventory data file {location} row {row}: key {encoded[:100]!r} is not URL-encoded UTF-8 ({e.reason})") from e


def _parquet_keys(path: Path, location: str, columns: tuple[str, ...]) -> Iterator[str]:
    import pyarrow as pa

    file = open_parquet(path, f"S3 Inventory data file {location}")
    names = set(file.schema_arrow.names)
    if "key" not in names:
        raise ManifestError(f"S3 Inventory data file {location} has no column 'key' (its columns: {', '.join(sorted(names))})")
    wanted = [name for name in ("key", "is_latest", "is_delete_marker") if name in names]
    try:
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            yield from _current_keys(batch.to_pydict())
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"S3 Inventory data file {location} is not a valid Parquet file ({e}); check that the report is complete") from e


def _current_keys(batch: dict[str, list[Any]]) -> Iterator[str]:
    latest = batch.get("is_latest")
    markers = batch.get("is_delete_marker")
    for index, key in enumerate(batch["key"]):
        if key is None:
            continue
        if markers is not None and markers[index] is True:
            continue
        if latest is not None and latest[index] is False:
            continue
        yield key
