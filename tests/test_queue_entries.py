"""Malformed entries in a queue's Redis list: a real worker logs and drops each one and keeps serving.

The entries are pushed straight into the list with LPUSH, as a buggy producer or a person with redis-cli
could. Each test then runs a good batch through the same worker to show that it still serves. The last test
checks that `clipfleet worker` exits with the worker's failure status.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, Settings
from producer.constants import DEFAULT_REALTIME_QUEUE, TASK_CLASSIFY_BATCH
from producer.queue import make_celery
from tests.support.servers import RedisServer
from tests.support.worker import start_worker
from workers.strategy import check_time_limits

DATA = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 120
LOG_TIMEOUT_S = 30.0
WORKER_EXIT_TIMEOUT_S = 60.0
POLL_S = 0.1
# kombu 5.7's Redis transport keeps delivered, unacknowledged messages in this hash.
UNACKED_KEY = "unacked"
DROPPED = "Dropped a malformed entry from queue"
REJECTED = "Rejected task message"


def capture_envelope(redis_url: str) -> dict[str, Any]:
    """Return the kombu envelope that the producer's Celery app sends for one batch, read back from Redis."""
    capture_queue = f"capture-{uuid.uuid4().hex[:8]}"
    sender = make_celery(Settings(redis_url=redis_url, queue=capture_queue), name="envelope-producer")
    batch = {"job_id": "job-under-test", "batch": 0, "uris": ["s3://photos/a.jpg"]}
    sender.send_task(TASK_CLASSIFY_BATCH, args=[batch], queue=capture_queue)
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    try:
        raw = client.rpop(capture_queue)
    finally:
        client.close()
    assert raw is not None
    return json.loads(raw)


def envelope_for(template: dict[str, Any], queue: str, change: dict[str, Any]) -> str:
    """Return `template` addressed to `queue` with a fresh delivery tag and the top-level fields in `change`."""
    envelope = json.loads(json.dumps(template))
    envelope["properties"]["delivery_tag"] = str(uuid.uuid4())
    envelope["properties"]["delivery_info"]["routing_key"] = queue
    envelope.update(change)
    return json.dumps(envelope)


def with_headers(template: dict[str, Any], **headers: Any) -> dict[str, Any]:
    return {"headers": {**template["headers"], **headers}}


def base64_text(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Each case: the entry (text, bytes, or a change to a real envelope), the log line that names it, and a
# text that the line must contain.
BAD_ENTRIES: dict[str, tuple[Any, str, str]] = {
    "not-json": ("not json", DROPPED, "entry starts 'not json'"),
    "json-list": ("[]", DROPPED, "entry starts '[]'"),
    "json-null": ("null", DROPPED, "entry starts 'null'"),
    "not-utf8": (b"\xff\xfe{}", DROPPED, "JSONDecodeError"),
    "typed-value-invalid": ('{"__type__": "datetime", "__value__": "not a date"}', DROPPED, "Invalid isoformat string"),
    "body-not-task": (lambda t: {"body": base64_text(b'{"a":1}')}, REJECTED, "body (7 bytes) starts b'{\"a\":1}'"),
    "body-not-base64": (lambda t: {"body": "%%%not base64"}, DROPPED, "binascii.Error"),
    "timelimit-string": (lambda t: with_headers(t, timelimit="x"), REJECTED, "timelimit header 'x'"),
    "timelimit-strings": (lambda t: with_headers(t, timelimit=["a", "b"]), REJECTED, "timelimit header ['a', 'b']"),
    "task-name-list": (lambda t: with_headers(t, task=[]), DROPPED, "headers.task must be a string"),
    "delivery-tag-number": (
        lambda t: {"properties": {**t["properties"], "delivery_tag": 7}}, DROPPED, "delivery_tag must be a string"
    ),
}


class EntryStack:
    """A private Redis, one worker on a private queue, and S3 buckets with two photos."""

    def __init__(self, redis_url: str, queue: str, worker: Any, client: Client, buckets: dict[str, str]) -> None:
        self.redis_url = redis_url
        self.queue = queue
        self.worker = worker
        self.client = client
        self.buckets = buckets
        self.template = capture_envelope(redis_url)
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5.0)

    def log(self) -> str:
        return self.worker.log_path.read_text(errors="replace")

    def push(self, entry: str | bytes) -> None:
        self.redis.lpush(self.queue, entry)

    def wait_for_log_lines(self, start: int, marker: str) -> list[str]:
        """Return the log lines after character `start` that contain `marker`, waiting up to LOG_TIMEOUT_S for one."""
        deadline = time.monotonic() + LOG_TIMEOUT_S
        while time.monotonic() < deadline:
            lines = [line for line in self.log()[start:].splitlines() if marker in line]
            if lines or not self.worker.running():
                return lines
            time.sleep(POLL_S)
        return []

    def run_good_job(self) -> Any:
        job = self.client.submit(
            source=f"s3://{self.buckets['input']}/in/", labels=["cat", "rocket"],
            output=f"s3://{self.buckets['output']}/out/",
        )
        return job.wait(timeout_s=JOB_TIMEOUT_S, progress=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, s3_server: Any) -> Iterator[EntryStack]:
    log_dir = tmp_path_factory.mktemp("queue-entry-logs")
    queue = f"entries-{uuid.uuid4().hex[:8]}"
    with RedisServer() as server:
        worker = start_worker(log_dir, server.url, tiny_clip_dir, s3_server.endpoint_url, extra_env={"CLIPFLEET_QUEUE": queue})
        try:
            settings = Settings(
                redis_url=server.url, s3_endpoint_url=s3_server.endpoint_url, model=str(tiny_clip_dir), queue=queue
            )
            client = Client(settings)
            buckets = {"input": f"entries-in-{uuid.uuid4().hex[:8]}", "output": f"entries-out-{uuid.uuid4().hex[:8]}"}
            for name in buckets.values():
                client.storage.client.create_bucket(Bucket=name)
            for photo in ("chelsea.jpg", "rocket.jpg"):
                client.storage.client.put_object(Bucket=buckets["input"], Key=f"in/{photo}", Body=(DATA / photo).read_bytes())
            entry_stack = EntryStack(server.url, queue, worker, client, buckets)
            yield entry_stack
            entry_stack.redis.close()
        finally:
            worker.stop()


