"""Enqueueing with checkpoints: exactly-once publishing, producer crashes, detached producers, resubmission.

Producers run as real `clipfleet` processes against a real Redis. No worker runs here: the tests read the
queue themselves, popping tasks as a worker would, so each batch number sent can be checked.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.checkpoint import JobEnded, LeaseLost, PublishGuard
from producer.client import Client, make_spec
from producer.constants import JOB_KEY, JOB_PRODUCER_KEY
from producer.lease import ProducerLease
from producer.messages import BatchMessage
from producer.queue import BatchSender
from producer.results import write_shard
from tests.conftest import TEST_QUEUE

WAIT_S = 30.0


def write_manifest(path: Path, count: int, name: str = "img") -> list[str]:
    uris = [f"s3://scale-bucket/{name}-{index:06d}.jpg" for index in range(count)]
    path.write_text("\n".join(uris) + "\n")
    return uris


def producer_env(redis_url: str, **settings: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CLIPFLEET_REDIS_URL=redis_url, CLIPFLEET_QUEUE=TEST_QUEUE)
    env.update({f"CLIPFLEET_{name.upper()}": value for name, value in settings.items()})
    return env


def clipfleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "producer.cli", *args]


def submit_args(manifest: Path, output: Path, *extra: str, batch_size: int = 2) -> list[str]:
    return clipfleet("submit", str(manifest), "--labels", "cat,dog", "--output", str(output), "--batch-size", str(batch_size), *extra)


def task_batch(raw: bytes) -> tuple[str, int, list[str]]:
    """Return (job id, batch, URIs) of one kombu message as Redis stores it."""
    envelope = json.loads(raw)
    args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    return args[0]["job_id"], args[0]["batch"], args[0]["uris"]


def queued_batches(client: redis.Redis) -> list[int]:
    """Return the batch numbers in the test queue, oldest first."""
    return [task_batch(raw)[1] for raw in reversed(client.lrange(TEST_QUEUE, 0, -1))]


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(0.05)


def job_fields(client: redis.Redis, job_id: str) -> dict[str, str]:
    return {key.decode(): value.decode() for key, value in client.hgetall(JOB_KEY.format(job_id=job_id)).items()}


class QueueDrain:
    """Pops tasks from the test queue in a thread, as a worker fleet would, and keeps their batch numbers."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
        self.batches: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> QueueDrain:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            popped = self.client.brpop([TEST_QUEUE], timeout=0.2)
            if popped is not None:
                self.batches.append(task_batch(popped[1])[1])


@pytest.fixture
def client(make_client: Callable[..., Client]) -> Client:
    return make_client()


def created_job(client: Client, tmp_path: Path, job_id: str = "20260101-000000-0000abcd") -> str:
    spec = make_spec(client.settings, str(tmp_path), ["cat", "dog"], str(tmp_path / "out"))
    client.store.create(job_id, spec)
    return job_id


def test_guarded_publish_pushes_once(client: Client, redis_client: redis.Redis, tmp_path: Path) -> None:
    job_id = created_job(client, tmp_path)
    lease = ProducerLease(client.store.redis, job_id, 30.0)
    lease.acquire()
    sender = BatchSender.for_settings(client._celery, client.settings)
    message = BatchMessage(job_id=job_id, batch=0, uris=["s3://b/x.jpg"])

    first = sender.publish(message, PublishGuard(job_id, 0, lease.token, 1))
    # A publish repeated after a lost reply finds the checkpoint past its batch.
    again = sender.publish(message, PublishGuard(job_id, 0, lease.token, 1))
    sender.close()

    assert first is True
    assert again is False
    assert queued_batches(redis_client) == [0]
    assert job_fields(redis_client, job_id)["next_batch"] == "1"
    assert job_fields(redis_client, job_id)["listed"] == "1"


def test_publish_without_lease_rejected(client: Client, redis_client: redis.Redis, tmp_path: Path) -> None:
    job_id = created_job(client, tmp_path)
    ProducerLease(client.store.redis, job_id, 30.0).acquire()
    sender = BatchSender.for_settings(client._celery, client.settings)
    message = BatchMessage(job_id=job_id, batch=0, uris=["s3://b/x.jpg"])

    with pytest.raises(LeaseLost):
        sender.publish(message, PublishGuard(job_id, 0, "another-token", 1))
    sender.close()

    assert redis_client.llen(TEST_QUEUE) == 0


