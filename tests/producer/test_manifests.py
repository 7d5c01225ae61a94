"""Tests for producer.manifests: every manifest format, gzip variants, corrupt files and repeats, local and in S3."""

from __future__ import annotations

import gzip
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.client import BaseClient

from producer.constants import DEFAULT_IMAGE_EXTENSIONS
from producer.errors import InvalidJobSpec
from producer.manifests import ManifestError, manifest_format
from producer.sources import ListingStats, iter_source, iter_sources
from producer.storage import Storage

ENTRIES = ["s3://photos/a.jpg", "s3://photos/b c.jpg", "s3://photos/caf\u00e9/\u732b.png"]


def parquet_bytes(values: list[str | None], column: str = "uri") -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({column: pa.array(values, type=pa.string()), "id": list(range(len(values)))}), buffer)
    return buffer.getvalue()


def txt_bytes(values: list[str]) -> bytes:
    return ("# exported list\n\n" + "\n".join(values) + "\n").encode("utf-8")


def csv_bytes(values: list[str]) -> bytes:
    return ("id,uri\n" + "".join(f'{index},"{value}"\n' for index, value in enumerate(values))).encode("utf-8")


def jsonl_bytes(values: list[str]) -> bytes:
    return "".join(json.dumps({"uri": value, "id": index}) + "\n" for index, value in enumerate(values)).encode("utf-8")


ENCODERS = {"txt": txt_bytes, "csv": csv_bytes, "jsonl": jsonl_bytes, "parquet": parquet_bytes}
FORMAT_CASES = [
    pytest.param("list.txt", "txt", False, id="txt"),
    pytest.param("list.csv", "csv", False, id="csv"),
    pytest.param("list.jsonl", "jsonl", False, id="jsonl"),
    pytest.param("list.parquet", "parquet", False, id="parquet"),
    pytest.param("list.txt.gz", "txt", True, id="txt-gz"),
    pytest.param("list.csv.gz", "csv", True, id="csv-gz"),
    pytest.param("LIST.JSONL.GZ", "jsonl", True, id="jsonl-gz-upper-case"),
]


@pytest.fixture(scope="module")
def storage(s3_server) -> Storage:
    return Storage(endpoint_url=s3_server.endpoint_url)


@pytest.fixture(params=["local", "s3"])
def place(
    request: pytest.FixtureRequest, tmp_path: Path, s3_client: BaseClient, make_bucket: Callable[[], str]
) -> Callable[[str, bytes], str]:
    """A function that stores a manifest's bytes as a local file or an S3 object and returns its location."""

    def store(name: str, data: bytes) -> str:
        if request.param == "local":
            path = tmp_path / name
            path.write_bytes(data)
            return str(path)
        bucket = make_bucket()
        s3_client.put_object(Bucket=bucket, Key=f"manifests/{name}", Body=data)
        return f"s3://{bucket}/manifests/{name}"

    return store


def encode(kind: str, compressed: bool, values: list[str]) -> bytes:
    data = ENCODERS[kind](values)
    return gzip.compress(data) if compressed else data


def list_uris(source: str, storage: Storage, stats: ListingStats | None = None) -> list[str]:
    return list(iter_source(source, storage, DEFAULT_IMAGE_EXTENSIONS, stats))


@pytest.mark.parametrize(("name", "expected"), [
    ("a.txt", ("txt", False)),
    ("a.CSV.GZ", ("csv", True)),
    ("a.parquet", ("parquet", False)),
    ("a.parquet.gz", None),
    ("a.json", None),
    ("a.gz", None),
])
def test_manifest_format_by_suffix(name: str, expected: tuple[str, bool] | None) -> None:
    assert manifest_format(name) == expected


@pytest.mark.parametrize(("name", "kind", "compressed"), FORMAT_CASES)
def test_format_lists_entries_in_order(
    place: Callable[[str, bytes], str], storage: Storage, name: str, kind: str, compressed: bool
) -> None:
    source = place(name, encode(kind, compressed, ENTRIES))

    assert list_uris(source, storage) == ENTRIES


# Each malformed value sits on the third entry; the first two are valid, so nothing may be yielded before it.
MALFORMED = {
    "txt": ("http://example.com/c.jpg", "line 5"),  # two header lines come first in txt_bytes
    "csv": ("s3://Bad_Bucket/c.jpg", "line 4"),
    "jsonl": (None, "line 3 is not valid JSON"),
    "parquet": ("file:///etc/c.jpg", "row 3"),
}


def malformed_bytes(kind: str) -> bytes:
    value, _ = MALFORMED[kind]
    if kind == "jsonl":
        return jsonl_bytes(ENTRIES[:2]) + b'{"uri": s3://photos/c.jpg}\n'
    return ENCODERS[kind]([*ENTRIES[:2], value])


@pytest.mark.parametrize(("name", "kind", "compressed"), FORMAT_CASES)
def test_malformed_entry_rejected_before_first_uri(
    place: Callable[[str, bytes], str], storage: Storage, name: str, kind: str, compressed: bool
) -> None:
    data = malformed_bytes(kind)
    source = place(name, gzip.compress(data) if compressed else data)
    uris = iter_source(source, storage, DEFAULT_IMAGE_EXTENSIONS)

    with pytest.raises(ManifestError, match=MALFORMED[kind][1]) as raised:
        next(uris)

    assert isinstance(raised.value, InvalidJobSpec)


@pytest.mark.parametrize("name", ["list.txt.gz", "list.csv.gz", "list.jsonl.gz"])
def test_corrupt_gzip_rejected(place: Callable[[str, bytes], str], storage: Storage, name: str) -> None:
    source = place(name, b"\x1f\x8b\x08\x00" + b"\x00not deflate data" * 8)

    with pytest.raises(ManifestError, match=r"is not a valid gzip file .*compress it again"):
        list_uris(source, storage)


