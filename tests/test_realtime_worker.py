"""Realtime embeddings through real worker processes: a redis-server process, moto's S3 server, Celery workers."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery

from producer.client import Client
from producer.constants import DEFAULT_REALTIME_QUEUE, REALTIME_PENDING_KEY
from producer.fleet import WorkerInfo, live_workers
from producer.queue import make_celery
from producer.realtime import (
    RealtimeInput,
    RealtimeReply,
    RealtimeRequest,
    decode_vectors,
    send_request,
    wait_reply,
)
from producer.settings import Settings
from tests.support.checkpoints import PROJECTION_DIM
from tests.support.worker import stack_client, start_worker, worker_stack

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = ("rocket.jpg", "astronaut.jpg", "chelsea.jpg", "coffee.jpg")
REPLY_TIMEOUT_S = 60.0
REGISTRY_WAIT_S = 10.0
LOAD_REQUESTS = 200
LOAD_THREADS = 16
SAMPLE_INTERVAL_S = 0.01


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    """A private Redis, moto's S3 server and one worker with the default queues, shared by this module."""
    with worker_stack(tmp_path_factory.mktemp("worker-logs"), tiny_clip_dir) as running:
        yield running


@pytest.fixture(scope="module")
def redis_client(stack: dict[str, Any]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack["redis_url"], socket_timeout=10.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def celery_app(stack: dict[str, Any]) -> Iterator[Celery]:
    app = make_celery(Settings(redis_url=stack["redis_url"]))
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(stack: dict[str, Any], tiny_clip_dir: Path) -> Client:
    return stack_client(stack, tiny_clip_dir)


def make_request(model_dir: Path, inputs: list[RealtimeInput]) -> RealtimeRequest:
    return RealtimeRequest(request_id=uuid.uuid4().hex, model=str(model_dir), inputs=inputs, deadline=time.time() + REPLY_TIMEOUT_S)


def photo_input(name: str) -> RealtimeInput:
    return RealtimeInput(kind="image", data=base64.b64encode((DATA / name).read_bytes()).decode("ascii"))


def wait_for_registry(client: redis.Redis, name_prefix: str, present: bool) -> list[WorkerInfo]:
    """Return the registry entries whose names start with `name_prefix` once there are some (`present`) or none."""
    deadline = time.monotonic() + REGISTRY_WAIT_S
    while True:
        found = [worker for worker in live_workers(client) if worker.name.startswith(name_prefix)]
        if bool(found) == present or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_round_trip(stack: dict[str, Any], redis_client: redis.Redis, celery_app: Celery, tiny_clip_dir: Path) -> None:
    request = make_request(tiny_clip_dir, [RealtimeInput(kind="text", text="a photo of a cat"), photo_input("chelsea.jpg")])
    send_request(redis_client, celery_app, DEFAULT_REALTIME_QUEUE, request)

    reply = wait_reply(redis_client, request.request_id, request.deadline, celery=celery_app, queue=DEFAULT_REALTIME_QUEUE)
    assert reply is not None, stack["worker"].log_tail(40)
    assert reply.error is None
    assert reply.dim == PROJECTION_DIM
    assert reply.worker.startswith(stack["worker"].name + "@")
    norms = np.linalg.norm(decode_vectors(reply.embeddings, 2, reply.dim), axis=1)
    np.testing.assert_allclose(norms, [1.0, 1.0], atol=1e-5)


def test_error_reply_round_trip(redis_client: redis.Redis, celery_app: Celery, tiny_clip_dir: Path) -> None:
    request = make_request(tiny_clip_dir, [RealtimeInput(kind="image", uri="s3://no-such-bucket/cat.jpg")])
    send_request(redis_client, celery_app, DEFAULT_REALTIME_QUEUE, request)

    reply = wait_reply(redis_client, request.request_id, request.deadline)
    assert reply is not None
    assert reply.error is not None
    assert reply.error.code == "not_found"
    assert reply.error.index == 0


def test_realtime_before_queued_batches(
    stack: dict[str, Any], client: Client, redis_client: redis.Redis, celery_app: Celery, tiny_clip_dir: Path
) -> None:
    s3 = client.storage.client
    source, output = f"rt-source-{uuid.uuid4().hex[:8]}", f"rt-output-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=source)
    s3.create_bucket(Bucket=output)
    for number in range(40):
        name = PHOTOS[number % len(PHOTOS)]
        s3.put_object(Bucket=source, Key=f"in/{number:03d}-{name}", Body=(DATA / name).read_bytes())
    job = client.submit(f"s3://{source}/in/", ["cat", "rocket"], f"s3://{output}/out/", model=str(tiny_clip_dir), batch_size=2)
    request = make_request(tiny_clip_dir, [RealtimeInput(kind="text", text="a rocket")])
    send_request(redis_client, celery_app, DEFAULT_REALTIME_QUEUE, request)

    reply = wait_reply(redis_client, request.request_id, request.deadline)
    status = job.status()
    assert reply is not None
    assert reply.error is None
    # 20 batches were queued before the request, and the worker finishes only the batch it runs before taking it.
    assert status.done < status.total, f"all {status.total} images were done before the realtime reply"
    job.wait(timeout_s=120, progress=False)
    assert job.status().state == "succeeded"


def test_registry_lists_worker_until_stopped(
    stack: dict[str, Any], redis_client: redis.Redis, tmp_path: Path, tiny_clip_dir: Path
) -> None:
    queues = {"CLIPFLEET_QUEUE": "registry-batch", "CLIPFLEET_REALTIME_QUEUE": "registry-realtime"}
    worker = start_worker(tmp_path, stack["redis_url"], tiny_clip_dir, stack["s3"].endpoint_url, queues)
    try:
        listed = wait_for_registry(redis_client, worker.name + "@", present=True)
        assert len(listed) == 1, worker.log_tail(40)
        assert listed[0].model == str(tiny_clip_dir)
        assert listed[0].queue == "registry-batch"
        assert listed[0].realtime_queue == "registry-realtime"
        assert listed[0].heartbeat_at >= listed[0].started_at
        # The main process id keeps two workers with one node name apart.
        assert listed[0].name.endswith(f"/{worker.process.pid}")
    finally:
        worker.stop()
    assert wait_for_registry(redis_client, worker.name + "@", present=False) == []


class ListSampler:
    """Samples the length of a Redis list in a thread while the `with` block runs."""

    def __init__(self, redis_url: str, key: str) -> None:
        self.lengths: list[int] = []
        self._client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
        self._key = key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="list-sampler", daemon=True)

    def __enter__(self) -> ListSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.lengths.append(int(self._client.llen(self._key)))


