"""Tests for job state, enqueueing and submission against a real Redis server (and moto's S3 server).

Covers producer.state.JobStore, producer.queue (Celery settings and BatchSender) and Client.submit.
No worker runs here: submitted batches stay in the Redis list that Celery's Redis transport uses
as the queue, where the tests read them back.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from botocore.client import BaseClient
from celery import Celery

from producer.client import Client
from producer.constants import JOB_KEY, JOB_PRODUCER_KEY, JOB_PROGRESS_KEY, JOBS_INDEX_KEY, TASK_CLASSIFY_BATCH
from producer.errors import InvalidJobSpec, JobNotFound, StorageError
from producer.messages import BatchMessage
from producer.queue import BatchSender, celery_config, make_celery
from producer.settings import Settings
from producer.spec import build_spec
from producer.state import (
    PROGRESS_KEEP_S,
    PROGRESS_MAX_SAMPLES,
    JobStatus,
    JobStore,
    RetryNotStarted,
    batch_counts_json,
)
from tests.conftest import TEST_QUEUE as QUEUE

JOB_ID = "20260101-000000-0123abcd"
WAIT_LIMIT_S = 10.0


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    job_store = JobStore.from_url(redis_url)
    yield job_store
    job_store.redis.close()


@pytest.fixture
def job(store: JobStore) -> str:
    store.create(JOB_ID, build_spec(source="s3://photos/in/", labels=["cat", "dog"], output="s3://results/"))
    return JOB_ID


# --- JobStore -------------------------------------------------------------------------------------


def test_new_job_is_queued(store: JobStore, job: str) -> None:
    assert store.status(job).state == "queued"


def test_new_job_listed_in_index(store: JobStore, redis_client: redis.Redis, job: str) -> None:
    assert redis_client.zrange(JOBS_INDEX_KEY, 0, -1) == [job.encode()]


def test_spec_round_trips(store: JobStore, job: str) -> None:
    assert store.spec(job).labels == ["cat", "dog"]


def test_first_record_counts(store: JobStore, job: str) -> None:
    assert store.record_batch(job, 0, succeeded=60, failed=4) == (True, False)


def test_repeated_record_not_counted(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=60, failed=4)

    assert store.record_batch(job, 0, succeeded=60, failed=4) == (False, False)


def test_repeated_record_keeps_counters(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=60, failed=4)
    store.record_batch(job, 0, succeeded=60, failed=4)

    status = store.status(job)

    assert status.done == 64
    assert status.failed == 4
    assert status.succeeded == 60


def test_repeated_record_keeps_batch_count(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=60, failed=4)
    store.record_batch(job, 0, succeeded=60, failed=4)

    assert store.fields(job)["batches_done"] == "1"


def test_record_marks_job_running(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=1, failed=0)

    assert store.status(job).state == "running"


def test_record_sets_started_at(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=1, failed=0)

    assert store.status(job).started_at is not None


def test_is_batch_done(store: JobStore, job: str) -> None:
    store.record_batch(job, 2, succeeded=1, failed=0)

    assert store.is_batch_done(job, 2) is True
    assert store.is_batch_done(job, 1) is False


# Each step is ("batch", number), which records that batch, or ("listing", batches), which finishes
# listing with that many batches. The second value is the step expected to complete the job.
COMPLETION_ORDERS = [
    pytest.param([("batch", 0), ("batch", 1), ("listing", 2)], "listing", id="batches-before-listing"),
    pytest.param([("batch", 0), ("listing", 2), ("batch", 1)], ("batch", 1), id="last-batch-after-listing"),
    pytest.param([("listing", 2), ("batch", 1), ("batch", 0)], ("batch", 0), id="all-batches-after-listing"),
    pytest.param([("listing", 0)], "listing", id="no-batches"),
]


def run_steps(store: JobStore, job: str, steps: list[tuple[str, int]]) -> list[tuple[object, bool]]:
    """Run the steps and return each step with whether it reported that the job completed."""
    results: list[tuple[object, bool]] = []
    for kind, number in steps:
        if kind == "batch":
            _, completed = store.record_batch(job, number, succeeded=5, failed=0)
            results.append((("batch", number), completed))
        else:
            completed = store.finish_listing(job, images=5 * number, skipped=0, batches=number)
            results.append(("listing", completed))
    return results


@pytest.mark.parametrize(("steps", "completing_step"), COMPLETION_ORDERS)
def test_job_completes_exactly_once(store: JobStore, job: str, steps: list[tuple[str, int]], completing_step: object) -> None:
    results = run_steps(store, job, steps)

    assert [step for step, completed in results if completed] == [completing_step]


def test_repeat_after_completion_reports_nothing(store: JobStore, job: str) -> None:
    run_steps(store, job, [("batch", 0), ("listing", 1)])

    assert store.record_batch(job, 0, succeeded=5, failed=0) == (False, False)


def test_concurrent_records_complete_once(store: JobStore, job: str) -> None:
    batches = 40

    def record(batch: int) -> bool:
        return store.record_batch(job, batch, succeeded=1, failed=0)[1]

    with ThreadPoolExecutor(max_workers=8) as pool:
        early = list(pool.map(record, range(batches // 2)))
        listing = store.finish_listing(job, images=batches, skipped=0, batches=batches)
        late = list(pool.map(record, list(range(batches // 2, batches)) + list(range(batches))))

    assert early.count(True) + late.count(True) + int(listing) == 1


def test_total_unknown_until_listing_done(store: JobStore, job: str) -> None:
    store.add_listed(job, 64)
    store.record_batch(job, 0, succeeded=64, failed=0)

    assert store.status(job).total is None


def test_total_set_by_finish_listing(store: JobStore, job: str) -> None:
    store.finish_listing(job, images=150, skipped=7, batches=3)

    status = store.status(job)

    assert status.total == 150
    assert status.skipped == 7


def test_add_listed_accumulates(store: JobStore, job: str) -> None:
    store.add_listed(job, 64)
    store.add_listed(job, 22)

    assert store.listed(job) == 86


def test_eta_while_running(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=50, failed=0)
    store.finish_listing(job, images=150, skipped=0, batches=3)

    status = store.status(job)

    assert status.images_per_s is not None
    assert status.eta_s == pytest.approx(100 / status.images_per_s)


def test_claim_finalization_once(store: JobStore, job: str) -> None:
    claims = [store.claim_finalization(job) for _ in range(3)]

    assert claims == [True, False, False]


def test_claim_finalization_per_job(store: JobStore, job: str) -> None:
    store.claim_finalization(job)

    assert store.claim_finalization("20260101-000000-ffffffff") is True


def test_cancel_running_job(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=1, failed=0)

    assert store.cancel(job) is True
    assert store.status(job).state == "cancelled"


def test_cancel_sets_finished_at(store: JobStore, job: str) -> None:
    store.cancel(job)

    assert store.status(job).finished_at is not None


def test_cancel_twice_reports_false(store: JobStore, job: str) -> None:
    store.cancel(job)

    assert store.cancel(job) is False


def test_cancel_finished_job_returns_false(store: JobStore, job: str) -> None:
    store.mark_succeeded(job, finished_at=time.time())

    assert store.cancel(job) is False
    assert store.status(job).state == "succeeded"


def test_cancel_unknown_job_raises(store: JobStore) -> None:
    with pytest.raises(JobNotFound, match="no-such-job"):
        store.cancel("no-such-job")


def test_status_unknown_job_raises(store: JobStore) -> None:
    with pytest.raises(JobNotFound, match="'no-such-job' not found"):
        store.status("no-such-job")


def test_count_delivery_increments(store: JobStore, job: str) -> None:
    counts = [store.count_delivery(job, 3) for _ in range(3)]

    assert counts == [1, 2, 3]


def test_count_delivery_per_batch(store: JobStore, job: str) -> None:
    store.count_delivery(job, 3)

    assert store.count_delivery(job, 4) == 1


# --- Counters by error code, retries and redeliveries ----------------------------------------------


def test_record_counts_error_codes(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=5, failed=3, errors={"not_found": 2, "decode_error": 1})
    store.record_batch(job, 1, succeeded=5, failed=1, errors={"not_found": 1})

    assert store.status(job).errors == {"decode_error": 1, "not_found": 3}


def test_repeated_record_keeps_error_codes(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=5, failed=2, errors={"not_found": 2})
    store.record_batch(job, 0, succeeded=5, failed=2, errors={"not_found": 2})

    assert store.status(job).errors == {"not_found": 2}


def test_status_groups_retry_counters(store: JobStore, job: str) -> None:
    store.count_event(job, "retries:s3_get", 3)
    store.count_event(job, "retries:s3_put")
    store.count_event(job, "giveups:s3_get")

    status = store.status(job)

    assert status.retries == {"s3_get": 3, "s3_put": 1}
    assert status.retries_total == 4


def test_status_redeliveries(store: JobStore, job: str) -> None:
    store.count_event(job, "redeliveries", 2)

    assert store.status(job).redeliveries == 2


def test_new_job_status_has_no_events(store: JobStore, job: str) -> None:
    status = store.status(job)

    assert (status.errors, status.retries, status.retries_total) == ({}, {}, 0)
    assert (status.redeliveries, status.retry_round) == (0, 0)


def test_job_status_new_fields_optional() -> None:
    status = JobStatus(
        job_id=JOB_ID, state="queued", total=None, done=0, failed=0, skipped=0, images_per_s=None,
        eta_s=None, created_at=0.0, started_at=None, finished_at=None,
    )

    assert (status.errors, status.retries, status.redeliveries, status.retry_round) == ({}, {}, 0, 0)


# --- Retry rounds ---------------------------------------------------------------------------------


def finished_job(store: JobStore, job: str) -> None:
    """Finish `job` with two batches: batch 0 has 3 ok and 1 not_found row, batch 1 has 2 ok and 2 failed."""
    store.finish_listing(job, images=8, skipped=0, batches=2)
    store.record_batch(job, 0, succeeded=3, failed=1, errors={"not_found": 1})
    store.record_batch(job, 1, succeeded=2, failed=2, errors={"not_found": 1, "fetch_timeout": 1})
    store.mark_succeeded(job, finished_at=time.time())


def test_start_retry_moves_job_to_running(store: JobStore, job: str) -> None:
    finished_job(store, job)

    assert store.start_retry(job, seen_round=0, batches=2, baseline={}) == 1
    assert store.status(job).state == "running"
    assert store.status(job).retry_round == 1
    assert store.status(job).finished_at is None


def test_retry_keeps_first_run_rate(store: JobStore, job: str) -> None:
    finished_job(store, job)
    rate = store.status(job).images_per_s
    store.start_retry(job, seen_round=0, batches=2, baseline={})
    running = store.status(job)
    store.mark_succeeded(job, finished_at=time.time() + 3600)

    assert running.eta_s is None
    assert store.status(job).images_per_s == rate


def test_start_retry_rejects_running_job(store: JobStore, job: str) -> None:
    store.finish_listing(job, images=8, skipped=0, batches=2)
    store.record_batch(job, 0, succeeded=4, failed=0)

    with pytest.raises(RetryNotStarted, match="is running"):
        store.start_retry(job, seen_round=0, batches=1, baseline={})


def test_start_retry_rejects_failed_job(store: JobStore, job: str) -> None:
    store.fail(job, "the model could not be loaded")

    with pytest.raises(RetryNotStarted, match="is failed"):
        store.start_retry(job, seen_round=0, batches=1, baseline={})


def test_start_retry_rejects_stale_round(store: JobStore, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=1, baseline={})
    store.cancel(job)

    with pytest.raises(RetryNotStarted, match="another retry started"):
        store.start_retry(job, seen_round=0, batches=1, baseline={})


def test_start_retry_rejects_early_cancel(store: JobStore, job: str) -> None:
    store.finish_listing(job, images=8, skipped=0, batches=2)
    store.record_batch(job, 0, succeeded=4, failed=0)
    store.cancel(job)

    with pytest.raises(RetryNotStarted, match="before every batch finished"):
        store.start_retry(job, seen_round=0, batches=1, baseline={})


def test_start_retry_after_cancelled_round(store: JobStore, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=2, baseline={})
    store.cancel(job)

    assert store.start_retry(job, seen_round=1, batches=2, baseline={}) == 2


def test_retry_batch_moves_counts(store: JobStore, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=2, baseline={})

    store.record_retry_batch(job, 1, 1, (3, 1, {"fetch_timeout": 1}))
    status = store.status(job)

    assert (status.succeeded, status.failed) == (6, 2)
    assert status.errors == {"fetch_timeout": 1, "not_found": 1}


def test_repeated_retry_batch_counted_once(store: JobStore, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=2, baseline={})

    first = store.record_retry_batch(job, 1, 1, (4, 0, {}))
    second = store.record_retry_batch(job, 1, 1, (4, 0, {}))

    assert first == (True, False)
    assert second == (False, False)
    assert (store.status(job).succeeded, store.status(job).failed) == (7, 1)
    assert store.fields(job)["round_batches_done"] == "1"


def test_last_retry_batch_completes_round(store: JobStore, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=2, baseline={})
    store.record_retry_batch(job, 0, 1, (4, 0, {}))

    assert store.record_retry_batch(job, 1, 1, (4, 0, {})) == (True, True)
    assert store.status(job).errors == {}


def test_retry_batch_of_old_round_never_completes(store: JobStore, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=1, baseline={})
    store.cancel(job)
    store.start_retry(job, seen_round=1, batches=1, baseline={})

    assert store.record_retry_batch(job, 0, 1, (4, 0, {})) == (True, False)


def test_retry_batch_without_counts_keeps_counters(store: JobStore, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=1, baseline={})

    assert store.record_retry_batch(job, 0, 1, None) == (True, True)
    assert (store.status(job).succeeded, store.status(job).failed) == (5, 3)


def test_baseline_fills_missing_batch_counts(store: JobStore, redis_client: redis.Redis, job: str) -> None:
    """A batch counted before per-batch counts existed gets its baseline from the retry's caller."""
    finished_job(store, job)
    redis_client.delete(f"clipfleet:job:{job}:batch_counts")
    store.start_retry(job, seen_round=0, batches=1, baseline={1: batch_counts_json(2, 2, {"not_found": 2})})

    store.record_retry_batch(job, 1, 1, (4, 0, {}))

    assert (store.status(job).succeeded, store.status(job).failed) == (7, 1)


