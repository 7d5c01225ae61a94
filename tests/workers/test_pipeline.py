"""`process_batch` in process, without Celery: a real Redis, moto's S3 server and the tiny CLIP checkpoint."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.client import BaseClient

from producer.constants import SHARD_NAME, SUCCESS_MARKER
from producer.errors import StorageError
from producer.messages import BatchMessage
from producer.settings import Settings
from producer.spec import JobSpec, build_spec
from tests.support.servers import S3Server
from workers.pipeline import BatchOutcome, classify_uris, prefetch_in_order, prefetch_window, process_batch
from workers.runtime import WorkerRuntime

DATA = Path(__file__).resolve().parents[1] / "data"
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
TOP_K = 3
CORRUPT_JPEG = b"\xff\xd8\xff\xe0 this is not a JPEG"
JOB_ID = "job-under-test"


@pytest.fixture
def runtime(redis_url: str, s3_server: S3Server, tiny_clip_dir: Path, tmp_path: Path) -> Iterator[WorkerRuntime]:
    settings = Settings(
        redis_url=redis_url,
        local_roots=[str(tmp_path)],
        s3_endpoint_url=s3_server.endpoint_url,
        model=str(tiny_clip_dir),
        fetch_threads=4,
        device="cpu",
        dtype="float32",
    )
    worker_runtime = WorkerRuntime(settings)
    yield worker_runtime
    worker_runtime.pool.shutdown()
    worker_runtime.store.redis.close()


@pytest.fixture
def s3_job(runtime: WorkerRuntime, s3_client: BaseClient, make_bucket: Callable[[], str], tiny_clip_dir: Path) -> dict[str, Any]:
    """A job over an S3 prefix with three photos and one corrupt file, listed as one batch of four."""
    source, output = make_bucket(), make_bucket()
    names = ["rocket.jpg", "corrupt.jpg", "astronaut.jpg", "chelsea.jpg"]
    for name in names:
        body = CORRUPT_JPEG if name == "corrupt.jpg" else (DATA / name).read_bytes()
        s3_client.put_object(Bucket=source, Key=f"in/{name}", Body=body)
    spec = make_spec(f"s3://{source}/in/", f"s3://{output}/results/", tiny_clip_dir)
    runtime.store.create(JOB_ID, spec)
    uris = [f"s3://{source}/in/{name}" for name in names]
    runtime.store.finish_listing(JOB_ID, len(uris), 0, 1)
    return {"spec": spec, "output": output, "uris": uris, "message": BatchMessage(job_id=JOB_ID, batch=0, uris=uris)}


def make_spec(source: str, output: str, model_dir: Path) -> JobSpec:
    return build_spec(source=source, labels=LABELS, output=output, model=str(model_dir), top_k=TOP_K)


def read_s3_rows(s3_client: BaseClient, bucket: str, batch: int = 0) -> list[dict[str, Any]]:
    key = f"results/{JOB_ID}/{SHARD_NAME.format(batch=batch)}"
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def read_s3_summary(s3_client: BaseClient, bucket: str) -> dict[str, Any]:
    body = s3_client.get_object(Bucket=bucket, Key=f"results/{JOB_ID}/{SUCCESS_MARKER}")["Body"].read()
    return json.loads(body)


def output_keys(s3_client: BaseClient, bucket: str) -> list[str]:
    return [item["Key"] for item in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def counters(runtime: WorkerRuntime) -> tuple[str, str, str]:
    fields = runtime.store.fields(JOB_ID)
    return fields["succeeded"], fields["failed"], fields["batches_done"]


def test_batch_written(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    outcome = process_batch(runtime, s3_job["message"])
    assert outcome.status == "written"
    assert outcome.attempt == 1
    assert (outcome.succeeded, outcome.failed) == (3, 1)


def test_shard_rows_in_input_order(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    process_batch(runtime, s3_job["message"])
    rows = read_s3_rows(s3_client, s3_job["output"])
    assert [row["uri"] for row in rows] == s3_job["uris"]


def test_shard_corrupt_row(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    process_batch(runtime, s3_job["message"])
    corrupt = read_s3_rows(s3_client, s3_job["output"])[1]
    assert corrupt["error"]["code"] == "decode_error"
    assert corrupt["label"] is None
    assert corrupt["top_k"] == []


def test_shard_good_rows_scored(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    process_batch(runtime, s3_job["message"])
    rows = read_s3_rows(s3_client, s3_job["output"])
    for row in (rows[0], rows[2], rows[3]):
        assert row["error"] is None, row["uri"]
        assert row["label"] in LABELS, row["uri"]
        assert len(row["top_k"]) == TOP_K, row["uri"]
        assert row["score"] == row["top_k"][0]["score"], row["uri"]


def test_job_succeeds_with_summary(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    process_batch(runtime, s3_job["message"])
    summary = read_s3_summary(s3_client, s3_job["output"])
    assert runtime.store.state(JOB_ID) == "succeeded"
    assert summary["total"] == 4
    assert summary["succeeded"] == 3
    assert summary["failed"] == 1


def test_redelivery_after_completion_status(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    process_batch(runtime, s3_job["message"])
    again = process_batch(runtime, s3_job["message"])
    assert again.status == "skipped_done"


def test_redelivery_after_completion_counters(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    process_batch(runtime, s3_job["message"])
    before = counters(runtime)
    process_batch(runtime, s3_job["message"])
    assert counters(runtime) == before


def test_redelivery_while_running_skipped_done(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    """With a second batch still pending, a repeated first batch is skipped and counted once."""
    runtime.store.finish_listing(JOB_ID, 8, 0, 2)
    process_batch(runtime, s3_job["message"])
    before = counters(runtime)

    again = process_batch(runtime, s3_job["message"])

    assert again.status == "skipped_done"
    assert counters(runtime) == before
    assert runtime.store.state(JOB_ID) == "running"


def run_over_delivery_cap(runtime: WorkerRuntime, message: BatchMessage) -> BatchOutcome:
    runtime.settings = runtime.settings.model_copy(update={"max_delivery_attempts": 2})
    runtime.store.count_delivery(JOB_ID, message.batch)
    runtime.store.count_delivery(JOB_ID, message.batch)
    return process_batch(runtime, message)


def test_delivery_cap_status(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    outcome = run_over_delivery_cap(runtime, s3_job["message"])
    assert outcome.status == "attempts_exceeded"
    assert outcome.attempt == 3


def test_delivery_cap_rows_failed(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    run_over_delivery_cap(runtime, s3_job["message"])
    rows = read_s3_rows(s3_client, s3_job["output"])
    assert [row["uri"] for row in rows] == s3_job["uris"]
    assert {row["error"]["code"] for row in rows} == {"delivery_attempts_exceeded"}


def test_delivery_cap_completes_job(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    run_over_delivery_cap(runtime, s3_job["message"])
    summary = read_s3_summary(s3_client, s3_job["output"])
    assert runtime.store.state(JOB_ID) == "succeeded"
    assert (summary["succeeded"], summary["failed"]) == (0, 4)


def test_cancelled_job_skipped(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    runtime.store.cancel(JOB_ID)
    outcome = process_batch(runtime, s3_job["message"])
    assert outcome.status == "skipped_cancelled"
    assert output_keys(s3_client, s3_job["output"]) == []
    assert counters(runtime) == ("0", "0", "0")


def test_missing_key_beside_good_photo(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    good = s3_job["uris"][0]
    missing = good.rsplit("/", 1)[0] + "/missing.jpg"
    outcome = process_batch(runtime, BatchMessage(job_id=JOB_ID, batch=0, uris=[missing, good]))
    rows = read_s3_rows(s3_client, s3_job["output"])
    assert outcome.status == "written"
    assert rows[0]["error"]["code"] == "not_found"
    assert rows[1]["error"] is None
    assert rows[1]["label"] in LABELS
    assert runtime.store.is_batch_done(JOB_ID, 0)


@pytest.fixture
def local_job(runtime: WorkerRuntime, tmp_path: Path, tiny_clip_dir: Path) -> dict[str, Any]:
    source, output = tmp_path / "photos", tmp_path / "results"
    source.mkdir()
    (source / "coffee.jpg").write_bytes((DATA / "coffee.jpg").read_bytes())
    spec = make_spec(str(source), str(output), tiny_clip_dir)
    runtime.store.create(JOB_ID, spec)
    runtime.store.finish_listing(JOB_ID, 1, 0, 1)
    message = BatchMessage(job_id=JOB_ID, batch=0, uris=[str(source / "coffee.jpg")])
    return {"output": output, "message": message}


def test_local_job_shard_readable(runtime: WorkerRuntime, local_job: dict[str, Any]) -> None:
    process_batch(runtime, local_job["message"])
    shard = local_job["output"] / JOB_ID / SHARD_NAME.format(batch=0)
    rows = [json.loads(line) for line in shard.read_text(encoding="utf-8").splitlines()]
    assert [row["uri"] for row in rows] == local_job["message"].uris
    assert rows[0]["error"] is None


def test_local_job_no_temporary_files(runtime: WorkerRuntime, local_job: dict[str, Any]) -> None:
    process_batch(runtime, local_job["message"])
    names = sorted(path.name for path in (local_job["output"] / JOB_ID).iterdir())
    assert names == [SUCCESS_MARKER, SHARD_NAME.format(batch=0)]


def test_local_job_succeeds(runtime: WorkerRuntime, local_job: dict[str, Any]) -> None:
    process_batch(runtime, local_job["message"])
    assert runtime.store.state(JOB_ID) == "succeeded"


def test_local_job_path_outside_source(runtime: WorkerRuntime, local_job: dict[str, Any], tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes((DATA / "coffee.jpg").read_bytes())
    process_batch(runtime, BatchMessage(job_id=JOB_ID, batch=0, uris=[str(outside)]))
    shard = local_job["output"] / JOB_ID / SHARD_NAME.format(batch=0)
    row = json.loads(shard.read_text(encoding="utf-8"))
    assert row["error"]["code"] == "access_denied"


def test_running_state_at_batch_start(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    runtime.store.mark_batch_started(JOB_ID)
    fields = runtime.store.fields(JOB_ID)
    assert fields["state"] == "running"
    assert float(fields["started_at"]) > 0


@pytest.fixture
def unwritable_job(runtime: WorkerRuntime, s3_client: BaseClient, make_bucket: Callable[[], str], tiny_clip_dir: Path) -> dict[str, Any]:
    """A one-image job whose output bucket does not exist, so every write fails."""
    source = make_bucket()
    s3_client.put_object(Bucket=source, Key="in/rocket.jpg", Body=(DATA / "rocket.jpg").read_bytes())
    spec = make_spec(f"s3://{source}/in/", "s3://clipfleet-no-such-bucket/results/", tiny_clip_dir)
    runtime.store.create(JOB_ID, spec)
    runtime.store.finish_listing(JOB_ID, 1, 0, 1)
    return {"message": BatchMessage(job_id=JOB_ID, batch=0, uris=[f"s3://{source}/in/rocket.jpg"])}


def test_unwritable_output_raises_for_retry(runtime: WorkerRuntime, unwritable_job: dict[str, Any]) -> None:
    with pytest.raises(StorageError):
        process_batch(runtime, unwritable_job["message"])
    assert not runtime.store.is_batch_done(JOB_ID, 0)


def test_unwritable_output_last_delivery_counts(runtime: WorkerRuntime, unwritable_job: dict[str, Any]) -> None:
    outcome = run_over_delivery_cap(runtime, unwritable_job["message"])
    assert outcome.status == "attempts_exceeded"
    assert runtime.store.is_batch_done(JOB_ID, 0)


def test_unwritable_output_job_fails(runtime: WorkerRuntime, unwritable_job: dict[str, Any]) -> None:
    run_over_delivery_cap(runtime, unwritable_job["message"])
    fields = runtime.store.fields(JOB_ID)
    assert fields["state"] == "failed"
    assert "clipfleet-no-such-bucket" in fields["error"]


def test_local_job_rejected_without_roots(runtime: WorkerRuntime, local_job: dict[str, Any]) -> None:
    runtime.settings = runtime.settings.model_copy(update={"local_roots": []})
    outcome = process_batch(runtime, local_job["message"])
    assert outcome.status == "skipped_failed"
    assert runtime.store.state(JOB_ID) == "failed"
    assert "CLIPFLEET_LOCAL_ROOTS" in runtime.store.status(JOB_ID).error
    assert not local_job["output"].exists()


def test_output_bucket_outside_allowed(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    source_bucket = s3_job["uris"][0].split("/")[2]
    runtime.settings = runtime.settings.model_copy(update={"allowed_buckets": [source_bucket]})
    process_batch(runtime, s3_job["message"])
    assert runtime.store.state(JOB_ID) == "failed"
    assert s3_client.list_objects_v2(Bucket=s3_job["output"]).get("KeyCount") == 0


def test_runtime_sets_pillow_pixel_limit(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    worker_runtime = WorkerRuntime(Settings(redis_url=redis_url, max_image_pixels=1234))
    try:
        assert Image.MAX_IMAGE_PIXELS == 1234
    finally:
        worker_runtime.pool.shutdown()
        worker_runtime.store.redis.close()


def test_errors_counted_by_code(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    process_batch(runtime, s3_job["message"])
    summary = read_s3_summary(s3_client, s3_job["output"])
    assert runtime.store.status(JOB_ID).errors == {"decode_error": 1}
    assert summary["errors"] == {"decode_error": 1}


def test_first_delivery_not_redelivery(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    process_batch(runtime, s3_job["message"])
    assert runtime.store.status(JOB_ID).redeliveries == 0


def test_redelivery_counted(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    runtime.store.count_delivery(JOB_ID, 0)  # a delivery that died before counting its batch
    outcome = process_batch(runtime, s3_job["message"])
    summary = read_s3_summary(s3_client, s3_job["output"])
    assert outcome.attempt == 2
    assert runtime.store.status(JOB_ID).redeliveries == 1
    assert summary["redeliveries"] == 1


def test_summary_counts_retries(runtime: WorkerRuntime, s3_job: dict[str, Any], s3_client: BaseClient) -> None:
    runtime.store.count_event(JOB_ID, "retries:s3_get", 2)
    runtime.store.count_event(JOB_ID, "retries:batch")
    process_batch(runtime, s3_job["message"])
    summary = read_s3_summary(s3_client, s3_job["output"])
    assert summary["retries"] == {"batch": 1, "s3_get": 2}
    assert summary["retries_total"] == 3


# --- Retry rounds: a finished job's failed images run again and replace their rows in place ---------


@pytest.fixture
def missing_job(runtime: WorkerRuntime, s3_client: BaseClient, make_bucket: Callable[[], str], tiny_clip_dir: Path) -> dict[str, Any]:
    """A finished one-batch job whose images `late.jpg` and `gone.jpg` were missing, so their rows are not_found."""
    source, output = make_bucket(), make_bucket()
    for name in ("rocket.jpg", "astronaut.jpg"):
        s3_client.put_object(Bucket=source, Key=f"in/{name}", Body=(DATA / name).read_bytes())
    spec = make_spec(f"s3://{source}/in/", f"s3://{output}/results/", tiny_clip_dir)
    runtime.store.create(JOB_ID, spec)
    uris = [f"s3://{source}/in/{name}" for name in ("rocket.jpg", "late.jpg", "astronaut.jpg", "gone.jpg")]
    runtime.store.finish_listing(JOB_ID, len(uris), 0, 1)
    process_batch(runtime, BatchMessage(job_id=JOB_ID, batch=0, uris=uris))
    s3_client.put_object(Bucket=source, Key="in/late.jpg", Body=(DATA / "chelsea.jpg").read_bytes())
    retry = BatchMessage(job_id=JOB_ID, batch=0, uris=[uris[1], uris[3]], retry_round=1)
    return {"spec": spec, "output": output, "uris": uris, "retry": retry}


def start_round(runtime: WorkerRuntime, seen_round: int = 0) -> int:
    return runtime.store.start_retry(JOB_ID, seen_round=seen_round, batches=1, baseline={})


def test_missing_job_rows_not_found(runtime: WorkerRuntime, missing_job: dict[str, Any], s3_client: BaseClient) -> None:
    rows = read_s3_rows(s3_client, missing_job["output"])
    assert [row["error"] and row["error"]["code"] for row in rows] == [None, "not_found", None, "not_found"]
    assert runtime.store.status(JOB_ID).errors == {"not_found": 2}


def test_retry_replaces_rows_in_place(runtime: WorkerRuntime, missing_job: dict[str, Any], s3_client: BaseClient) -> None:
    before = read_s3_rows(s3_client, missing_job["output"])
    start_round(runtime)
    outcome = process_batch(runtime, missing_job["retry"])
    rows = read_s3_rows(s3_client, missing_job["output"])
    assert outcome.status == "written"
    assert (outcome.succeeded, outcome.failed) == (1, 1)
    assert [row["uri"] for row in rows] == missing_job["uris"]
    assert rows[1]["error"] is None
    assert rows[1]["label"] in LABELS
    assert rows[3]["error"]["code"] == "not_found"
    assert (rows[0], rows[2]) == (before[0], before[2])


def test_retry_moves_counters(runtime: WorkerRuntime, missing_job: dict[str, Any]) -> None:
    start_round(runtime)
    process_batch(runtime, missing_job["retry"])
    status = runtime.store.status(JOB_ID)
    assert (status.succeeded, status.failed, status.done) == (3, 1, 4)
    assert status.errors == {"not_found": 1}


def test_retry_finalizes_again(runtime: WorkerRuntime, missing_job: dict[str, Any], s3_client: BaseClient) -> None:
    start_round(runtime)
    process_batch(runtime, missing_job["retry"])
    summary = read_s3_summary(s3_client, missing_job["output"])
    assert runtime.store.state(JOB_ID) == "succeeded"
    assert (summary["succeeded"], summary["failed"]) == (3, 1)
    assert summary["errors"] == {"not_found": 1}
    assert summary["retry_round"] == 1


def test_retry_redelivery_counted_once(runtime: WorkerRuntime, missing_job: dict[str, Any]) -> None:
    runtime.store.start_retry(JOB_ID, seen_round=0, batches=2, baseline={})  # a second batch keeps the round open
    process_batch(runtime, missing_job["retry"])
    before = counters(runtime)
    again = process_batch(runtime, missing_job["retry"])
    assert again.status == "skipped_done"
    assert counters(runtime) == before
    assert runtime.store.fields(JOB_ID)["round_batches_done"] == "1"


def test_retry_after_uncounted_rewrite(runtime: WorkerRuntime, missing_job: dict[str, Any]) -> None:
    """A delivery that rewrote the shard and died before counting is redelivered and counted once, right."""
    from producer.results import read_shard, write_shard

    start_round(runtime)
    storage, spec = runtime.storage, missing_job["spec"]
    rows = read_shard(storage, spec, JOB_ID, 0)
    rows[1] = {"uri": rows[1]["uri"], "label": "cat", "score": 0.5, "top_k": [], "error": None}
    write_shard(storage, spec, JOB_ID, 0, rows)
    runtime.store.count_delivery(JOB_ID, 0, retry_round=1)

    outcome = process_batch(runtime, missing_job["retry"])
    status = runtime.store.status(JOB_ID)
    assert outcome.attempt == 2
    assert (status.succeeded, status.failed) == (3, 1)
    assert status.errors == {"not_found": 1}
    assert status.redeliveries == 1


def test_retry_of_old_round_dropped(runtime: WorkerRuntime, missing_job: dict[str, Any], s3_client: BaseClient) -> None:
    start_round(runtime)
    runtime.store.cancel(JOB_ID)
    start_round(runtime, seen_round=1)
    before = read_s3_rows(s3_client, missing_job["output"])
    outcome = process_batch(runtime, missing_job["retry"])
    assert outcome.status == "skipped_stale"
    assert read_s3_rows(s3_client, missing_job["output"]) == before


def test_retry_cancelled_round_skipped(runtime: WorkerRuntime, missing_job: dict[str, Any], s3_client: BaseClient) -> None:
    start_round(runtime)
    runtime.store.cancel(JOB_ID)
    before = read_s3_rows(s3_client, missing_job["output"])
    outcome = process_batch(runtime, missing_job["retry"])
    assert outcome.status == "skipped_cancelled"
    assert read_s3_rows(s3_client, missing_job["output"]) == before
    assert runtime.store.state(JOB_ID) == "cancelled"


def test_retry_at_delivery_cap(runtime: WorkerRuntime, missing_job: dict[str, Any], s3_client: BaseClient) -> None:
    start_round(runtime)
    runtime.settings = runtime.settings.model_copy(update={"max_delivery_attempts": 1})
    runtime.store.count_delivery(JOB_ID, 0, retry_round=1)
    outcome = process_batch(runtime, missing_job["retry"])
    rows = read_s3_rows(s3_client, missing_job["output"])
    assert outcome.status == "attempts_exceeded"
    assert [row["error"] and row["error"]["code"] for row in rows] == [None, "delivery_attempts_exceeded", None, "delivery_attempts_exceeded"]
    assert runtime.store.status(JOB_ID).errors == {"delivery_attempts_exceeded": 2}
    assert runtime.store.state(JOB_ID) == "succeeded"


def test_unknown_job_dropped(runtime: WorkerRuntime) -> None:
    outcome = process_batch(runtime, BatchMessage(job_id="no-such-job", batch=0, uris=["s3://photos/a.jpg"]))
    assert outcome.status == "skipped_unknown"


@pytest.mark.parametrize("stored_spec", ["{not json", '{"source": "s3://photos/in/"}'])
def test_invalid_stored_spec_fails_job(runtime: WorkerRuntime, s3_job: dict[str, Any], stored_spec: str) -> None:
    runtime.store.set_fields(JOB_ID, spec=stored_spec)
    outcome = process_batch(runtime, s3_job["message"])
    assert outcome.status == "skipped_failed"
    assert runtime.store.state(JOB_ID) == "failed"
    assert "spec in Redis is invalid" in runtime.store.status(JOB_ID).error


def test_job_over_label_limit_fails(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    runtime.settings = runtime.settings.model_copy(update={"max_labels": 2})
    process_batch(runtime, s3_job["message"])
    assert runtime.store.state(JOB_ID) == "failed"
    assert "CLIPFLEET_MAX_LABELS" in runtime.store.status(JOB_ID).error


def test_prefetch_in_order_keeps_window() -> None:
    window, started, consumed = 3, [0], 0
    lock = threading.Lock()

    def record_start(item: int) -> int:
        with lock:
            started[0] += 1
        return item * 10

    in_flight: list[int] = []
    results = []
    with ThreadPoolExecutor(4) as pool:
        for future in prefetch_in_order(pool, record_start, range(20), window):
            time.sleep(0.01)  # let the pool start everything it was given
            with lock:
                in_flight.append(started[0] - consumed)
            results.append(future.result())
            consumed += 1
    assert results == [item * 10 for item in range(20)]
    assert max(in_flight) == window


def test_prefetch_in_order_fewer_items_than_window() -> None:
    with ThreadPoolExecutor(2) as pool:
        results = [future.result() for future in prefetch_in_order(pool, str, [1, 2], 8)]
    assert results == ["1", "2"]


def test_prefetch_window_covers_two_model_batches() -> None:
    assert prefetch_window(Settings(model_batch_size=32, fetch_threads=16)) == 64
    assert prefetch_window(Settings(model_batch_size=2, fetch_threads=16)) == 16


def test_batch_outcome_has_stage_durations(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    outcome = process_batch(runtime, s3_job["message"])
    assert set(outcome.durations_s) == {"fetch", "decode", "preprocess", "wait_images", "model", "write"}
    assert outcome.durations_s["fetch"] > 0
    assert outcome.durations_s["model"] > 0


def scored_rows(runtime: WorkerRuntime, s3_job: dict[str, Any], **settings: Any) -> list[dict[str, Any]]:
    """Classify the job's URIs with `settings` changed, without writing or counting anything."""
    runtime.settings = runtime.settings.model_copy(update=settings)
    loaded = runtime.model(s3_job["spec"].model, None)
    rows, _ = classify_uris(runtime, s3_job["spec"], loaded, s3_job["uris"])
    return rows


