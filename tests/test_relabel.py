"""Stored embeddings and relabel jobs on real components: redis-server, moto's S3 server, a Celery worker process.

A source job stores its embeddings, and a full job with new labels runs while the images exist. Then the
images are deleted. A relabel job with the same new labels must give the same scores within the float16
storage precision, without fetching any image or running the image tower.
"""

from __future__ import annotations

import io
import math
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import CLIPModel

from producer import Client
from producer.client import Job
from producer.cli import main
from producer.compact import compact_job
from producer.embeddings import StoredEmbeddings, decode_embeddings, encode_embeddings, embeddings_name
from producer.embedded import free_port
from producer.relabel import RelabelNotPossible
from producer.results import list_shards
from tests.support.worker import stack_client, worker_stack

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = {"a.jpg": "astronaut.jpg", "b.jpg": "chelsea.jpg", "c.jpg": "coffee.jpg", "d.jpg": "rocket.jpg"}
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
NEW_LABELS = ["dog", "spaceship", "mug", "person in a suit", "tabby"]
TEMPLATE = "a photo of a {}."
INPUT, OUTPUT = "clipfleet-relabel-input", "clipfleet-relabel-output"
WAIT_S = 120
SCRAPE_WAIT_S = 15.0
# float16 keeps 11 significant bits, so rounding moves each component by at most 2**-11 of its value.
FLOAT16_UNIT_ROUNDOFF = 2.0**-11


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    """Redis, moto's S3 server and one float32 worker serving Prometheus metrics on a free port."""
    port = free_port()
    env = {"CLIPFLEET_DTYPE": "float32", "CLIPFLEET_JPEG_DRAFT": "false", "CLIPFLEET_METRICS_PORT": str(port)}
    with worker_stack(tmp_path_factory.mktemp("relabel-logs"), tiny_clip_dir, env) as running:
        running["metrics_port"] = port
        yield running


@pytest.fixture(scope="module")
def client(stack: dict[str, Any], tiny_clip_dir: Path) -> Client:
    client = stack_client(stack, tiny_clip_dir)
    s3 = client.storage.client
    for bucket in (INPUT, OUTPUT):
        s3.create_bucket(Bucket=bucket)
    for key, photo in PHOTOS.items():
        s3.put_object(Bucket=INPUT, Key=f"in/{key}", Body=(DATA / photo).read_bytes())
    s3.put_object(Bucket=INPUT, Key="in/e-corrupt.jpg", Body=b"\xff\xd8\xff\xe0 not a JPEG")
    return client


@pytest.fixture(scope="module")
def source(client: Client) -> dict[str, Any]:
    """The source job: 5 images (one corrupt) in batches of 2, embeddings stored as float16."""
    job = client.submit(
        source=f"s3://{INPUT}/in/", labels=LABELS, templates=[TEMPLATE], output=f"s3://{OUTPUT}/source/",
        batch_size=2, top_k=4, store_embeddings=True,
    )
    status = job.wait(timeout_s=WAIT_S, progress=False)
    return {"job": job, "status": status, "rows": list(job.results())}


@pytest.fixture(scope="module")
def full_run(client: Client, source: dict[str, Any]) -> dict[str, Any]:
    """A full job with the new labels, run while the images still exist; it stores no embeddings."""
    job = client.submit(
        source=f"s3://{INPUT}/in/", labels=NEW_LABELS, templates=[TEMPLATE], output=f"s3://{OUTPUT}/full/",
        batch_size=2, top_k=len(NEW_LABELS),
    )
    status = job.wait(timeout_s=WAIT_S, progress=False)
    return {"job": job, "status": status, "rows": list(job.results())}


@pytest.fixture(scope="module")
def source_float32(client: Client, source: dict[str, Any]) -> Job:
    """A second source job storing float32 embeddings, all 5 images in one batch, with Parquet shards."""
    job = client.submit(
        source=f"s3://{INPUT}/in/", labels=LABELS, templates=[TEMPLATE], output=f"s3://{OUTPUT}/source32/",
        batch_size=5, store_embeddings=True, embeddings_dtype="float32", format="parquet",
    )
    job.wait(timeout_s=WAIT_S, progress=False)
    return job


@pytest.fixture(scope="module")
def relabelled(
    client: Client, source: dict[str, Any], full_run: dict[str, Any], source_float32: Job, stack: dict[str, Any]
) -> dict[str, Any]:
    """The relabel job, run after every source image was deleted, with metrics scraped before and after."""
    s3 = client.storage.client
    for key in [*PHOTOS, "e-corrupt.jpg"]:
        s3.delete_object(Bucket=INPUT, Key=f"in/{key}")
    before = scrape(stack["metrics_port"])
    job = client.relabel(source["job"].id, NEW_LABELS, f"s3://{OUTPUT}/relabel/", templates=[TEMPLATE], top_k=len(NEW_LABELS))
    status = job.wait(timeout_s=WAIT_S, progress=False)
    after = scrape_until(stack["metrics_port"], "read_source", before_count(before, "read_source") + 3)
    log = stack["worker"].log_path.read_text(errors="replace")
    return {"job": job, "status": status, "rows": list(job.results()), "before": before, "after": after, "log": log}