def test_truncated_gzip_rejected(place: Callable[[str, bytes], str], storage: Storage) -> None:
    data = gzip.compress(txt_bytes([f"s3://photos/{index}.jpg" for index in range(5000)]))
    source = place("list.txt.gz", data[: len(data) // 2])

    with pytest.raises(ManifestError, match="is not a valid gzip file"):
        list_uris(source, storage)


def test_plain_text_named_gz_rejected(place: Callable[[str, bytes], str], storage: Storage) -> None:
    source = place("list.txt.gz", txt_bytes(ENTRIES))

    with pytest.raises(ManifestError, match="drop the .gz suffix if it is plain text"):
        list_uris(source, storage)


def test_corrupt_parquet_rejected(place: Callable[[str, bytes], str], storage: Storage) -> None:
    source = place("list.parquet", b"PAR1" + b"\x00garbage" * 50 + b"PAR1")

    with pytest.raises(ManifestError, match=r"list.parquet is not a valid Parquet file .*write it again"):
        list_uris(source, storage)


def test_truncated_parquet_rejected(place: Callable[[str, bytes], str], storage: Storage) -> None:
    data = parquet_bytes(ENTRIES)
    source = place("list.parquet", data[:-20])

    with pytest.raises(ManifestError, match="is not a valid Parquet file"):
        list_uris(source, storage)


def test_parquet_without_uri_column_rejected(place: Callable[[str, bytes], str], storage: Storage) -> None:
    source = place("list.parquet", parquet_bytes(ENTRIES, column="path"))

    with pytest.raises(ManifestError, match="has no column 'uri' \\(its columns: path, id\\)"):
        list_uris(source, storage)


def test_parquet_non_string_uri_rejected(tmp_path: Path, storage: Storage) -> None:
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": [1, 2]}), path)

    with pytest.raises(ManifestError, match="column 'uri' has type int64"):
        list_uris(str(path), storage)


def test_parquet_null_values_skipped(tmp_path: Path, storage: Storage) -> None:
    path = tmp_path / "list.parquet"
    path.write_bytes(parquet_bytes(["s3://photos/a.jpg", None, "  ", "s3://photos/b.jpg"]))

    assert list_uris(str(path), storage) == ["s3://photos/a.jpg", "s3://photos/b.jpg"]


def test_parquet_local_relative_paths_resolved(tmp_path: Path, storage: Storage) -> None:
    path = tmp_path / "lists" / "list.parquet"
    path.parent.mkdir()
    path.write_bytes(parquet_bytes(["a.jpg", "sub/b.png"]))

    assert list_uris(str(path), storage) == [str(tmp_path / "lists" / "a.jpg"), str(tmp_path / "lists" / "sub" / "b.png")]


def test_non_utf8_line_rejected(tmp_path: Path, storage: Storage) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes(b"s3://photos/a.jpg\ns3://photos/\xff.jpg\n")

    with pytest.raises(ManifestError, match="near line 1 is not UTF-8 text"):
        list_uris(str(path), storage)


def test_carriage_return_kept_inside_txt_line(tmp_path: Path, storage: Storage) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes(b"s3://photos/a\rb.jpg\r\ns3://photos/c.jpg\n")

    assert list_uris(str(path), storage) == ["s3://photos/a\rb.jpg", "s3://photos/c.jpg"]


# --- repeats in a manifest larger than the fingerprint cache --------------------------------------

DISTINCT_URIS = 20_000
TINY_CACHE_KIB = 16


def test_repeats_dropped_beyond_cache(
    tmp_path: Path, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("producer.fingerprints.DEFAULT_CACHE_KIB", TINY_CACHE_KIB)
    distinct = [f"s3://photos/{index:06d}.jpg" for index in range(DISTINCT_URIS)]
    repeats = random.Random(7).sample(distinct, k=DISTINCT_URIS // 2)
    path = tmp_path / "list.txt.gz"
    path.write_bytes(gzip.compress(txt_bytes(distinct + repeats + distinct[:3])))
    stats = ListingStats()

    uris = list_uris(str(path), storage, stats)

    assert uris == distinct
    assert stats.listed == DISTINCT_URIS
    assert stats.duplicates == DISTINCT_URIS // 2 + 3
    assert stats.duplicate_examples == repeats[:5]


def test_repeats_across_manifests_dropped(tmp_path: Path, storage: Storage) -> None:
    first = tmp_path / "first.txt"
    first.write_text("s3://photos/a.jpg\ns3://photos/b.jpg\n", encoding="utf-8")
    second = tmp_path / "second.csv"
    second.write_text("uri\ns3://photos/b.jpg\ns3://photos/c.jpg\n", encoding="utf-8")
    stats = ListingStats()

    uris = list(iter_sources([str(first), str(second)], storage, DEFAULT_IMAGE_EXTENSIONS, stats))

    assert uris == ["s3://photos/a.jpg", "s3://photos/b.jpg", "s3://photos/c.jpg"]
    assert stats.duplicates == 1


def test_spool_files_removed_after_listing(
    s3_client: BaseClient, make_bucket: Callable[[], str], storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    bucket = make_bucket()
    s3_client.put_object(Bucket=bucket, Key="list.csv.gz", Body=encode("csv", True, ENTRIES))

    uris = list_uris(f"s3://{bucket}/list.csv.gz", storage)

    assert uris == ENTRIES
    assert list(tmp_path.iterdir()) == []
