"""Tests for producer.inventory: S3 Inventory reports in CSV and Parquet, stored on moto's S3 server."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.client import BaseClient

from producer.constants import DEFAULT_IMAGE_EXTENSIONS
from producer.errors import InvalidJobSpec, SourceError
from producer.inventory import is_inventory_manifest
from producer.manifests import ManifestError
from producer.sources import ListingStats, iter_source, iter_sources
from producer.storage import Storage
from producer.uris import S3Uri

CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size"
# (key, is_latest, is_delete_marker): keys that URL-encoding changes, a delete marker and an old version.
OBJECTS = [
    ("inv/a b+c.jpg", True, False),
    ("inv/caf\u00e9 \u732b.jpg", True, False),
    ("inv/100%.png", True, False),
    ("inv/deleted.jpg", True, True),
    ("inv/old.jpg", False, False),
    ("inv/notes.txt", True, False),
]
EXPECTED_KEYS = ["inv/a b+c.jpg", "inv/caf\u00e9 \u732b.jpg", "inv/100%.png"]


class NoListingStorage(Storage):
    """A Storage that fails any ListObjects call, to prove inventory sources never list."""

    def iter_objects(self, prefix: S3Uri) -> Iterator[tuple[str, int]]:
        raise AssertionError(f"ListObjects called for {prefix}")


@pytest.fixture(scope="module")
def storage(s3_server) -> Storage:
    return NoListingStorage(endpoint_url=s3_server.endpoint_url)


def csv_data_file(source_bucket: str, rows: list[tuple[str, bool, bool]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for index, (key, latest, marker) in enumerate(rows):
        writer.writerow([source_bucket, quote_plus(key), f"v{index}", str(latest).lower(), str(marker).lower(), "10"])
    return gzip.compress(text.getvalue().encode("utf-8"))


def parquet_data_file(source_bucket: str, rows: list[tuple[str, bool, bool]]) -> bytes:
    table = pa.table({
        "bucket": [source_bucket] * len(rows),
        "key": [key for key, _, _ in rows],
        "version_id": [f"v{index}" for index in range(len(rows))],
        "is_latest": [latest for _, latest, _ in rows],
        "is_delete_marker": [marker for _, _, marker in rows],
        "size": [10] * len(rows),
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def manifest_document(source_bucket: str, destination: str, file_format: str, keys: list[str], schema: str) -> dict:
    return {
        "sourceBucket": source_bucket,
        "destinationBucket": f"arn:aws:s3:::{destination}",
        "version": "2016-11-30",
        "creationTimestamp": "1514944800000",
        "fileFormat": file_format,
        "fileSchema": schema,
        "files": [{"key": key, "size": 100, "MD5checksum": "0" * 32} for key in keys],
    }


@pytest.fixture
def write_report(s3_client: BaseClient, make_bucket: Callable[[], str]) -> Callable[..., tuple[str, str]]:
    """A function that uploads an inventory report split over two data files; returns (manifest URI, source bucket)."""

    def write(file_format: str, **overrides: object) -> tuple[str, str]:
        source_bucket, destination = make_bucket(), make_bucket()
        prefix = f"inventory/{source_bucket}/daily"
        halves = [OBJECTS[:3], OBJECTS[3:]]
        keys = []
        for index, rows in enumerate(halves):
            if file_format == "CSV":
                key, body = f"{prefix}/data/part-{index}.csv.gz", csv_data_file(source_bucket, rows)
            else:
                key, body = f"{prefix}/data/part-{index}.parquet", parquet_data_file(source_bucket, rows)
            s3_client.put_object(Bucket=destination, Key=key, Body=body)
            keys.append(key)
        document = manifest_document(source_bucket, destination, file_format, keys, CSV_SCHEMA)
        document.update(overrides)
        manifest_key = f"{prefix}/2026-01-01T00-00Z/manifest.json"
        s3_client.put_object(Bucket=destination, Key=manifest_key, Body=json.dumps(document).encode())
        return f"s3://{destination}/{manifest_key}", source_bucket

    return write


def list_uris(source: str, storage: Storage, stats: ListingStats | None = None, allowed: tuple[str, ...] = ()) -> list[str]:
    return list(iter_source(source, storage, DEFAULT_IMAGE_EXTENSIONS, stats, allowed))


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_inventory_lists_current_objects(write_report: Callable[..., tuple[str, str]], storage: Storage, file_format: str) -> None:
    manifest, source_bucket = write_report(file_format)

    uris = list_uris(manifest, storage)

    assert uris == [f"s3://{source_bucket}/{key}" for key in EXPECTED_KEYS]


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_inventory_skips_delete_marker(write_report: Callable[..., tuple[str, str]], storage: Storage, file_format: str) -> None:
    manifest, source_bucket = write_report(file_format)

    uris = list_uris(manifest, storage)

    assert f"s3://{source_bucket}/inv/deleted.jpg" not in uris
    assert f"s3://{source_bucket}/inv/old.jpg" not in uris


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_inventory_counts_non_images(write_report: Callable[..., tuple[str, str]], storage: Storage, file_format: str) -> None:
    manifest, source_bucket = write_report(file_format)
    stats = ListingStats()

    list_uris(manifest, storage, stats)

    assert stats.listed == 3
    assert stats.skipped_examples == [f"s3://{source_bucket}/inv/notes.txt"]


def test_csv_key_decoding_keeps_plus_and_space(write_report: Callable[..., tuple[str, str]], storage: Storage) -> None:
    manifest, source_bucket = write_report("CSV")

    uris = list_uris(manifest, storage)

    assert uris[0] == f"s3://{source_bucket}/inv/a b+c.jpg"


def test_csv_without_version_columns(write_report: Callable[..., tuple[str, str]], storage: Storage, s3_client: BaseClient) -> None:
    manifest, source_bucket = write_report("CSV", fileSchema="Bucket, Key")
    destination, key = manifest[len("s3://"):].split("/", 1)
    document = json.loads(s3_client.get_object(Bucket=destination, Key=key)["Body"].read())
    body = gzip.compress(f'"{source_bucket}","inv/only%C3%A9.jpg"\n'.encode())
    s3_client.put_object(Bucket=destination, Key=document["files"][0]["key"], Body=body)
    s3_client.put_object(Bucket=destination, Key=document["files"][1]["key"], Body=gzip.compress(b""))

    assert list_uris(manifest, storage) == [f"s3://{source_bucket}/inv/only\u00e9.jpg"]


def test_local_manifest_reads_s3_data(write_report: Callable[..., tuple[str, str]], storage: Storage, s3_client: BaseClient, tmp_path: Path) -> None:
    manifest, source_bucket = write_report("Parquet")
    destination, key = manifest[len("s3://"):].split("/", 1)
    local = tmp_path / "manifest.json"
    local.write_bytes(s3_client.get_object(Bucket=destination, Key=key)["Body"].read())

    assert list_uris(str(local), storage) == [f"s3://{source_bucket}/{key}" for key in EXPECTED_KEYS]


def test_orc_rejected(write_report: Callable[..., tuple[str, str]], storage: Storage) -> None:
    manifest, _ = write_report("CSV", fileFormat="ORC")

    with pytest.raises(ManifestError, match="ORC files.*output format to CSV or Parquet") as raised:
        list_uris(manifest, storage)

    assert isinstance(raised.value, InvalidJobSpec)


def test_missing_field_rejected(storage: Storage, s3_client: BaseClient, make_bucket: Callable[[], str]) -> None:
    bucket = make_bucket()
    s3_client.put_object(Bucket=bucket, Key="report/manifest.json", Body=json.dumps({"sourceBucket": "photos", "files": []}).encode())

    with pytest.raises(ManifestError, match="has no field destinationBucket, fileFormat, fileSchema"):
        list_uris(f"s3://{bucket}/report/manifest.json", storage)


def test_invalid_destination_arn_rejected(write_report: Callable[..., tuple[str, str]], storage: Storage) -> None:
    manifest, _ = write_report("CSV", destinationBucket="not-an-arn")

    with pytest.raises(ManifestError, match="destinationBucket 'not-an-arn' is not a bucket ARN"):
        list_uris(manifest, storage)


def test_source_bucket_outside_allowed_rejected(write_report: Callable[..., tuple[str, str]], storage: Storage) -> None:
    manifest, source_bucket = write_report("CSV")

    with pytest.raises(ManifestError, match=f"sourceBucket bucket '{source_bucket}'.*CLIPFLEET_ALLOWED_BUCKETS"):
        list_uris(manifest, storage, allowed=("photos",))


def test_source_bucket_allowed_lists(write_report: Callable[..., tuple[str, str]], storage: Storage) -> None:
    manifest, source_bucket = write_report("CSV")

    assert len(list_uris(manifest, storage, allowed=(source_bucket,))) == 3


def test_invalid_json_rejected(storage: Storage, tmp_path: Path) -> None:
    local = tmp_path / "manifest.json"
    local.write_text("{not json", encoding="utf-8")

    with pytest.raises(ManifestError, match="is not valid JSON"):
        list_uris(str(local), storage)


def test_missing_data_file_raises_source_error(write_report: Callable[..., tuple[str, str]], storage: Storage) -> None:
    manifest, _ = write_report("CSV", files=[{"key": "inventory/missing.csv.gz"}])

    with pytest.raises(SourceError, match="inventory/missing.csv.gz"):
        list_uris(manifest, storage)


def test_corrupt_csv_data_file_rejected(write_report: Callable[..., tuple[str, str]], storage: Storage, s3_client: BaseClient) -> None:
    manifest, _ = write_report("CSV")
    destination = manifest[len("s3://"):].split("/", 1)[0]
    s3_client.put_object(Bucket=destination, Key="inventory/bad.csv.gz", Body=b"plain text, not gzip\n")
    broken, _ = write_report("CSV", destinationBucket=f"arn:aws:s3:::{destination}", files=[{"key": "inventory/bad.csv.gz"}])

    with pytest.raises(ManifestError, match=r"data file s3://.*/inventory/bad.csv.gz is not gzip-compressed CSV"):
        list_uris(broken, storage)


def test_corrupt_parquet_data_file_rejected(write_report: Callable[..., tuple[str, str]], storage: Storage, s3_client: BaseClient) -> None:
    manifest, _ = write_report("Parquet")
    destination = manifest[len("s3://"):].split("/", 1)[0]
    s3_client.put_object(Bucket=destination, Key="inventory/bad.parquet", Body=b"PAR1 broken PAR1")
    broken, _ = write_report("Parquet", destinationBucket=f"arn:aws:s3:::{destination}", files=[{"key": "inventory/bad.parquet"}])

    with pytest.raises(ManifestError, match="inventory/bad.parquet is not a valid Parquet file"):
        list_uris(broken, storage)


def test_inventory_in_several_sources(write_report: Callable[..., tuple[str, str]], storage: Storage) -> None:
    csv_manifest, csv_bucket = write_report("CSV")
    parquet_manifest, parquet_bucket = write_report("Parquet")

    uris = list(iter_sources([parquet_manifest, csv_manifest], storage, DEFAULT_IMAGE_EXTENSIONS))

    assert uris == [f"s3://{parquet_bucket}/{key}" for key in EXPECTED_KEYS] + [f"s3://{csv_bucket}/{key}" for key in EXPECTED_KEYS]


@pytest.mark.parametrize(("name", "expected"), [
    ("s3://b/x/manifest.json", True),
    ("/data/MANIFEST.JSON", True),
    ("s3://b/x/other-manifest.json", False),
    ("s3://b/x/manifest.json/", False),
])
def test_inventory_manifest_name(name: str, expected: bool) -> None:
    assert is_inventory_manifest(name) is expected