@pytest.mark.parametrize("name", list(BAD_ENTRIES))
def test_malformed_entry_dropped(stack: EntryStack, name: str) -> None:
    entry, marker, expected = BAD_ENTRIES[name]
    if callable(entry):
        entry = envelope_for(stack.template, stack.queue, entry(stack.template))
    start = len(stack.log())

    stack.push(entry)
    lines = stack.wait_for_log_lines(start, marker)

    assert stack.worker.running(), stack.worker.log_tail(40)
    assert len(lines) == 1, lines
    assert "ERROR" in lines[0]
    assert stack.queue in lines[0]
    assert expected in lines[0]
    assert len(lines[0]) < 600
    if len(entry) > 100:
        assert (entry if isinstance(entry, str) else entry.decode(errors="replace")) not in lines[0]
    assert stack.redis.llen(stack.queue) == 0
    assert stack.redis.hlen(UNACKED_KEY) == 0
    assert "Unrecoverable error" not in stack.log()


def test_malformed_realtime_entry_names_its_queue(stack: EntryStack) -> None:
    # The worker reads the realtime queue too; the log names the queue the entry came from.
    start = len(stack.log())

    stack.redis.lpush(DEFAULT_REALTIME_QUEUE, "not json")
    lines = stack.wait_for_log_lines(start, f"{DROPPED} {DEFAULT_REALTIME_QUEUE}:")

    assert len(lines) == 1, stack.worker.log_tail(20)
    assert stack.queue not in lines[0]
    assert stack.redis.llen(DEFAULT_REALTIME_QUEUE) == 0


def test_worker_serves_after_malformed_entries(stack: EntryStack) -> None:
    for entry in ("not json", "[]", envelope_for(stack.template, stack.queue, with_headers(stack.template, timelimit="x"))):
        stack.push(entry)

    status = stack.run_good_job()

    assert status.state == "succeeded"
    assert status.succeeded == 2
    assert stack.worker.running()
    assert stack.redis.llen(stack.queue) == 0
    assert stack.redis.hlen(UNACKED_KEY) == 0


def test_pickle_entry_still_refused(stack: EntryStack) -> None:
    pickled = envelope_for(stack.template, stack.queue, {"content-type": "application/x-python-serialize"})
    start = len(stack.log())

    stack.push(pickled)
    lines = stack.wait_for_log_lines(start, "ContentDisallowed")

    assert len(lines) >= 1
    assert stack.worker.running()
    assert stack.redis.llen(stack.queue) == 0
    assert stack.redis.hlen(UNACKED_KEY) == 0


@pytest.mark.parametrize("value", [None, 0, [None, None], [30, 20], [1.5, None], (None, 0)])
def test_time_limits_accepted(value: Any) -> None:
    assert check_time_limits(value) is None


@pytest.mark.parametrize("value", ["x", "xy", [1], [1, 2, 3], ["a", "b"], [-1, None], [True, None], {"hard": 1}])
def test_time_limits_rejected(value: Any) -> None:
    with pytest.raises(ValueError, match="timelimit header"):
        check_time_limits(value)


# --- the exit status of `clipfleet worker` ---------------------------------------------------------------


def test_cli_worker_exits_nonzero_on_unrecoverable_error(tmp_path: Path, tiny_clip_dir: Path) -> None:
    queue = f"exit-{uuid.uuid4().hex[:8]}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLIPFLEET_")}
    with RedisServer() as server:
        env.update(
            CLIPFLEET_REDIS_URL=server.url, CLIPFLEET_MODEL=str(tiny_clip_dir), CLIPFLEET_QUEUE=queue,
            CLIPFLEET_LOCAL_ROOTS=tempfile.gettempdir(),
        )
        log_path = tmp_path / "worker.log"
        with log_path.open("wb") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "producer.cli", "worker"], cwd=REPO_ROOT, env=env,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                wait_for_text(log_path, "ready.", worker)
                # BRPOP on a key that contains a string fails with WRONGTYPE, an error Celery does not recover from.
                client = redis.Redis.from_url(server.url, socket_timeout=5.0)
                client.set(queue, "not a list")
                client.close()
                exit_status = worker.wait(timeout=WORKER_EXIT_TIMEOUT_S)
            finally:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(timeout=WORKER_EXIT_TIMEOUT_S)

    log = log_path.read_text(errors="replace")
    assert "Unrecoverable error" in log
    assert "WRONGTYPE" in log
    assert exit_status == 1


def wait_for_text(path: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with status {process.returncode}:\n{path.read_text(errors='replace')[-4000:]}")
        time.sleep(POLL_S)
    raise TimeoutError(f"worker log did not show {text!r} within {JOB_TIMEOUT_S} s")