def max_score_difference(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> float:
    differences = [0.0]
    for row, expected in zip(rows, reference, strict=True):
        assert row["uri"] == expected["uri"]
        assert [item["label"] for item in row["top_k"]] == [item["label"] for item in expected["top_k"]], row["uri"]
        differences += [abs(a["score"] - b["score"]) for a, b in zip(row["top_k"], expected["top_k"])]
    return max(differences)


def test_model_batch_size_leaves_scores_unchanged(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    one_at_a_time = scored_rows(runtime, s3_job, model_batch_size=1, jpeg_draft=False)
    all_together = scored_rows(runtime, s3_job, model_batch_size=32, jpeg_draft=False)
    assert max_score_difference(one_at_a_time, all_together) < 1e-6


def test_uint8_path_equals_image_processor(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    fast = scored_rows(runtime, s3_job, jpeg_draft=False)
    loaded = runtime.model(s3_job["spec"].model, None)
    preprocessor, loaded.preprocessor = loaded.preprocessor, None
    try:
        reference = scored_rows(runtime, s3_job, jpeg_draft=False)
    finally:
        loaded.preprocessor = preprocessor
    assert max_score_difference(fast, reference) < 1e-5


def test_jpeg_draft_scores_close_to_full_decode(runtime: WorkerRuntime, s3_job: dict[str, Any]) -> None:
    # astronaut.jpg (512 x 512) decodes at half size with draft; the other photos are too small for it.
    drafted = scored_rows(runtime, s3_job, jpeg_draft=True)
    full = scored_rows(runtime, s3_job, jpeg_draft=False)
    difference = max_score_difference(drafted, full)
    assert difference > 0  # the draft path ran
    assert difference < 2e-3  # 8.4e-4 measured with the test checkpoint