def scrape(port: int) -> dict[str, float]:
    """Return the worker's stage-duration sample counts by stage, from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5.0) as response:
        body = response.read().decode()
    counts = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "clipfleet_stage_duration_seconds_count":
                counts[sample.labels["stage"]] = sample.value
    return counts


def before_count(counts: dict[str, float], stage: str) -> float:
    return counts.get(stage, 0.0)


def scrape_until(port: int, stage: str, expected: float) -> dict[str, float]:
    """Scrape until `stage` has `expected` samples, for at most SCRAPE_WAIT_S: the pool process records a
    batch's metrics just after the batch that finishes the job."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        counts = scrape(port)
        if counts.get(stage) == expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def stored_body(client: Client, job_id: str, folder: str, batch: int) -> bytes:
    key = f"{folder}/{job_id}/{embeddings_name(batch)}"
    return client.storage.client.get_object(Bucket=OUTPUT, Key=key)["Body"].read()


def shard_uris(rows: list[dict[str, Any]], start: int, stop: int) -> list[str]:
    return [row["uri"] for row in rows[start:stop] if row["error"] is None]


def test_source_job_succeeds(source: dict[str, Any]) -> None:
    assert source["status"].state == "succeeded"
    assert source["status"].total == 5
    assert source["status"].failed == 1


def test_one_embeddings_file_per_shard(client: Client, source: dict[str, Any]) -> None:
    job_id = source["job"].id
    names = client.storage.list_names(f"s3://{OUTPUT}/source/{job_id}")
    assert sorted(name for name in names if name.endswith(".embeddings.parquet")) == [embeddings_name(batch) for batch in range(3)]
    assert [batch for batch, _ in list_shards(client.storage, f"s3://{OUTPUT}/source/{job_id}")] == [0, 1, 2]


def test_embeddings_read_with_pyarrow(client: Client, source: dict[str, Any], tiny_clip_dir: Path) -> None:
    table = pq.read_table(io.BytesIO(stored_body(client, source["job"].id, "source", 0)))
    metadata = {key.decode(): value.decode() for key, value in table.schema.metadata.items()}
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[16]"
    assert metadata["clipfleet.model"] == str(tiny_clip_dir)
    assert metadata["clipfleet.dtype"] == "float16"
    assert metadata["clipfleet.dim"] == "16"
    assert metadata["clipfleet.normalised"] == "true"
    assert table.column("uri").to_pylist() == shard_uris(source["rows"], 0, 2)


def test_embeddings_read_with_numpy(client: Client, source: dict[str, Any]) -> None:
    for batch, (start, stop) in enumerate([(0, 2), (2, 4), (4, 5)]):
        table = pq.read_table(io.BytesIO(stored_body(client, source["job"].id, "source", batch)))
        dim = table.schema.field("embedding").type.list_size
        vectors = table.column("embedding").combine_chunks().values.to_numpy().reshape(-1, dim)
        assert vectors.dtype == np.float16
        assert vectors.shape == (len(shard_uris(source["rows"], start, stop)), 16)
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        # Rounding each component by at most 2**-11 of itself moves the norm by at most 2**-11.
        assert np.all(np.abs(norms - 1.0) <= FLOAT16_UNIT_ROUNDOFF), norms


def test_failed_image_has_no_embedding(client: Client, source: dict[str, Any]) -> None:
    stored = decode_embeddings(stored_body(client, source["job"].id, "source", 2))
    failed = [row["uri"] for row in source["rows"] if row["error"] is not None]
    assert failed == [f"s3://{INPUT}/in/e-corrupt.jpg"]
    assert stored.uris == []


def test_relabel_succeeds(relabelled: dict[str, Any]) -> None:
    status = relabelled["status"]
    assert status.state == "succeeded", status.error
    assert status.total == 5
    assert status.succeeded == 4
    assert status.failed == 1


def test_relabel_keeps_row_order(relabelled: dict[str, Any], source: dict[str, Any]) -> None:
    assert [row["uri"] for row in relabelled["rows"]] == [row["uri"] for row in source["rows"]]


