"""Task messages and job ids: the schema checks, and a real worker that rejects bad messages and keeps serving.

The worker tests send messages straight to the queue with Celery, as a buggy or hostile producer would, then
run a good job through the same worker to show it still serves.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from pydantic import ValidationError

from producer import Client, Settings
from producer.client import new_job_id
from producer.constants import DEFAULT_QUEUE, TASK_CLASSIFY_BATCH
from producer.messages import GENERATED_JOB_ID_RE, BatchMessage, InvalidJobId, check_job_id
from producer.queue import make_celery
from producer.spec import build_spec
from producer.state import JobStore
from tests.support.servers import RedisServer
from tests.support.worker import start_worker

DATA = Path(__file__).resolve().parent / "data"
WAIT_S = 120
CLI_TIMEOUT_S = 60
GOOD_ID = "20260101-000000-0123abcd"

VALID_IDS = [GOOD_ID, "job-under-test", "a", "A.b_c-1", "x" * 128, "v1.2"]
INVALID_IDS = ["", "../../etc", "x/../../y", "a..b", ".hidden", "-x", "_x", "a/b", "a b", "x" * 129, "caf\u00e9", "a\nb", "a:b"]


# --- job ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job_id", VALID_IDS)
def test_job_id_accepted(job_id: str) -> None:
    assert check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", INVALID_IDS)
def test_job_id_rejected(job_id: str) -> None:
    with pytest.raises(InvalidJobId, match="invalid job id"):
        check_job_id(job_id)


@pytest.mark.parametrize("job_id", [None, 7, b"abc"])
def test_job_id_must_be_string(job_id: Any) -> None:
    with pytest.raises(InvalidJobId, match="must be a string"):
        check_job_id(job_id)


def test_generated_job_id_matches_both_forms() -> None:
    job_id = new_job_id()

    assert GENERATED_JOB_ID_RE.match(job_id)
    assert check_job_id(job_id) == job_id


# --- BatchMessage ----------------------------------------------------------------------------------------

MESSAGE = {"version": 1, "job_id": GOOD_ID, "batch": 0, "uris": ["s3://photos/a.jpg"]}


def test_valid_message_accepted() -> None:
    assert BatchMessage.model_validate(MESSAGE).uris == ["s3://photos/a.jpg"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"job_id": "../../etc"}, "job_id", id="job-id-climbs"),
        pytest.param({"job_id": "x/../../y"}, "job_id", id="job-id-with-slash"),
        pytest.param({"job_id": 12}, "job_id", id="job-id-number"),
        pytest.param({"batch": "0"}, "batch", id="batch-string"),
        pytest.param({"batch": True}, "batch", id="batch-bool"),
        pytest.param({"batch": -1}, "batch", id="batch-negative"),
        pytest.param({"uris": "s3://photos/a.jpg"}, "uris", id="uris-string"),
        pytest.param({"uris": []}, "uris", id="uris-empty"),
        pytest.param({"uris": [7]}, "uris.0", id="uri-number"),
        pytest.param({"version": 2}, "version", id="version-unknown"),
        pytest.param({"extra": 1}, "extra", id="unknown-field"),
    ],
)
def test_invalid_message_rejected(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        BatchMessage.model_validate({**MESSAGE, **change})

    assert [".".join(map(str, error["loc"])) for error in caught.value.errors()] == [field]


@pytest.mark.parametrize("missing", ["job_id", "batch", "uris"])
def test_message_missing_field_rejected(missing: str) -> None:
    payload = {key: value for key, value in MESSAGE.items() if key != missing}

    with pytest.raises(ValidationError, match=missing):
        BatchMessage.model_validate(payload)


# --- public entries that take a job id --------------------------------------------------------------------


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    job_store = JobStore.from_url(redis_url)
    yield job_store
    job_store.redis.close()


@pytest.mark.parametrize("job_id", ["../../etc", "x/../../y"])
def test_job_store_rejects_id_before_redis(job_id: str, store: JobStore) -> None:
    spec = build_spec(source="s3://photos/in/", labels=["cat"], output="s3://results/")

    with pytest.raises(InvalidJobId):
        store.create(job_id, spec)
    with pytest.raises(InvalidJobId):
        store.state(job_id)
    with pytest.raises(InvalidJobId):
        store.record_batch(job_id, 0, succeeded=1, failed=0)

    assert store.redis.dbsize() == 0


def test_client_job_rejects_id(redis_url: str) -> None:
    client = Client(Settings(redis_url=redis_url))

    with pytest.raises(InvalidJobId, match=r"'\.\./\.\./etc'"):
        client.job("../../etc")


def test_cli_results_rejects_id(redis_url: str) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLIPFLEET_")}
    env["CLIPFLEET_REDIS_URL"] = redis_url

    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "results", "x/../../y"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env,
    )

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: invalid job id 'x/../../y'")


# --- a real worker ----------------------------------------------------------------------------------------


class CreateFileWhenUnpickled:
    """A pickle payload that creates `path` when it is deserialised, and does nothing else."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def worker_stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, s3_server: Any) -> Iterator[dict[str, Any]]:
    """A private Redis and one worker process, shared by this module's worker tests."""
    log_dir = tmp_path_factory.mktemp("message-worker-logs")
    with RedisServer() as server:
        worker = start_worker(log_dir, server.url, tiny_clip_dir, s3_server.endpoint_url)
        try:
            yield {"redis_url": server.url, "worker": worker}
        finally:
            worker.stop()