def test_baseline_keeps_recorded_batch_counts(store: JobStore, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=1, baseline={1: batch_counts_json(0, 4, {"not_found": 4})})

    store.record_retry_batch(job, 1, 1, (4, 0, {}))

    assert (store.status(job).succeeded, store.status(job).failed) == (7, 1)


def test_retry_deliveries_counted_per_round(store: JobStore, job: str) -> None:
    store.count_delivery(job, 3)

    assert store.count_delivery(job, 3, retry_round=1) == 1
    assert store.count_delivery(job, 3, retry_round=1) == 2


def test_retry_batch_done_per_round(store: JobStore, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=2, baseline={})
    store.record_retry_batch(job, 0, 1, (4, 0, {}))

    assert store.is_batch_done(job, 0, retry_round=1) is True
    assert store.is_batch_done(job, 1, retry_round=1) is False


def test_claim_finalization_per_round(store: JobStore, job: str) -> None:
    store.claim_finalization(job)

    assert store.claim_finalization(job, retry_round=1) is True
    assert store.claim_finalization(job, retry_round=1) is False


# --- Celery settings and BatchSender --------------------------------------------------------------


def test_celery_config_delivery_settings() -> None:
    config = celery_config(Settings(redis_url="redis://127.0.0.1:1/0", visibility_timeout_s=321))

    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1