def test_concurrent_requests_queue_few_tasks(
    stack: dict[str, Any], redis_client: redis.Redis, celery_app: Celery, tiny_clip_dir: Path
) -> None:
    """Requests from many threads share wake-up tasks: the Celery list stays short while every request is answered."""

    def call(number: int) -> RealtimeReply | None:
        request = make_request(tiny_clip_dir, [RealtimeInput(kind="text", text=f"a photo of thing {number}")])
        send_request(redis_client, celery_app, DEFAULT_REALTIME_QUEUE, request)
        return wait_reply(redis_client, request.request_id, request.deadline, celery=celery_app, queue=DEFAULT_REALTIME_QUEUE)

    with ListSampler(stack["redis_url"], DEFAULT_REALTIME_QUEUE) as tasks:
        with ThreadPoolExecutor(LOAD_THREADS) as pool:
            replies = list(pool.map(call, range(LOAD_REQUESTS)))

    assert all(reply is not None for reply in replies), stack["worker"].log_tail(40)
    assert [reply.error for reply in replies if reply is not None] == [None] * LOAD_REQUESTS
    assert len(tasks.lengths) > 10
    # One wake-up is queued at a time; a worker that leaves requests behind queues the next one.
    assert max(tasks.lengths) <= 2, tasks.lengths
    assert redis_client.llen(DEFAULT_REALTIME_QUEUE) <= 2
    assert redis_client.llen(REALTIME_PENDING_KEY.format(queue=DEFAULT_REALTIME_QUEUE)) == 0
