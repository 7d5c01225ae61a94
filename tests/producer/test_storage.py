"""Tests for producer.storage: atomic local writes, S3 reads and writes on moto's server, listing and joining."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.client import BaseClient

from producer.errors import StorageError
from producer.storage import Storage, join_location


@pytest.fixture(scope="module")
def storage(s3_server) -> Storage:
    return Storage(endpoint_url=s3_server.endpoint_url)


# --- local files ----------------------------------------------------------------------------------


def test_local_write_creates_folders(tmp_path: Path, storage: Storage) -> None:
    target = tmp_path / "out" / "job" / "part-000000.jsonl"

    storage.put_bytes(str(target), b'{"uri": "a"}\n')

    assert target.read_bytes() == b'{"uri": "a"}\n'


def test_local_write_replaces_content(tmp_path: Path, storage: Storage) -> None:
    target = tmp_path / "part-000000.jsonl"
    storage.put_bytes(str(target), b"first version, longer than the second\n")

    storage.put_bytes(str(target), b"second\n")

    assert target.read_bytes() == b"second\n"


def test_local_write_leaves_no_temporary_file(tmp_path: Path, storage: Storage) -> None:
    target = tmp_path / "part-000000.jsonl"

    storage.put_bytes(str(target), b"one\n")
    storage.put_bytes(str(target), b"two\n")

    assert sorted(os.listdir(tmp_path)) == ["part-000000.jsonl"]


def test_local_write_mode_readable(tmp_path: Path, storage: Storage) -> None:
    target = tmp_path / "_SUCCESS.json"

    storage.put_bytes(str(target), b"{}")

    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_local_write_failure_names_location(tmp_path: Path, storage: Storage) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file where a folder is expected")
    target = blocker / "part-000000.jsonl"

    with pytest.raises(StorageError, match="blocker/part-000000.jsonl"):
        storage.put_bytes(str(target), b"x")


def test_local_read_round_trip(tmp_path: Path, storage: Storage) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"\x00\x01\xff")

    assert storage.get_bytes(str(target)) == b"\x00\x01\xff"


def test_local_read_missing_names_location(tmp_path: Path, storage: Storage) -> None:
    missing = tmp_path / "missing.jsonl"

    with pytest.raises(StorageError, match="missing.jsonl"):
        storage.get_bytes(str(missing))


def test_local_list_names_files_only(tmp_path: Path, storage: Storage) -> None:
    for name in ("part-000001.jsonl", "_SUCCESS.json", "part-000000.jsonl"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "part-000002.jsonl").write_bytes(b"x")

    assert storage.list_names(str(tmp_path)) == ["_SUCCESS.json", "part-000000.jsonl", "part-000001.jsonl"]


def test_local_list_names_missing_folder_empty(tmp_path: Path, storage: Storage) -> None:
    assert storage.list_names(str(tmp_path / "not-written-yet")) == []


def test_local_exists(tmp_path: Path, storage: Storage) -> None:
    (tmp_path / "present").write_bytes(b"x")

    assert storage.exists(str(tmp_path / "present")) is True
    assert storage.exists(str(tmp_path / "absent")) is False


# --- S3 -------------------------------------------------------------------------------------------


def test_s3_write_round_trip(storage: Storage, s3_client: BaseClient, make_bucket: Callable[[], str]) -> None:
    bucket = make_bucket()

    storage.put_bytes(f"s3://{bucket}/out/job/part-000000.jsonl", b'{"uri": "a"}\n')

    body = s3_client.get_object(Bucket=bucket, Key="out/job/part-000000.jsonl")["Body"].read()
    assert body == b'{"uri": "a"}\n'


def test_s3_write_sets_content_type(storage: Storage, s3_client: BaseClient, make_bucket: Callable[[], str]) -> None:
    bucket = make_bucket()

    storage.put_bytes(f"s3://{bucket}/_SUCCESS.json", b"{}", content_type="application/json")

    assert s3_client.head_object(Bucket=bucket, Key="_SUCCESS.json")["ContentType"] == "application/json"


def test_s3_write_replaces_object(storage: Storage, make_bucket: Callable[[], str]) -> None:
    location = f"s3://{make_bucket()}/part-000000.jsonl"
    storage.put_bytes(location, b"first\n")

    storage.put_bytes(location, b"second\n")

    assert storage.get_bytes(location) == b"second\n"


def test_s3_read_missing_key_names_location(storage: Storage, make_bucket: Callable[[], str]) -> None:
    location = f"s3://{make_bucket()}/results/missing.jsonl"

    with pytest.raises(StorageError, match=f"reading '{location}' failed"):
        storage.get_bytes(location)


def test_s3_read_missing_bucket_names_location(storage: Storage) -> None:
    with pytest.raises(StorageError, match="s3://no-such-bucket-for-reads/a.jpg"):
        storage.get_bytes("s3://no-such-bucket-for-reads/a.jpg")


def test_s3_write_missing_bucket_names_location(storage: Storage) -> None:
    with pytest.raises(StorageError, match="s3://no-such-bucket-for-writes/a.jsonl"):
        storage.put_bytes("s3://no-such-bucket-for-writes/a.jsonl", b"x")


def test_s3_exists(storage: Storage, make_bucket: Callable[[], str]) -> None:
    bucket = make_bucket()
    storage.put_bytes(f"s3://{bucket}/present.json", b"{}")

    assert storage.exists(f"s3://{bucket}/present.json") is True
    assert storage.exists(f"s3://{bucket}/absent.json") is False


@pytest.fixture
def results_bucket(s3_client: BaseClient, make_bucket: Callable[[], str]) -> str:
    bucket = make_bucket()
    for key in (
        "out/job/part-000001.jsonl",
        "out/job/part-000000.jsonl",
        "out/job/_SUCCESS.json",
        "out/job/nested/part-000002.jsonl",
        "out/jobless/part-000009.jsonl",
        "top.json",
    ):
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"x")
    return bucket


@pytest.mark.parametrize("prefix", ["out/job", "out/job/"], ids=["without-slash", "with-slash"])
def test_s3_list_names_direct_children(storage: Storage, results_bucket: str, prefix: str) -> None:
    names = storage.list_names(f"s3://{results_bucket}/{prefix}")

    assert names == ["_SUCCESS.json", "part-000000.jsonl", "part-000001.jsonl"]


def test_s3_list_names_bucket_root(storage: Storage, results_bucket: str) -> None:
    assert storage.list_names(f"s3://{results_bucket}") == ["top.json"]


def test_s3_list_names_empty_prefix(storage: Storage, results_bucket: str) -> None:
    assert storage.list_names(f"s3://{results_bucket}/not-written-yet/") == []


# --- join_location --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "names", "expected"),
    [
        pytest.param("s3://results/out", ("job", "part-000000.jsonl"), "s3://results/out/job/part-000000.jsonl", id="s3-no-slash"),
        pytest.param("s3://results/out/", ("job",), "s3://results/out/job", id="s3-trailing-slash"),
        pytest.param("s3://results", ("job", "_SUCCESS.json"), "s3://results/job/_SUCCESS.json", id="s3-bucket-only"),
        pytest.param("s3://results/", ("job",), "s3://results/job", id="s3-bucket-slash"),
        pytest.param("s3://results/a b+c%2B", ("job",), "s3://results/a b+c%2B/job", id="s3-odd-characters-kept"),
        pytest.param("/data/out", ("job", "part-000000.jsonl"), "/data/out/job/part-000000.jsonl", id="local"),
        pytest.param("/data/out/", ("job",), "/data/out/job", id="local-trailing-slash"),
    ],
)
def test_join_location(base: str, names: tuple[str, ...], expected: str) -> None:
    assert join_location(base, *names) == expected


def test_join_location_relative_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    assert join_location("out", "job") == str(tmp_path / "out" / "job")