@pytest.fixture(scope="module")
def worker_client(worker_stack: dict[str, Any], s3_server: Any, tiny_clip_dir: Path) -> Client:
    settings = Settings(redis_url=worker_stack["redis_url"], s3_endpoint_url=s3_server.endpoint_url, model=str(tiny_clip_dir))
    return Client(settings)


@pytest.fixture(scope="module")
def photo_buckets(worker_client: Client) -> dict[str, str]:
    s3 = worker_client.storage.client
    names = {"input": f"messages-in-{uuid.uuid4().hex[:8]}", "output": f"messages-out-{uuid.uuid4().hex[:8]}"}
    for name in names.values():
        s3.create_bucket(Bucket=name)
    for photo in ("chelsea.jpg", "rocket.jpg"):
        s3.put_object(Bucket=names["input"], Key=f"in/{photo}", Body=(DATA / photo).read_bytes())
    return names


def run_good_job(client: Client, buckets: dict[str, str]) -> None:
    """Run a two-image job through the worker and check that it succeeds."""
    job = client.submit(source=f"s3://{buckets['input']}/in/", labels=["cat", "rocket"], output=f"s3://{buckets['output']}/out/")
    status = job.wait(timeout_s=WAIT_S, progress=False)
    assert status.state == "succeeded"
    assert status.succeeded == 2


def worker_log(stack: dict[str, Any]) -> str:
    return stack["worker"].log_path.read_text(errors="replace")


def queue_length(stack: dict[str, Any]) -> int:
    client = redis.Redis.from_url(stack["redis_url"], socket_timeout=5.0)
    try:
        return int(client.llen(DEFAULT_QUEUE))
    finally:
        client.close()


def test_payload_runs_when_unpickled(tmp_path: Path) -> None:
    # The control for the worker test below: this payload does create its file when deserialised.
    marker = tmp_path / "unpickled"

    pickle.loads(pickle.dumps(CreateFileWhenUnpickled(marker)))

    assert marker.exists()


def test_worker_rejects_pickle_message(
    worker_stack: dict[str, Any], worker_client: Client, photo_buckets: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled-by-worker"
    sender = Celery("pickle-producer", broker=worker_stack["redis_url"])
    sender.conf.update(task_serializer="pickle", accept_content=["json", "pickle"])

    sender.send_task(TASK_CLASSIFY_BATCH, args=[CreateFileWhenUnpickled(marker)], queue=DEFAULT_QUEUE, serializer="pickle")
    run_good_job(worker_client, photo_buckets)

    log = worker_log(worker_stack)
    assert not marker.exists()
    assert "ContentDisallowed" in log
    assert "application/x-python-serialize" in log
    assert worker_stack["worker"].running()
    assert queue_length(worker_stack) == 0


BAD_MESSAGES = {
    "missing-uris": ([{"job_id": GOOD_ID, "batch": 0}], "uris: Field required"),
    "mistyped-batch": ([{"job_id": GOOD_ID, "batch": "zero", "uris": ["s3://photos/a.jpg"]}], "batch: Input should be a valid integer"),
    "uris-not-list": ([{"job_id": GOOD_ID, "batch": 0, "uris": "s3://photos/a.jpg"}], "uris: Input should be a valid list"),
    "payload-not-object": (["not an object"], "Input should be a valid dictionary"),
    "job-id-climbs": ([{"job_id": "../../etc", "batch": 0, "uris": ["s3://photos/a.jpg"]}], "job id '../../etc'"),
    "job-id-with-slash": ([{"job_id": "x/../../y", "batch": 0, "uris": ["s3://photos/a.jpg"]}], "job id 'x/../../y'"),
    "no-arguments": ([], "0 positional and 0 keyword arguments"),
}


def test_worker_rejects_malformed_json_messages(
    worker_stack: dict[str, Any], worker_client: Client, photo_buckets: dict[str, str]
) -> None:
    sender = make_celery(Settings(redis_url=worker_stack["redis_url"]), name="json-producer")

    for args, _ in BAD_MESSAGES.values():
        sender.send_task(TASK_CLASSIFY_BATCH, args=args, queue=DEFAULT_QUEUE)
    run_good_job(worker_client, photo_buckets)

    log = worker_log(worker_stack)
    for name, (_, expected) in BAD_MESSAGES.items():
        dropped = [line for line in log.splitlines() if "Dropped a" in line and expected in line]
        assert len(dropped) == 1, f"{name}: {dropped}"
    assert "Retry in" not in log
    assert worker_stack["worker"].running()
    assert queue_length(worker_stack) == 0