def test_celery_config_json_only() -> None:
    config = celery_config(Settings(redis_url="redis://127.0.0.1:1/0"))

    assert config["task_serializer"] == "json"
    assert config["accept_content"] == ["json"]


def test_celery_config_visibility_timeout_from_settings() -> None:
    config = celery_config(Settings(redis_url="redis://127.0.0.1:1/0", visibility_timeout_s=321))

    assert config["broker_transport_options"]["visibility_timeout"] == 321


def test_celery_config_queue_and_broker() -> None:
    config = celery_config(Settings(redis_url="redis://127.0.0.1:1/0", queue="gpu-a"))

    assert config["task_default_queue"] == "gpu-a"
    assert config["broker_url"] == "redis://127.0.0.1:1/0"


@pytest.fixture
def celery_app(redis_url: str) -> Iterator[Celery]:
    app = make_celery(Settings(redis_url=redis_url, queue=QUEUE), name="clipfleet-test-producer")
    yield app
    app.close()


def decode_task(raw: bytes) -> dict[str, Any]:
    """Decode one message in kombu's Redis list format into its task name, content type and arguments."""
    envelope = json.loads(raw)
    args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    return {"task": envelope["headers"]["task"], "args": args, "kwargs": kwargs, "content_type": envelope["content-type"]}