def test_publish_for_cancelled_job_stops(client: Client, redis_client: redis.Redis, tmp_path: Path) -> None:
    job_id = created_job(client, tmp_path)
    lease = ProducerLease(client.store.redis, job_id, 30.0)
    lease.acquire()
    client.store.cancel(job_id)
    sender = BatchSender.for_settings(client._celery, client.settings)

    with pytest.raises(JobEnded):
        sender.publish(BatchMessage(job_id=job_id, batch=0, uris=["s3://b/x.jpg"]), PublishGuard(job_id, 0, lease.token, 1))
    sender.close()

    assert redis_client.llen(TEST_QUEUE) == 0


def test_lease_held_by_one_producer(client: Client, tmp_path: Path) -> None:
    job_id = created_job(client, tmp_path)
    first = ProducerLease(client.store.redis, job_id, 30.0)
    second = ProducerLease(client.store.redis, job_id, 30.0)

    assert first.acquire() is True
    assert second.acquire() is False
    first.release()
    assert second.acquire() is True


def start_paused_producer(manifest: Path, output: Path, redis_url: str, redis_client: redis.Redis) -> tuple[subprocess.Popen[bytes], str]:
    """Start a submission of 20 batches that pauses at a high-water mark of 4 tasks; return it and its job id."""
    env = producer_env(redis_url, queue_high_water="4", producer_lease_s="2")
    process = subprocess.Popen(submit_args(manifest, output), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: redis_client.llen(TEST_QUEUE) >= 4)
    job_ids = [key.decode().split(":")[2] for key in redis_client.keys("clipfleet:job:*") if key.count(b":") == 2]
    return process, job_ids[0]