def test_relabel_scores_match_full_run(relabelled: dict[str, Any], full_run: dict[str, Any], tiny_clip_dir: Path) -> None:
    """Scores equal the full run's within the float16 storage bound.

    The stored vector q of a unit embedding e has |q - e| <= u with u = 2**-11, and renormalising adds at
    most u more, so each cosine with a unit text embedding moves by at most 2u, each logit by at most
    2u * logit_scale, and each log-softmax score by at most twice that: 4u * logit_scale.
    """
    logit_scale = CLIPModel.from_pretrained(str(tiny_clip_dir)).logit_scale.exp().item()
    bound = 4 * FLOAT16_UNIT_ROUNDOFF * logit_scale + 1e-5  # 1e-5: float32 differences between two full runs
    full = {row["uri"]: row for row in full_run["rows"]}
    compared = 0
    for row in relabelled["rows"]:
        if row["error"] is not None:
            continue
        expected = {item["label"]: item["score"] for item in full[row["uri"]]["top_k"]}
        for item in row["top_k"]:
            assert abs(math.log(item["score"]) - math.log(expected[item["label"]])) <= bound, (row["uri"], item, expected)
            compared += 1
    assert compared == 4 * len(NEW_LABELS)


def test_float32_relabel_matches_full_run(client: Client, source_float32: Job, relabelled: dict[str, Any], full_run: dict[str, Any]) -> None:
    """With float32 storage the relabel scores equal the full run's to float32 rounding (source images deleted).
    The source job's shards are Parquet, so the relabel reads the source rows from a Parquet shard."""
    stored = decode_embeddings(stored_body(client, source_float32.id, "source32", 0))
    job = client.relabel(source_float32.id, NEW_LABELS, f"s3://{OUTPUT}/relabel32/", templates=[TEMPLATE], top_k=len(NEW_LABELS))
    status = job.wait(timeout_s=WAIT_S, progress=False)
    full = {row["uri"]: {item["label"]: item["score"] for item in row["top_k"]} for row in full_run["rows"]}
    differences = [
        abs(item["score"] - full[row["uri"]][item["label"]]) for row in job.results() if row["error"] is None for item in row["top_k"]
    ]
    assert stored.vectors.dtype == np.float32
    assert status.state == "succeeded"
    assert len(differences) == 4 * len(NEW_LABELS)
    assert max(differences) < 1e-5


def test_relabel_carries_error_rows(relabelled: dict[str, Any], source: dict[str, Any]) -> None:
    source_error = next(row for row in source["rows"] if row["error"] is not None)
    relabelled_error = next(row for row in relabelled["rows"] if row["error"] is not None)
    assert relabelled_error["uri"] == source_error["uri"]
    assert relabelled_error["error"] == source_error["error"]
    assert relabelled_error["top_k"] == []


def test_relabel_ran_no_image_tower(relabelled: dict[str, Any]) -> None:
    before, after = relabelled["before"], relabelled["after"]
    # The "model" stage times the image tower; relabel batches time "read_source" and "score" instead.
    assert after.get("model") == before.get("model")
    assert after.get("fetch") == before.get("fetch")
    assert after.get("read_source", 0.0) - before.get("read_source", 0.0) == 3


def test_relabel_logs_no_fetch(relabelled: dict[str, Any]) -> None:
    job_id = relabelled["job"].id
    finished = [line for line in relabelled["log"].splitlines() if f"Job {job_id} batch" in line and "finished" in line]
    assert len(finished) == 3
    assert not [line for line in finished if "fetch=" in line or "model=" in line]
    assert relabelled["log"].count("image tower not run") >= 3


def test_relabel_without_embeddings_rejected(client: Client, full_run: dict[str, Any]) -> None:
    with pytest.raises(RelabelNotPossible, match="without --store-embeddings"):
        client.relabel(full_run["job"].id, ["x"], f"s3://{OUTPUT}/relabel/")


def test_relabel_other_model_rejected(client: Client, source: dict[str, Any]) -> None:
    with pytest.raises(RelabelNotPossible, match="cannot be compared"):
        client.relabel(source["job"].id, ["x"], f"s3://{OUTPUT}/relabel/", model="openai/clip-vit-large-patch14")


def test_relabel_cli(client: Client, source: dict[str, Any], stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_clip_dir: Path) -> None:
    monkeypatch.setenv("CLIPFLEET_REDIS_URL", stack["redis_url"])
    monkeypatch.setenv("CLIPFLEET_S3_ENDPOINT_URL", stack["s3"].endpoint_url)
    monkeypatch.setenv("CLIPFLEET_MODEL", str(tiny_clip_dir))
    code = main(["relabel", source["job"].id, "--labels", "dog,cat", "--output", f"s3://{OUTPUT}/cli/", "--wait"])
    output = capsys.readouterr().out
    assert code == 0
    assert "succeeded" in output
    assert "4 classified, 1 failed" in output