def queued_tasks(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [decode_task(raw) for raw in client.lrange(queue, 0, -1)]


def test_send_adds_one_message(celery_app: Celery, redis_client: redis.Redis) -> None:
    sender = BatchSender(celery_app, QUEUE, high_water=100, poll_s=0.05)

    sender.send(BatchMessage(job_id=JOB_ID, batch=3, uris=["s3://photos/a.jpg", "s3://photos/b c.jpg"]))

    assert redis_client.llen(QUEUE) == 1


def test_sent_message_names_task(celery_app: Celery, redis_client: redis.Redis) -> None:
    BatchSender(celery_app, QUEUE, high_water=100).send(BatchMessage(job_id=JOB_ID, batch=3, uris=["s3://photos/a.jpg"]))

    (task,) = queued_tasks(redis_client, QUEUE)

    assert task["task"] == TASK_CLASSIFY_BATCH
    assert task["content_type"] == "application/json"


def test_sent_message_carries_batch(celery_app: Celery, redis_client: redis.Redis) -> None:
    uris = ["s3://photos/a.jpg", "s3://photos/b c+\u732b.jpg"]
    BatchSender(celery_app, QUEUE, high_water=100).send(BatchMessage(job_id=JOB_ID, batch=3, uris=uris))

    (task,) = queued_tasks(redis_client, QUEUE)

    assert task["args"] == [{"version": 1, "job_id": JOB_ID, "batch": 3, "uris": uris}]


def test_queue_length_counts_messages(celery_app: Celery) -> None:
    sender = BatchSender(celery_app, QUEUE, high_water=100)
    for batch in range(3):
        sender.send(BatchMessage(job_id=JOB_ID, batch=batch, uris=["s3://photos/a.jpg"]))

    assert sender.queue_length() == 3


def test_send_blocks_at_high_water(celery_app: Celery, redis_client: redis.Redis) -> None:
    sender = BatchSender(celery_app, QUEUE, high_water=1, poll_s=0.05)
    sender.send(BatchMessage(job_id=JOB_ID, batch=0, uris=["s3://photos/a.jpg"]))
    finished_at: list[float] = []
    errors: list[BaseException] = []

    def send_second() -> None:
        try:
            sender.send(BatchMessage(job_id=JOB_ID, batch=1, uris=["s3://photos/b.jpg"]))
            finished_at.append(time.monotonic())
        except BaseException as error:  # reported by the asserts below
            errors.append(error)

    sending = threading.Thread(target=send_second, daemon=True)
    sending.start()
    time.sleep(0.5)
    blocked = sending.is_alive()
    drained_at = time.monotonic()
    redis_client.delete(QUEUE)  # what a worker taking the first message would do
    sending.join(WAIT_LIMIT_S)

    assert blocked
    assert not sending.is_alive()
    assert errors == []
    assert finished_at[0] >= drained_at
    assert [task["args"][0]["batch"] for task in queued_tasks(redis_client, QUEUE)] == [1]


# --- Client.submit --------------------------------------------------------------------------------


def upload_images(s3_client: BaseClient, bucket: str, prefix: str, count: int) -> list[str]:
    keys = [f"{prefix}img-{index:04d}.jpg" for index in range(count)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: s3_client.put_object(Bucket=bucket, Key=key, Body=b"x"), keys))
    return keys


