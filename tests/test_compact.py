"""Parquet results and `clipfleet compact` on real components: a redis-server process, moto's S3 server
over HTTP and a Celery worker process with the tiny CLIP checkpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer import Client
from producer.cli import _spec, build_parser, main
from producer.client import Job, make_spec
from producer.compact import CompactionRejected, compact_job
from producer.errors import StorageError
from producer.formats import RESULT_SCHEMA, decode_jsonl
from producer.results import iter_results
from producer.settings import Settings
from tests.support.worker import stack_client, worker_stack

DATA = Path(__file__).resolve().parent / "data"
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
PHOTOS = ["chelsea.jpg", "rocket.jpg", "coffee.jpg", "astronaut.jpg"]
BATCH_SIZE = 2
WAIT_S = 180
# A queue no worker reads, so a job sent there stays running.
IDLE_QUEUE = "clipfleet-compact-idle"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    exact = {"CLIPFLEET_DTYPE": "float32", "CLIPFLEET_JPEG_DRAFT": "false"}
    with worker_stack(tmp_path_factory.mktemp("compact-worker-logs"), tiny_clip_dir, exact) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: dict[str, Any], tiny_clip_dir: Path) -> Client:
    return stack_client(stack, tiny_clip_dir)


@pytest.fixture(scope="module")
def source(client: Client) -> dict[str, Any]:
    """A manifest of 4 photos, a corrupt JPEG, a missing key and the photos again under other keys: 10 images."""
    s3 = client.storage.client
    bucket = "clipfleet-compact-input"
    s3.create_bucket(Bucket=bucket)
    s3.create_bucket(Bucket="clipfleet-compact-output")
    uris = []
    for copy in ("a", "b"):
        for photo in PHOTOS:
            s3.put_object(Bucket=bucket, Key=f"in/{copy}/{photo}", Body=(DATA / photo).read_bytes())
            uris.append(f"s3://{bucket}/in/{copy}/{photo}")
    s3.put_object(Bucket=bucket, Key="in/corrupt.jpg", Body=b"\xff\xd8\xff\xe0 this is not a JPEG")
    uris.insert(3, f"s3://{bucket}/in/corrupt.jpg")
    uris.insert(6, f"s3://{bucket}/in/missing.jpg")
    s3.put_object(Bucket=bucket, Key="manifests/list.txt", Body="\n".join(uris).encode())
    return {"manifest": f"s3://{bucket}/manifests/list.txt", "uris": uris, "output_bucket": "clipfleet-compact-output"}


def run_job(client: Client, source: dict[str, Any], output: str, shard_format: str) -> Job:
    spec = make_spec(client.settings, source["manifest"], LABELS, output, batch_size=BATCH_SIZE, top_k=3, format=shard_format)
    job = client.submit_spec(spec)
    status = job.wait(timeout_s=WAIT_S, progress=False)
    assert status.state == "succeeded", status
    return job


@pytest.fixture(scope="module")
def jsonl_job(client: Client, source: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Job:
    return run_job(client, source, str(tmp_path_factory.mktemp("jsonl-out")), "jsonl")


@pytest.fixture(scope="module")
def parquet_job(client: Client, source: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Job:
    return run_job(client, source, str(tmp_path_factory.mktemp("parquet-out")), "parquet")


@pytest.fixture(scope="module")
def s3_parquet_job(client: Client, source: dict[str, Any]) -> Job:
    return run_job(client, source, f"s3://{source['output_bucket']}/parquet/", "parquet")


@pytest.fixture(scope="module")
def expected_rows(jsonl_job: Job) -> list[dict[str, Any]]:
    """The rows of the JSONL run, read from its shard files directly."""
    folder = Path(jsonl_job.output)
    return [row for path in sorted(folder.glob("part-*.jsonl")) for row in decode_jsonl(path.read_bytes())]


@pytest.fixture
def cli_environment(stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFLEET_REDIS_URL", stack["redis_url"])
    monkeypatch.setenv("CLIPFLEET_S3_ENDPOINT_URL", stack["s3"].endpoint_url)


def shard_paths(job: Job) -> list[str]:
    return [str(path) for path in sorted(Path(job.output).glob("part-*.parquet"))]


def s3_keys(client: Client, bucket: str, prefix: str) -> list[str]:
    listing = client.storage.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"][len(prefix):] for item in listing.get("Contents", []))


def missing_as_none(column: pd.Series) -> list[Any]:
    """Return a column's values with pandas' missing-value markers (NaN for strings and floats) as None."""
    return [None if pd.isna(value) else value for value in column.tolist()]


def read_manifest(job: Job) -> dict[str, Any]:
    return json.loads(Path(job.output, "compacted", "_MANIFEST.json").read_text())


# --- Parquet shards ---------------------------------------------------------------------------------


def test_format_option_reaches_spec(tmp_path: Path) -> None:
    argv = ["submit", str(tmp_path / "in"), "--labels", "cat", "--output", str(tmp_path / "out"), "--format", "parquet"]

    spec = _spec(Settings(), build_parser().parse_args(argv))

    assert spec.format == "parquet"


def test_parquet_shards_named_by_batch(parquet_job: Job) -> None:
    names = sorted(path.name for path in Path(parquet_job.output).iterdir())

    assert names == ["_SUCCESS.json"] + [f"part-{batch:06d}.parquet" for batch in range(5)]


def test_jsonl_stays_default_format(jsonl_job: Job) -> None:
    names = sorted(path.name for path in Path(jsonl_job.output).iterdir())

    assert names == ["_SUCCESS.json"] + [f"part-{batch:06d}.jsonl" for batch in range(5)]


def test_parquet_results_equal_jsonl_run(parquet_job: Job, expected_rows: list[dict[str, Any]], source: dict[str, Any]) -> None:
    rows = list(parquet_job.results())

    assert [row["uri"] for row in expected_rows] == source["uris"]
    assert rows == expected_rows


def test_pyarrow_reads_parquet_shards(parquet_job: Job, expected_rows: list[dict[str, Any]]) -> None:
    table = pq.read_table(shard_paths(parquet_job))

    assert table.schema.equals(RESULT_SCHEMA, check_metadata=False)
    assert table.to_pylist() == expected_rows


def test_pandas_reads_parquet_shards(parquet_job: Job, expected_rows: list[dict[str, Any]]) -> None:
    frame = pd.read_parquet(shard_paths(parquet_job))

    assert list(frame.columns) == ["uri", "label", "score", "top_k", "error"]
    assert frame["uri"].tolist() == [row["uri"] for row in expected_rows]
    assert missing_as_none(frame["label"]) == [row["label"] for row in expected_rows]
    assert missing_as_none(frame["score"]) == [row["score"] for row in expected_rows]
    assert [list(top_k) for top_k in frame["top_k"]] == [row["top_k"] for row in expected_rows]
    assert frame["error"].tolist() == [row["error"] for row in expected_rows]


def test_duckdb_reads_parquet_shards(parquet_job: Job, expected_rows: list[dict[str, Any]]) -> None:
    query = (
        "select uri, label, score, len(top_k), top_k[1].score, error.code "
        f"from read_parquet('{parquet_job.output}/part-*.parquet') order by uri"
    )

    found = duckdb.sql(query).fetchall()

    expected = sorted(
        (row["uri"], row["label"], row["score"], len(row["top_k"]), row["top_k"][0]["score"] if row["top_k"] else None,
         row["error"]["code"] if row["error"] else None)
        for row in expected_rows
    )
    assert found == expected


def test_failed_images_error_structs(parquet_job: Job, source: dict[str, Any]) -> None:
    query = f"select uri, error.code, error.message, label, score, len(top_k) from read_parquet({shard_paths(parquet_job)!r}) where error is not null order by uri"

    failed = duckdb.sql(query).fetchall()

    bucket = source["manifest"].split("/")[2]
    assert [(uri, code) for uri, code, *_ in failed] == [(f"s3://{bucket}/in/corrupt.jpg", "decode_error"), (f"s3://{bucket}/in/missing.jpg", "not_found")]
    assert all(message for _, _, message, *_ in failed)
    assert [(label, score, top_k) for _, _, _, label, score, top_k in failed] == [(None, None, 0), (None, None, 0)]


def test_s3_parquet_shards_read_after_download(
    client: Client, s3_parquet_job: Job, source: dict[str, Any], expected_rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    bucket = source["output_bucket"]
    prefix = f"parquet/{s3_parquet_job.id}/"
    paths = []
    for name in s3_keys(client, bucket, prefix):
        if name.endswith(".parquet"):
            client.storage.client.download_file(bucket, prefix + name, str(tmp_path / name))
            paths.append(str(tmp_path / name))

    found = duckdb.sql(f"select uri, label, score, error from read_parquet({paths!r})").fetchall()

    assert len(paths) == 5
    assert found == [(row["uri"], row["label"], row["score"], row["error"]) for row in expected_rows]


def test_cli_results_same_json(jsonl_job: Job, parquet_job: Job, cli_environment: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["results", jsonl_job.id]) == 0
    from_jsonl = capsys.readouterr().out
    assert main(["results", parquet_job.id]) == 0
    from_parquet = capsys.readouterr().out

    assert len(from_jsonl.splitlines()) == 10
    assert from_parquet == from_jsonl


# --- compaction -------------------------------------------------------------------------------------


def test_compact_jsonl_several_files(client: Client, jsonl_job: Job, expected_rows: list[dict[str, Any]]) -> None:
    shard_sizes = [path.stat().st_size for path in sorted(Path(jsonl_job.output).glob("part-*.jsonl"))]
    target_size_bytes = shard_sizes[0] + shard_sizes[1]
    leftover = Path(jsonl_job.output, "compacted", "part-00009.jsonl")
    leftover.parent.mkdir()
    leftover.write_text("left by an interrupted compaction\n")

    compaction = compact_job(client.store, client.storage, jsonl_job.id, target_size_bytes)

    files = [Path(item.location) for item in compaction.files]
    assert len(files) >= 2
    assert [row for path in files for row in decode_jsonl(path.read_bytes())] == expected_rows
    for item in compaction.files[:-1]:
        assert item.size_bytes >= target_size_bytes
        assert item.size_bytes - shard_sizes[item.last_batch] < target_size_bytes
    assert sorted(path.name for path in files[0].parent.iterdir()) == ["_MANIFEST.json"] + [path.name for path in files]
    assert len(list(Path(jsonl_job.output).glob("part-*.jsonl"))) == 5


def test_compact_manifest_contents(client: Client, jsonl_job: Job) -> None:
    if not Path(jsonl_job.output, "compacted", "_MANIFEST.json").exists():
        compact_job(client.store, client.storage, jsonl_job.id, 1)
    manifest = read_manifest(jsonl_job)

    files = manifest["files"]
    assert (manifest["job_id"], manifest["format"], manifest["job_state"]) == (jsonl_job.id, "jsonl", "succeeded")
    assert (manifest["rows"], manifest["shards"], manifest["delete_shards"]) == (10, 5, False)
    assert [item["name"] for item in files] == [f"part-{index:05d}.jsonl" for index in range(len(files))]
    assert sum(item["rows"] for item in files) == 10
    assert files[0]["first_batch"] == 0
    assert files[-1]["last_batch"] == 4
    for before, after in zip(files, files[1:]):
        assert after["first_batch"] == before["last_batch"] + 1
    for item in files:
        assert item["rows"] == BATCH_SIZE * item["shards"]
        assert item["size_bytes"] == Path(jsonl_job.output, "compacted", item["name"]).stat().st_size


def test_compact_parquet_several_files(client: Client, parquet_job: Job, expected_rows: list[dict[str, Any]]) -> None:
    # Each 2-row shard takes about 280 bytes as Arrow data, so rows are written in row groups of a few
    # shards, and each file is closed after its first row group.
    compaction = compact_job(client.store, client.storage, parquet_job.id, 600)

    tables = [pq.read_table(item.location) for item in compaction.files]
    assert len(tables) >= 2
    assert max(item.shards for item in compaction.files) >= 2
    assert pa.concat_tables(tables).to_pylist() == expected_rows
    assert all(table.schema.equals(RESULT_SCHEMA, check_metadata=False) for table in tables)
    assert all(item.size_bytes >= 600 for item in compaction.files[:-1])
    assert [item.rows for item in compaction.files] == [table.num_rows for table in tables]
    assert read_manifest(parquet_job)["files"][0]["name"] == "part-00000.parquet"


def test_compacted_parquet_read_by_duckdb(client: Client, parquet_job: Job, expected_rows: list[dict[str, Any]]) -> None:
    if not Path(parquet_job.output, "compacted", "_MANIFEST.json").exists():
        compact_job(client.store, client.storage, parquet_job.id, 600)

    found = duckdb.sql(f"select uri, score from read_parquet('{parquet_job.output}/compacted/*.parquet') order by uri").fetchall()

    assert found == sorted((row["uri"], row["score"]) for row in expected_rows)


def test_compact_again_rejected(client: Client, jsonl_job: Job) -> None:
    if not Path(jsonl_job.output, "compacted", "_MANIFEST.json").exists():
        compact_job(client.store, client.storage, jsonl_job.id, 1)

    with pytest.raises(CompactionRejected, match="already compacted"):
        compact_job(client.store, client.storage, jsonl_job.id, 1)


def test_compact_cli_delete_shards(
    client: Client, source: dict[str, Any], expected_rows: list[dict[str, Any]], cli_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    job = run_job(client, source, f"s3://{source['output_bucket']}/deleted/", "parquet")
    bucket, prefix = source["output_bucket"], f"deleted/{job.id}/"

    code = main(["compact", job.id, "--target-size-mb", "0.001", "--format", "jsonl", "--delete-shards"])

    output = capsys.readouterr()
    keys = s3_keys(client, bucket, prefix)
    assert code == 0
    assert "deleted 5 shards" in output.err
    assert [key for key in keys if not key.startswith("compacted/")] == ["_SUCCESS.json"]
    manifest = json.loads(client.storage.client.get_object(Bucket=bucket, Key=prefix + "compacted/_MANIFEST.json")["Body"].read())
    assert manifest["delete_shards"] is True
    assert manifest["format"] == "jsonl"
    names = [item["name"] for item in manifest["files"]]
    assert len(names) >= 2
    assert sorted(key for key in keys if key.startswith("compacted/part-")) == sorted(f"compacted/{name}" for name in names)
    bodies = [client.storage.client.get_object(Bucket=bucket, Key=f"{prefix}compacted/{name}")["Body"].read() for name in names]
    assert [row for body in bodies for row in decode_jsonl(body)] == expected_rows
    assert len(output.out.splitlines()) == len(names)


def test_compact_cli_rejects_compacted_without_shards(
    client: Client, source: dict[str, Any], cli_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    job = run_job(client, source, f"s3://{source['output_bucket']}/twice/", "jsonl")
    assert main(["compact", job.id, "--delete-shards"]) == 0
    capsys.readouterr()

    code = main(["compact", job.id])

    assert code == 1
    assert "its shards deleted" in capsys.readouterr().err


def test_compact_rejects_running_job(
    client: Client, source: dict[str, Any], tmp_path: Path, cli_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    job = run_job(client, source, str(tmp_path / "out"), "parquet")
    idle = Client(Settings(redis_url=client.settings.redis_url, s3_endpoint_url=client.settings.s3_endpoint_url, queue=IDLE_QUEUE))
    try:
        retry = idle.job(job.id).retry()
        assert retry.round == 1
        assert job.status().state == "running"

        with pytest.raises(CompactionRejected, match="is running"):
            compact_job(client.store, client.storage, job.id)
        code = main(["compact", job.id])

        assert code == 1
        assert f"job {job.id} is running" in capsys.readouterr().err
        assert not Path(job.output, "compacted").exists()
    finally:
        job.cancel()
        idle.store.redis.delete(IDLE_QUEUE)
        idle._celery.close()
        idle.store.redis.close()


def test_compact_cancelled_job(client: Client, source: dict[str, Any], tmp_path: Path) -> None:
    job = run_job(client, source, str(tmp_path / "out"), "jsonl")
    idle = Client(Settings(redis_url=client.settings.redis_url, s3_endpoint_url=client.settings.s3_endpoint_url, queue=IDLE_QUEUE))
    try:
        idle.job(job.id).retry()
        assert job.cancel()
    finally:
        idle.store.redis.delete(IDLE_QUEUE)
        idle._celery.close()
        idle.store.redis.close()

    compaction = compact_job(client.store, client.storage, job.id, output_format="parquet")

    assert job.status().state == "cancelled"
    assert [item.name for item in compaction.files] == ["part-00000.parquet"]
    assert pq.read_table(compaction.files[0].location).to_pylist() == list(iter_results(client.storage, job.spec, job.id))


def test_compact_corrupt_shard_writes_nothing(client: Client, source: dict[str, Any], tmp_path: Path) -> None:
    job = run_job(client, source, str(tmp_path / "out"), "parquet")
    shard = Path(job.output, "part-000003.parquet")
    shard.write_bytes(shard.read_bytes()[:100])

    with pytest.raises(StorageError, match="part-000003.parquet") as caught:
        compact_job(client.store, client.storage, job.id, 1, delete_shards=True)

    assert "cannot be compacted" in str(caught.value)
    assert not Path(job.output, "compacted", "_MANIFEST.json").exists()
    assert not [path for path in Path(job.output, "compacted").iterdir() if path.name.startswith(".")]
    assert len(list(Path(job.output).glob("part-*.parquet"))) == 5


def test_parquet_retry_round_rewrites_parquet(client: Client, source: dict[str, Any], tmp_path: Path) -> None:
    job = run_job(client, source, str(tmp_path / "out"), "parquet")
    bucket = source["manifest"].split("/")[2]
    missing = f"s3://{bucket}/in/missing.jpg"
    client.storage.client.put_object(Bucket=bucket, Key="in/missing.jpg", Body=(DATA / "rocket.jpg").read_bytes())
    try:
        retry = job.retry(["not_found"])
        status = job.wait(timeout_s=WAIT_S, progress=False)
    finally:
        client.storage.client.delete_object(Bucket=bucket, Key="in/missing.jpg")

    rows = {row["uri"]: row for row in job.results()}
    assert retry.batches == 1
    assert status.state == "succeeded"
    assert rows[missing]["error"] is None
    assert rows[missing]["label"] in LABELS
    assert sorted(path.name for path in Path(job.output).glob("part-*")) == [f"part-{batch:06d}.parquet" for batch in range(5)]