def test_relabel_cli_rejects_job_without_embeddings(full_run: dict[str, Any], stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CLIPFLEET_REDIS_URL", stack["redis_url"])
    monkeypatch.setenv("CLIPFLEET_S3_ENDPOINT_URL", stack["s3"].endpoint_url)
    code = main(["relabel", full_run["job"].id, "--labels", "dog", "--output", f"s3://{OUTPUT}/cli/"])
    assert code == 1
    assert "--store-embeddings" in capsys.readouterr().err


def test_worker_rejects_embeddings_of_other_model(client: Client, source: dict[str, Any], relabelled: dict[str, Any]) -> None:
    """A file whose metadata names another model fails the relabel job at its first batch."""
    job_id = source["job"].id
    key = f"source/{job_id}/{embeddings_name(0)}"
    original = stored_body(client, job_id, "source", 0)
    stored = decode_embeddings(original)
    forged = StoredEmbeddings(stored.uris, stored.vectors, "someone/other-clip", stored.model_revision, stored.dtype)
    client.storage.client.put_object(Bucket=OUTPUT, Key=key, Body=encode_embeddings(forged))
    try:
        job = client.relabel(job_id, ["dog", "cat"], f"s3://{OUTPUT}/forged/")
        status = job.wait(timeout_s=WAIT_S, progress=False)
    finally:
        client.storage.client.put_object(Bucket=OUTPUT, Key=key, Body=original)
    assert status.state == "failed"
    assert "someone/other-clip" in (status.error or "")


def test_relabel_missing_embeddings_file_rejected(client: Client, source: dict[str, Any], relabelled: dict[str, Any]) -> None:
    """Batch 1's shard lists classified images but its embeddings file is gone: refused before enqueueing."""
    job_id = source["job"].id
    key = f"source/{job_id}/{embeddings_name(1)}"
    original = stored_body(client, job_id, "source", 1)
    client.storage.client.delete_object(Bucket=OUTPUT, Key=key)
    try:
        with pytest.raises(RelabelNotPossible, match=r"no embeddings file 'part-000001\.embeddings\.parquet' for batch 1"):
            client.relabel(job_id, ["dog", "cat"], f"s3://{OUTPUT}/missing/")
    finally:
        client.storage.client.put_object(Bucket=OUTPUT, Key=key, Body=original)
    assert client.store.redis.llen(client.settings.queue) == 0


def test_worker_fails_job_on_invalid_embeddings_file(client: Client, source: dict[str, Any], relabelled: dict[str, Any]) -> None:
    """A file that is not Parquet fails the relabel job at its batch, without retrying until the delivery cap."""
    job_id = source["job"].id
    key = f"source/{job_id}/{embeddings_name(0)}"
    original = stored_body(client, job_id, "source", 0)
    client.storage.client.put_object(Bucket=OUTPUT, Key=key, Body=b"not parquet")
    try:
        job = client.relabel(job_id, ["dog", "cat"], f"s3://{OUTPUT}/invalid/")
        status = job.wait(timeout_s=WAIT_S, progress=False)
    finally:
        client.storage.client.put_object(Bucket=OUTPUT, Key=key, Body=original)
    assert status.state == "failed"
    assert f"{embeddings_name(0)}' is invalid" in (status.error or "")
    assert int(client.store.fields(job.id).get("retries:batch", 0)) == 0


def test_retry_round_updates_embeddings(client: Client, source: dict[str, Any], relabelled: dict[str, Any]) -> None:
    """A retry that classifies the once-corrupt image adds its vector to batch 2's file, in row order."""
    job = source["job"]
    client.storage.client.put_object(Bucket=INPUT, Key="in/e-corrupt.jpg", Body=(DATA / "chelsea.jpg").read_bytes())
    retry = job.retry()
    status = job.wait(timeout_s=WAIT_S, progress=False)
    rows = list(job.results())
    stored = decode_embeddings(stored_body(client, job.id, "source", 2))
    first = decode_embeddings(stored_body(client, job.id, "source", 0))
    assert retry.images == 1
    assert status.failed == 0
    assert stored.uris == [f"s3://{INPUT}/in/e-corrupt.jpg"]
    assert stored.uris == shard_uris(rows, 4, 5)
    assert first.uris == shard_uris(rows, 0, 2)


def test_compaction_keeps_embeddings(client: Client, source: dict[str, Any], relabelled: dict[str, Any]) -> None:
    """Compaction with --delete-shards deletes shards only; a relabel then finds the shards missing."""
    job_id = source["job"].id
    compaction = compact_job(client.store, client.storage, job_id, delete_shards=True)
    names = client.storage.list_names(f"s3://{OUTPUT}/source/{job_id}")
    assert compaction.shards_deleted == 3
    assert sorted(name for name in names if name.endswith(".embeddings.parquet")) == [embeddings_name(batch) for batch in range(3)]
    with pytest.raises(RelabelNotPossible, match=r"no shard .* because `clipfleet compact --delete-shards` removed them"):
        client.relabel(job_id, ["x"], f"s3://{OUTPUT}/relabel/")