def job_keys(client: redis.Redis) -> list[bytes]:
    return client.keys(JOB_KEY.format(job_id="*"))


def test_invalid_spec_enqueues_nothing(
    make_client: Callable[..., Client], redis_client: redis.Redis, s3_client: BaseClient, make_bucket: Callable[[], str]
) -> None:
    bucket = make_bucket()
    upload_images(s3_client, bucket, "in/", 3)

    with pytest.raises(InvalidJobSpec, match="labels"):
        make_client().submit(source=f"s3://{bucket}/in/", labels=[], output=f"s3://{bucket}/out/")

    assert redis_client.llen(QUEUE) == 0
    assert job_keys(redis_client) == []


def test_bucket_outside_allowed_rejected(
    make_client: Callable[..., Client], redis_client: redis.Redis, s3_client: BaseClient, make_bucket: Callable[[], str]
) -> None:
    bucket = make_bucket()
    upload_images(s3_client, bucket, "in/", 3)
    client = make_client(allowed_buckets="results-only,other-photos")

    with pytest.raises(InvalidJobSpec, match=f"'{bucket}'"):
        client.submit(source=f"s3://{bucket}/in/", labels=["cat"], output="s3://results-only/out/")

    assert redis_client.llen(QUEUE) == 0
    assert job_keys(redis_client) == []