def test_resume_after_crash_sends_each_batch_once(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    write_manifest(manifest, 40)
    process, job_id = start_paused_producer(manifest, tmp_path / "out", redis_url, redis_client)
    process.kill()
    process.wait(timeout=10)
    env = producer_env(redis_url, producer_lease_s="2")

    busy = subprocess.run(clipfleet("resume", job_id), env=env, capture_output=True, text=True, timeout=60)
    wait_until(lambda: not redis_client.exists(JOB_PRODUCER_KEY.format(job_id=job_id)), timeout_s=10)
    with QueueDrain(redis_url) as drain:
        resumed = subprocess.run(clipfleet("resume", job_id), env=env, capture_output=True, text=True, timeout=120)
        wait_until(lambda: len(drain.batches) >= 20)
    fields = job_fields(redis_client, job_id)

    assert busy.returncode == 1
    assert "being enqueued by another producer" in busy.stderr
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(drain.batches) == list(range(20))
    assert fields["listing_done"] == "1"
    assert fields["batches_total"] == "20"
    assert fields["total"] == "40"


def test_interrupted_submit_resumable_at_once(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    write_manifest(manifest, 40)
    process, job_id = start_paused_producer(manifest, tmp_path / "out", redis_url, redis_client)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    fields = job_fields(redis_client, job_id)

    assert process.returncode == 130
    assert fields["state"] == "queued"
    assert f"clipfleet resume {job_id}" in fields["error"]
    assert not redis_client.exists(JOB_PRODUCER_KEY.format(job_id=job_id))
    with QueueDrain(redis_url) as drain:
        resumed = subprocess.run(clipfleet("resume", job_id), env=producer_env(redis_url), capture_output=True, text=True, timeout=120)
        wait_until(lambda: len(drain.batches) >= 20)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(drain.batches) == list(range(20))
    assert job_fields(redis_client, job_id)["error"] == ""


def test_detached_submit_returns_at_once(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    write_manifest(manifest, 30)
    log_path = tmp_path / "producer.log"
    env = producer_env(redis_url, queue_high_water="4")

    submitted = subprocess.run(
        submit_args(manifest, tmp_path / "out", "--detach", "--log-file", str(log_path)),
        env=env, capture_output=True, text=True, timeout=60,
    )
    job_id = submitted.stdout.strip()
    # The background producer pauses at 4 queued tasks, so the submit command returned before the listing ended.
    wait_until(lambda: redis_client.llen(TEST_QUEUE) >= 4)
    assert job_fields(redis_client, job_id)["listing_done"] == "0"
    with QueueDrain(redis_url) as drain:
        wait_until(lambda: job_fields(redis_client, job_id)["listing_done"] == "1")
        wait_until(lambda: len(drain.batches) >= 15)

    assert submitted.returncode == 0, submitted.stderr
    assert str(log_path) in submitted.stderr
    assert sorted(drain.batches) == list(range(15))
    wait_until(lambda: "enqueued: 30 images in 15 batches" in log_path.read_text())


def test_resume_submits_only_missing_batches(client: Client, redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    uris = write_manifest(manifest, 20)
    output = tmp_path / "out"
    env = producer_env(redis_url, queue_high_water="1000")
    first = subprocess.run(submit_args(manifest, output), env=env, capture_output=True, text=True, timeout=60)
    job_id = first.stdout.strip()
    # Workers finished batches 0 and 1; batch 2 wrote its shard but its worker died before counting it.
    spec = client.store.spec(job_id)
    for batch in (0, 1, 2):
        rows = [{"uri": uri, "label": "cat", "score": 0.9, "top_k": [], "error": None} for uri in uris[2 * batch:2 * batch + 2]]
        write_shard(client.storage, spec, job_id, batch, rows)
    client.store.record_batch(job_id, 0, 2, 0)
    client.store.record_batch(job_id, 1, 2, 0)
    client.store.cancel(job_id)
    redis_client.delete(TEST_QUEUE)  # the workers dropped the cancelled job's queued batches

    again = subprocess.run(submit_args(manifest, output, "--resume"), env=env, capture_output=True, text=True, timeout=60)
    fields = job_fields(redis_client, job_id)

    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == job_id
    assert queued_batches(redis_client) == list(range(3, 10))
    assert fields["state"] == "running"
    assert fields["batches_done"] == "3"
    assert fields["succeeded"] == "6"
    assert fields["listing_done"] == "1"


def test_resume_without_earlier_job_submits_new(client: Client, redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    write_manifest(manifest, 4)
    env = producer_env(redis_url)

    result = subprocess.run(submit_args(manifest, tmp_path / "out", "--resume"), env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert queued_batches(redis_client) == [0, 1]


def write_earlier_job(folder: Path, rows: list[dict[str, Any]], labels: list[str]) -> None:
    folder.mkdir(parents=True)
    summary = {
        "model": "openai/clip-vit-base-patch32", "model_revision": "abc", "top_k": 5,
        "prompts": {label: [f"a photo of a {label}."] for label in labels},
    }
    (folder / "_SUCCESS.json").write_text(json.dumps(summary))
    (folder / "part-000000.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def ok_row(uri: str) -> dict[str, Any]:
    return {"uri": uri, "label": "cat", "score": 0.9, "top_k": [], "error": None}


def failed_row(uri: str) -> dict[str, Any]:
    return {"uri": uri, "label": None, "score": None, "top_k": [], "error": {"code": "not_found", "message": "gone"}}


def queued_uris(client: redis.Redis) -> list[str]:
    return [uri for raw in reversed(client.lrange(TEST_QUEUE, 0, -1)) for uri in task_batch(raw)[2]]


def test_skip_existing_leaves_out_classified(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    uris = write_manifest(manifest, 6)
    earlier = tmp_path / "earlier"
    write_earlier_job(earlier / "job-a", [ok_row(uris[0]), failed_row(uris[1]), ok_row(uris[2])], ["cat", "dog"])
    write_earlier_job(earlier / "job-b", [ok_row(uris[3])], ["cat", "bird"])  # other labels: not a match

    result = subprocess.run(
        submit_args(manifest, tmp_path / "out", "--skip-existing", str(earlier)),
        env=producer_env(redis_url), capture_output=True, text=True, timeout=60,
    )
    fields = job_fields(redis_client, result.stdout.strip())

    assert result.returncode == 0, result.stderr
    assert queued_uris(redis_client) == [uris[1], uris[3], uris[4], uris[5]]
    assert fields["skipped_existing"] == "2"
    assert fields["total"] == "4"


def test_skip_existing_missing_folder_rejected(redis_url: str, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    write_manifest(manifest, 2)

    result = subprocess.run(
        submit_args(manifest, tmp_path / "out", "--skip-existing", str(tmp_path / "nowhere")),
        env=producer_env(redis_url), capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 2
    assert "--skip-existing" in result.stderr
    assert "nowhere" in result.stderr


def peak_rss_mib(command: list[str], env: dict[str, str]) -> float:
    """Run `command` and return its peak resident memory in MiB, from the kernel's accounting of the child."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, process.stderr.read().decode() if process.stderr else ""
    return usage.ru_maxrss / 1024


def test_producer_memory_independent_of_size(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    env = producer_env(redis_url, queue_high_water="100000")
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    write_manifest(small, 50_000)
    write_manifest(large, 250_000)

    small_mib = peak_rss_mib(submit_args(small, tmp_path / "out", batch_size=256), env)
    redis_client.delete(TEST_QUEUE)
    large_mib = peak_rss_mib(submit_args(large, tmp_path / "out", batch_size=256), env)

    # Holding the 200,000 extra URIs would take at least 20 MiB (about 100 bytes each as Python strings).
    assert large_mib - small_mib < 8.0, (small_mib, large_mib)


def test_cancel_stops_paused_producer(client: Client, redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    write_manifest(manifest, 40)
    process, job_id = start_paused_producer(manifest, tmp_path / "out", redis_url, redis_client)

    client.store.cancel(job_id)
    process.wait(timeout=15)

    assert process.returncode == 0
    assert redis_client.llen(TEST_QUEUE) == 4
    assert job_fields(redis_client, job_id)["listing_done"] == "0"
    assert not redis_client.exists(JOB_PRODUCER_KEY.format(job_id=job_id))


@pytest.mark.parametrize("change", ["insert", "truncate"])
def test_resume_rejects_changed_source(change: str, redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    uris = write_manifest(manifest, 40)
    process, job_id = start_paused_producer(manifest, tmp_path / "out", redis_url, redis_client)
    process.kill()
    process.wait(timeout=10)
    changed = ["s3://scale-bucket/aaa-first.jpg", *uris] if change == "insert" else uris[:3]
    manifest.write_text("\n".join(changed) + "\n")
    wait_until(lambda: not redis_client.exists(JOB_PRODUCER_KEY.format(job_id=job_id)), timeout_s=10)

    resumed = subprocess.run(clipfleet("resume", job_id), env=producer_env(redis_url), capture_output=True, text=True, timeout=60)

    assert resumed.returncode == 1
    assert "no longer list the same images" in resumed.stderr
    assert redis_client.llen(TEST_QUEUE) == 4
    assert job_fields(redis_client, job_id)["listing_done"] == "0"


def test_wait_stops_when_producer_lost(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    write_manifest(manifest, 40)
    process, job_id = start_paused_producer(manifest, tmp_path / "out", redis_url, redis_client)
    process.kill()
    process.wait(timeout=10)
    wait_until(lambda: not redis_client.exists(JOB_PRODUCER_KEY.format(job_id=job_id)), timeout_s=10)

    waited = subprocess.run(clipfleet("wait", job_id), env=producer_env(redis_url), capture_output=True, text=True, timeout=60)

    assert waited.returncode == 1
    assert f"clipfleet resume {job_id}" in waited.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--skip-existing", "s3://"), "--skip-existing 's3://' is invalid"),
        (("--skip-existing", ""), "--skip-existing is empty"),
        (("--detach", "--log-file", "/proc/no-such-folder/producer.log"), "cannot be written"),
        (("--log-file", "producer.log"), "--log-file applies only with --detach"),
    ],
)
def test_submit_option_rejected(extra: tuple[str, ...], message: str, redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    write_manifest(manifest, 4)

    result = subprocess.run(submit_args(manifest, tmp_path / "out", *extra), env=producer_env(redis_url), capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert redis_client.keys("clipfleet:job:*") == []


def test_missing_second_prefix_rejected_before_job(s3_server: Any, make_bucket: Callable[[], str], redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    bucket = make_bucket()
    env = producer_env(redis_url, s3_endpoint_url=s3_server.endpoint_url)

    result = subprocess.run(
        clipfleet("submit", f"s3://{bucket}/a/", "s3://no-such-bucket-here/b/", "--labels", "cat", "--output", str(tmp_path / "out")),
        env=env, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert "s3://no-such-bucket-here/b/" in result.stderr
    assert redis_client.keys("clipfleet:job:*") == []


def test_resubmit_rejects_changed_source(client: Client, redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    uris = write_manifest(manifest, 20)
    output = tmp_path / "out"
    env = producer_env(redis_url, queue_high_water="1000")
    job_id = subprocess.run(submit_args(manifest, output), env=env, capture_output=True, text=True, timeout=60).stdout.strip()
    client.store.cancel(job_id)
    redis_client.delete(TEST_QUEUE)
    manifest.write_text("\n".join(["s3://scale-bucket/aaa-first.jpg", *uris]) + "\n")

    again = subprocess.run(submit_args(manifest, output, "--resume"), env=env, capture_output=True, text=True, timeout=60)

    assert again.returncode == 1
    assert "no longer list the same images" in again.stderr
    assert redis_client.llen(TEST_QUEUE) == 0
    assert job_fields(redis_client, job_id)["state"] == "cancelled"