def test_submit_enqueues_batches(
    make_client: Callable[..., Client], redis_client: redis.Redis, s3_client: BaseClient, make_bucket: Callable[[], str]
) -> None:
    bucket = make_bucket()
    keys = upload_images(s3_client, bucket, "in/", 150)

    job = make_client().submit(source=f"s3://{bucket}/in/", labels=["cat", "dog"], output=f"s3://{bucket}/out/", batch_size=64)

    sent = [task["args"][0] for task in queued_tasks(redis_client, QUEUE)]
    messages = sorted(sent, key=lambda message: message["batch"])
    assert [message["batch"] for message in messages] == [0, 1, 2]
    assert [len(message["uris"]) for message in messages] == [64, 64, 22]
    assert [uri for message in messages for uri in message["uris"]] == [f"s3://{bucket}/{key}" for key in keys]
    assert {message["job_id"] for message in messages} == {job.id}


def test_submit_records_total(
    make_client: Callable[..., Client], s3_client: BaseClient, make_bucket: Callable[[], str]
) -> None:
    bucket = make_bucket()
    upload_images(s3_client, bucket, "in/", 150)
    s3_client.put_object(Bucket=bucket, Key="in/readme.txt", Body=b"not an image")

    job = make_client().submit(source=f"s3://{bucket}/in/", labels=["cat"], output=f"s3://{bucket}/out/", batch_size=64)

    status = job.status()
    assert status.total == 150
    assert status.skipped == 1
    assert status.state == "queued"


def test_empty_prefix_finishes_at_once(
    make_client: Callable[..., Client], redis_client: redis.Redis, s3_client: BaseClient, make_bucket: Callable[[], str]
) -> None:
    bucket = make_bucket()

    job = make_client().submit(source=f"s3://{bucket}/empty/", labels=["cat"], output=f"s3://{bucket}/out/")

    status = job.status()
    assert status.state == "succeeded"
    assert status.total == 0
    assert redis_client.llen(QUEUE) == 0


def test_empty_prefix_writes_success_marker(
    make_client: Callable[..., Client], s3_client: BaseClient, make_bucket: Callable[[], str]
) -> None:
    bucket = make_bucket()

    job = make_client().submit(source=f"s3://{bucket}/empty/", labels=["cat"], output=f"s3://{bucket}/out/")

    marker = s3_client.get_object(Bucket=bucket, Key=f"out/{job.id}/_SUCCESS.json")["Body"].read()
    summary = json.loads(marker)
    assert summary["job_id"] == job.id
    assert summary["total"] == 0
    assert summary["succeeded"] == 0
    assert summary["failed"] == 0


def test_job_lookup_unknown_raises(make_client: Callable[..., Client]) -> None:
    with pytest.raises(JobNotFound, match="'no-such-job'"):
        make_client().job("no-such-job")


def test_unwritable_output_enqueues_nothing(
    make_client: Callable[..., Client], redis_client: redis.Redis, s3_client: BaseClient, make_bucket: Callable[[], str]
) -> None:
    bucket = make_bucket()
    upload_images(s3_client, bucket, "in/", 3)

    with pytest.raises(StorageError, match="clipfleet-missing-output"):
        make_client().submit(source=f"s3://{bucket}/in/", labels=["cat"], output="s3://clipfleet-missing-output/out/")

    assert redis_client.llen(QUEUE) == 0
    assert job_keys(redis_client) == []


def test_output_under_file_rejected(make_client: Callable[..., Client], tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"x")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="not writable"):
        make_client().submit(source=str(photos), labels=["cat"], output=str(blocker))


def test_write_probe_removed(make_client: Callable[..., Client], s3_client: BaseClient, make_bucket: Callable[[], str]) -> None:
    source, output = make_bucket(), make_bucket()
    upload_images(s3_client, source, "in/", 1)
    make_client().submit(source=f"s3://{source}/in/", labels=["cat"], output=f"s3://{output}/out/")
    keys = [item["Key"] for item in s3_client.list_objects_v2(Bucket=output).get("Contents", [])]
    assert not any(".clipfleet-write-check" in key for key in keys)


def test_zero_batch_size_not_replaced(make_client: Callable[..., Client], make_bucket: Callable[[], str]) -> None:
    bucket = make_bucket()
    with pytest.raises(InvalidJobSpec, match="batch_size"):
        make_client().submit(source=f"s3://{bucket}/in/", labels=["cat"], output=f"s3://{bucket}/out/", batch_size=0)


def test_count_event_skips_missing_job(redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    store.count_event("lost-job", "retries:s3_get")
    assert store.redis.exists("clipfleet:job:lost-job") == 0


def test_record_batch_skips_missing_job(redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    assert store.record_batch("lost-job", 0, 1, 0) == (False, False)
    assert store.redis.exists("clipfleet:job:lost-job") == 0


def test_cancel_rejected_once_batches_counted(store: JobStore) -> None:
    store.create("job-done", build_spec(source="s3://photos/in/", labels=["cat"], output="s3://results/"))
    store.finish_listing("job-done", 2, 0, 1)
    store.record_batch("job-done", 0, 2, 0)
    assert store.cancel("job-done") is False
    assert store.state("job-done") == "running"


def test_cancel_before_last_batch(store: JobStore) -> None:
    store.create("job-open", build_spec(source="s3://photos/in/", labels=["cat"], output="s3://results/"))
    store.finish_listing("job-open", 4, 0, 2)
    store.record_batch("job-open", 0, 2, 0)
    assert store.cancel("job-open") is True
    assert store.state("job-open") == "cancelled"


def test_cancel_unknown_job(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.cancel("no-such-job")


def test_status_shows_giveups(store: JobStore, job: str) -> None:
    store.count_event(job, "giveups:s3_get", 3)
    store.count_event(job, "retries:s3_get", 9)
    status = store.status(job)
    assert status.giveups == {"s3_get": 3}
    assert status.retries == {"s3_get": 9}


# --- Rate over the last minute, ETA and listing state ---------------------------------------------

NOW = 1_800_000_000.0


def progress_samples(redis_client: redis.Redis, job: str) -> list[str]:
    return [member.decode() for member in redis_client.zrange(JOB_PROGRESS_KEY.format(job_id=job), 0, -1)]


def test_record_adds_progress_sample(store: JobStore, redis_client: redis.Redis, job: str) -> None:
    store.record_batch(job, 0, succeeded=60, failed=4, now=NOW)

    assert progress_samples(redis_client, job) == [f"{NOW!r}:64"]


def test_repeated_record_adds_no_sample(store: JobStore, redis_client: redis.Redis, job: str) -> None:
    store.record_batch(job, 0, succeeded=60, failed=4, now=NOW)
    store.record_batch(job, 0, succeeded=60, failed=4, now=NOW + 1)

    assert len(progress_samples(redis_client, job)) == 1


def test_rate_last_minute_from_samples(store: JobStore, job: str) -> None:
    for batch, seconds_ago in enumerate((50, 30, 10)):
        store.record_batch(job, batch, succeeded=100, failed=0, now=NOW - seconds_ago)

    assert store.status(job, now=NOW).images_per_s_last_minute == pytest.approx(200 / 40)


def test_rate_ignores_samples_before_last_minute(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=100, failed=0, now=NOW - 120)
    store.record_batch(job, 1, succeeded=100, failed=0, now=NOW - 20)
    store.record_batch(job, 2, succeeded=60, failed=0, now=NOW - 10)

    assert store.status(job, now=NOW).images_per_s_last_minute == pytest.approx(60 / 10)


def test_rate_counts_failed_images(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=10, failed=0, now=NOW - 20)
    store.record_batch(job, 1, succeeded=5, failed=5, now=NOW - 10)

    assert store.status(job, now=NOW).images_per_s_last_minute == pytest.approx(1.0)


def test_rate_needs_two_samples(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=100, failed=0, now=NOW - 10)

    assert store.status(job, now=NOW).images_per_s_last_minute is None


def test_rate_none_when_minute_empty(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=100, failed=0, now=NOW - 200)
    store.record_batch(job, 1, succeeded=100, failed=0, now=NOW - 100)

    assert store.status(job, now=NOW).images_per_s_last_minute is None


def test_average_rate_kept(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=100, failed=0, now=NOW - 100)
    store.record_batch(job, 1, succeeded=100, failed=0, now=NOW - 10)

    assert store.status(job, now=NOW).images_per_s == pytest.approx(200 / 100)


def test_eta_uses_last_minute_rate(store: JobStore, job: str) -> None:
    store.finish_listing(job, images=1000, skipped=0, batches=10)
    store.record_batch(job, 0, succeeded=100, failed=0, now=NOW - 300)
    store.record_batch(job, 1, succeeded=100, failed=0, now=NOW - 40)
    store.record_batch(job, 2, succeeded=100, failed=0, now=NOW - 20)

    status = store.status(job, now=NOW)

    assert status.images_per_s_last_minute == pytest.approx(5.0)
    assert status.eta_s == pytest.approx((1000 - 300) / 5.0)


def test_eta_falls_back_to_average(store: JobStore, job: str) -> None:
    store.finish_listing(job, images=1000, skipped=0, batches=10)
    store.record_batch(job, 0, succeeded=100, failed=0, now=NOW - 10)

    status = store.status(job, now=NOW)

    assert status.images_per_s == pytest.approx(10.0)
    assert status.eta_s == pytest.approx((1000 - 100) / 10.0)


def test_eta_none_while_listing(store: JobStore, job: str) -> None:
    store.record_batch(job, 0, succeeded=100, failed=0, now=NOW - 20)
    store.record_batch(job, 1, succeeded=100, failed=0, now=NOW - 10)

    assert store.status(job, now=NOW).eta_s is None


def test_old_samples_trimmed(store: JobStore, redis_client: redis.Redis, job: str) -> None:
    store.record_batch(job, 0, succeeded=1, failed=0, now=NOW - PROGRESS_KEEP_S - 1)
    store.record_batch(job, 1, succeeded=1, failed=0, now=NOW - PROGRESS_KEEP_S + 1)
    store.record_batch(job, 2, succeeded=1, failed=0, now=NOW)

    assert progress_samples(redis_client, job) == [f"{NOW - PROGRESS_KEEP_S + 1!r}:2", f"{NOW!r}:3"]


def test_samples_capped(store: JobStore, redis_client: redis.Redis, job: str) -> None:
    with redis_client.pipeline(transaction=False) as pipe:
        for batch in range(PROGRESS_MAX_SAMPLES + 10):
            store._record(
                keys=[JOB_KEY.format(job_id=job), f"{JOB_KEY.format(job_id=job)}:batches",
                      f"{JOB_KEY.format(job_id=job)}:batch_counts", JOB_PROGRESS_KEY.format(job_id=job)],
                args=[batch, 1, 0, repr(NOW + batch / 1000), batch_counts_json(1, 0, {}), PROGRESS_KEEP_S, PROGRESS_MAX_SAMPLES],
                client=pipe,
            )
        pipe.execute()

    samples = progress_samples(redis_client, job)

    assert len(samples) == PROGRESS_MAX_SAMPLES
    assert samples[-1].endswith(f":{PROGRESS_MAX_SAMPLES + 10}")


def test_retry_round_rate_counts_retried_images(store: JobStore, redis_client: redis.Redis, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=2, baseline={})
    empty_after_start = progress_samples(redis_client, job)
    store.record_retry_batch(job, 0, 1, (4, 0, {}), images=1, now=NOW - 20)
    store.record_retry_batch(job, 1, 1, (4, 0, {}), images=2, now=NOW - 10)

    status = store.status(job, now=NOW)

    assert empty_after_start == []
    assert status.images_per_s_last_minute == pytest.approx(2 / 10)
    assert status.eta_s is None


def test_stale_round_batch_adds_no_sample(store: JobStore, redis_client: redis.Redis, job: str) -> None:
    finished_job(store, job)
    store.start_retry(job, seen_round=0, batches=2, baseline={})
    store.cancel(job)
    store.start_retry(job, seen_round=1, batches=2, baseline={})

    store.record_retry_batch(job, 0, 1, (4, 0, {}), images=1, now=NOW)

    assert progress_samples(redis_client, job) == []


def test_listing_job_without_producer_is_lost(store: JobStore, job: str) -> None:
    store.add_listed(job, 64)

    status = store.status(job)

    assert status.listing is True
    assert status.listed == 64
    assert status.producer == "lost"


def test_listing_job_with_producer_key(store: JobStore, redis_client: redis.Redis, job: str) -> None:
    redis_client.set(JOB_PRODUCER_KEY.format(job_id=job), "token", ex=30)

    assert store.status(job).producer == "enqueueing"


def test_listed_job_producer_done(store: JobStore, job: str) -> None:
    store.finish_listing(job, images=8, skipped=0, batches=2)

    status = store.status(job)

    assert status.listing is False
    assert status.producer == "done"


def test_cancelled_while_listing_producer_stopped(store: JobStore, job: str) -> None:
    store.cancel(job)

    assert store.status(job).producer == "stopped"


def test_status_carries_source(store: JobStore, job: str) -> None:
    assert store.status(job).source == "s3://photos/in/"


def test_statuses_missing_job_is_none(store: JobStore, job: str) -> None:
    statuses = store.statuses([job, "20260101-000000-ffffffff"])

    assert statuses["20260101-000000-ffffffff"] is None
    assert statuses[job] is not None
