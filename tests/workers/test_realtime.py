"""`embed_pending` in process, without Celery: a real Redis, moto's S3 server and the tiny CLIP checkpoint."""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from botocore.client import BaseClient
from celery import Celery
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.constants import (
    REALTIME_PENDING_KEY,
    REALTIME_REPLY_KEY,
    REALTIME_REQUEST_KEY,
    REALTIME_WAKE_KEY,
)
from producer.fleet import live_workers
from producer.queue import make_celery
from producer.realtime import (
    EmbedTaskMessage,
    RealtimeInput,
    RealtimeReply,
    RealtimeRequest,
    decode_vectors,
    send_request,
    wait_reply,
    withdraw_request,
)
from producer.settings import Settings
from tests.support.servers import S3Server
from workers import metrics
from workers.app import consumed_queues, worker_config
from workers.classify import encode_images, encode_prompts
from workers.heartbeat import Heartbeat
from workers.pipeline import load_pixels
from workers.realtime import embed_pending
from workers.runtime import WorkerRuntime

DATA = Path(__file__).resolve().parents[1] / "data"
QUEUE = "realtime-under-test"
WORKER = "celery@test-host"
# The tiny checkpoint reads 224 px images in 32 px patches: 7 x 7 patches plus the class token.
IMAGE_TOKENS = 50
MAX_TEXT_TOKENS = 77
TOLERANCE = 1e-5
REPLY_WAIT_S = 5.0
PENDING_KEY = REALTIME_PENDING_KEY.format(queue=QUEUE)
WAKE_KEY = REALTIME_WAKE_KEY.format(queue=QUEUE)


@pytest.fixture
def make_runtime(redis_url: str, s3_server: S3Server, tiny_clip_dir: Path) -> Iterator[Callable[..., WorkerRuntime]]:
    """A function that builds a WorkerRuntime on the tiny checkpoint; keywords go to Settings."""
    runtimes: list[WorkerRuntime] = []

    def build(**overrides: Any) -> WorkerRuntime:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "s3_endpoint_url": s3_server.endpoint_url,
            "model": str(tiny_clip_dir),
            "fetch_threads": 4,
            "model_batch_size": 2,
            "device": "cpu",
            "dtype": "float32",
            "realtime_queue": QUEUE,
            **overrides,
        }
        runtime = WorkerRuntime(Settings(**values))
        runtimes.append(runtime)
        return runtime

    yield build
    for runtime in runtimes:
        runtime.pool.shutdown()
        runtime.store.redis.close()


@pytest.fixture
def runtime(make_runtime: Callable[..., WorkerRuntime]) -> WorkerRuntime:
    return make_runtime()


@pytest.fixture
def celery_app(redis_url: str) -> Iterator[Celery]:
    app = make_celery(Settings(redis_url=redis_url))
    yield app
    app.close()


@pytest.fixture
def photos(s3_client: BaseClient, make_bucket: Callable[[], str]) -> dict[str, str]:
    """Three photos in a new bucket: file name -> s3:// URI."""
    bucket = make_bucket()
    uris = {}
    for name in ("rocket.jpg", "astronaut.jpg", "chelsea.jpg"):
        s3_client.put_object(Bucket=bucket, Key=f"in/{name}", Body=(DATA / name).read_bytes())
        uris[name] = f"s3://{bucket}/in/{name}"
    return uris


def text(value: str) -> RealtimeInput:
    return RealtimeInput(kind="text", text=value)


def image_uri(uri: str) -> RealtimeInput:
    return RealtimeInput(kind="image", uri=uri)


def image_data(data: bytes) -> RealtimeInput:
    return RealtimeInput(kind="image", data=base64.b64encode(data).decode("ascii"))


def make_request(runtime: WorkerRuntime, inputs: list[RealtimeInput], model: str | None = None, deadline_s: float = 60.0) -> RealtimeRequest:
    return RealtimeRequest(
        request_id=uuid.uuid4().hex, model=model or runtime.settings.model, inputs=inputs, deadline=time.time() + deadline_s,
    )


def send(runtime: WorkerRuntime, celery_app: Celery, *requests: RealtimeRequest) -> None:
    for request in requests:
        send_request(runtime.store.redis, celery_app, QUEUE, request)


def reply_of(runtime: WorkerRuntime, request: RealtimeRequest, wait_s: float = REPLY_WAIT_S) -> RealtimeReply | None:
    return wait_reply(runtime.store.redis, request.request_id, time.time() + wait_s)


def embed(runtime: WorkerRuntime) -> int:
    return embed_pending(runtime, EmbedTaskMessage(queue=QUEUE), worker=WORKER)


def embed_and_wake(runtime: WorkerRuntime, celery_app: Celery) -> int:
    """Run one TASK_EMBED task as the Celery task does: take its message off the Celery list, then embed."""
    runtime.store.redis.delete(QUEUE)
    return embed_pending(runtime, EmbedTaskMessage(queue=QUEUE), worker=WORKER, celery=celery_app)


class CommandLog:
    """The commands that Redis runs while the `with` block runs, in order, as MONITOR reports them."""

    def __init__(self, redis_url: str) -> None:
        self.commands: list[str] = []
        self._client = redis.Redis.from_url(redis_url, socket_timeout=0.5)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)

    def __enter__(self) -> CommandLog:
        self._thread.start()
        assert self._ready.wait(5.0), "MONITOR did not start"
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(0.2)  # MONITOR reports each command after it ran
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._client.close()

    def _run(self) -> None:
        with self._client.monitor() as monitor:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    self.commands.append(monitor.next_command()["command"])
                except redis.exceptions.TimeoutError:
                    continue

    def first(self, name: str, key: str) -> int:
        """Return the position of the first command `name` on `key`."""
        found = [index for index, command in enumerate(self.commands) if command.split(" ")[:2] == [name, key]]
        assert found, f"no {name} {key} among {self.commands}"
        return found[0]


def vectors(reply: RealtimeReply, rows: int) -> np.ndarray:
    return decode_vectors(reply.embeddings, rows, reply.dim)


def loaded_model(runtime: WorkerRuntime) -> Any:
    return runtime.model(runtime.settings.model, runtime.settings.model_revision)


def expected_images(runtime: WorkerRuntime, uris: list[str]) -> np.ndarray:
    loaded = loaded_model(runtime)
    pixels = np.stack([load_pixels(runtime, loaded, uri) for uri in uris])
    return encode_images(loaded, pixels).numpy()


def test_texts_equal_encode_prompts(runtime: WorkerRuntime, celery_app: Celery) -> None:
    texts = ["a photo of a cat", "a rocket", "an astronaut on the moon riding a horse"]
    request = make_request(runtime, [text(value) for value in texts])
    send(runtime, celery_app, request)

    assert embed(runtime) == 1
    reply = reply_of(runtime, request)
    assert reply is not None
    assert reply.error is None
    expected = encode_prompts(loaded_model(runtime), texts).numpy()
    np.testing.assert_allclose(vectors(reply, 3), expected, atol=TOLERANCE)
    assert reply.dim == expected.shape[1]
    tokenizer = loaded_model(runtime).tokenizer
    assert reply.tokens == [len(tokenizer(value)["input_ids"]) for value in texts]
    assert reply.worker == WORKER
    assert reply.model == runtime.settings.model


def test_embeddings_l2_normalised(runtime: WorkerRuntime, celery_app: Celery, photos: dict[str, str]) -> None:
    request = make_request(runtime, [text("a cat"), image_uri(photos["rocket.jpg"])])
    send(runtime, celery_app, request)

    embed(runtime)
    reply = reply_of(runtime, request)
    assert reply is not None
    norms = np.linalg.norm(vectors(reply, 2), axis=1)
    np.testing.assert_allclose(norms, [1.0, 1.0], atol=TOLERANCE)


def test_s3_images_equal_encode_images(runtime: WorkerRuntime, celery_app: Celery, photos: dict[str, str]) -> None:
    uris = list(photos.values())
    request = make_request(runtime, [image_uri(uri) for uri in uris])
    send(runtime, celery_app, request)

    assert embed(runtime) == 1
    reply = reply_of(runtime, request)
    assert reply is not None
    assert reply.error is None
    np.testing.assert_allclose(vectors(reply, 3), expected_images(runtime, uris), atol=TOLERANCE)
    assert reply.tokens == [IMAGE_TOKENS] * 3


def test_base64_image_equals_s3_image(runtime: WorkerRuntime, celery_app: Celery, photos: dict[str, str]) -> None:
    request = make_request(runtime, [image_data((DATA / "chelsea.jpg").read_bytes())])
    send(runtime, celery_app, request)

    embed(runtime)
    reply = reply_of(runtime, request)
    assert reply is not None
    assert reply.error is None
    np.testing.assert_allclose(vectors(reply, 1), expected_images(runtime, [photos["chelsea.jpg"]]), atol=TOLERANCE)
    assert reply.tokens == [IMAGE_TOKENS]


def test_mixed_inputs_keep_order(runtime: WorkerRuntime, celery_app: Celery, photos: dict[str, str]) -> None:
    request = make_request(runtime, [text("a rocket"), image_uri(photos["rocket.jpg"]), text("a cat")])
    send(runtime, celery_app, request)

    embed(runtime)
    reply = reply_of(runtime, request)
    assert reply is not None
    rows = vectors(reply, 3)
    texts = encode_prompts(loaded_model(runtime), ["a rocket", "a cat"]).numpy()
    np.testing.assert_allclose(rows[[0, 2]], texts, atol=TOLERANCE)
    np.testing.assert_allclose(rows[1], expected_images(runtime, [photos["rocket.jpg"]])[0], atol=TOLERANCE)
    assert reply.tokens[1] == IMAGE_TOKENS


def test_one_call_answers_all_requests(runtime: WorkerRuntime, celery_app: Celery, photos: dict[str, str]) -> None:
    requests = [make_request(runtime, [text(f"photo number {number}"), image_uri(photos["astronaut.jpg"])]) for number in range(5)]
    send(runtime, celery_app, *requests)

    assert embed(runtime) == 5
    assert runtime.store.redis.llen(REALTIME_PENDING_KEY.format(queue=QUEUE)) == 0
    for request in requests:
        reply = reply_of(runtime, request)
        assert reply is not None, request.request_id
        assert reply.error is None, request.request_id
    assert embed(runtime) == 0


def test_batch_size_bounded_by_max_requests(make_runtime: Callable[..., WorkerRuntime], celery_app: Celery) -> None:
    runtime = make_runtime(realtime_max_requests=2)
    requests = [make_request(runtime, [text(f"text {number}")]) for number in range(3)]
    send(runtime, celery_app, *requests)

    assert embed(runtime) == 2
    assert embed(runtime) == 1
    assert embed(runtime) == 0


def test_request_behind_queued_wake_up_answered(runtime: WorkerRuntime, celery_app: Celery) -> None:
    # Only the first request sends a task; the task's pop takes every request pushed before it ran.
    requests = [make_request(runtime, [text(f"text {number}")]) for number in range(4)]
    send(runtime, celery_app, *requests)
    assert runtime.store.redis.llen(QUEUE) == 1

    assert embed_and_wake(runtime, celery_app) == 4
    for request in requests:
        assert reply_of(runtime, request) is not None, request.request_id
    assert runtime.store.redis.exists(WAKE_KEY) == 0
    assert runtime.store.redis.llen(QUEUE) == 0


def test_wake_key_deleted_before_pop(runtime: WorkerRuntime, celery_app: Celery, redis_url: str) -> None:
    send(runtime, celery_app, make_request(runtime, [text("a cat")]))

    with CommandLog(redis_url) as log:
        assert embed_and_wake(runtime, celery_app) == 1

    assert log.first("DEL", WAKE_KEY) < log.first("LPOP", PENDING_KEY)
    assert runtime.store.redis.exists(WAKE_KEY) == 0


def test_requests_left_get_one_more_wake_up(
    make_runtime: Callable[..., WorkerRuntime], celery_app: Celery, redis_url: str
) -> None:
    runtime = make_runtime(realtime_max_requests=2)
    requests = [make_request(runtime, [text(f"text {number}")]) for number in range(5)]
    send(runtime, celery_app, *requests)
    client = runtime.store.redis

    with CommandLog(redis_url) as log:
        assert embed_and_wake(runtime, celery_app) == 2
    # The next wake-up is sent before the model runs, so another process can take the rest meanwhile.
    first_reply = REALTIME_REPLY_KEY.format(request_id=requests[0].request_id)
    assert log.first("SET", WAKE_KEY) < log.first("RPUSH", first_reply)
    assert client.llen(QUEUE) == 1
    assert client.llen(PENDING_KEY) == 3

    assert embed_and_wake(runtime, celery_app) == 2
    assert client.llen(QUEUE) == 1
    assert embed_and_wake(runtime, celery_app) == 1
    assert client.llen(QUEUE) == 0
    assert client.exists(WAKE_KEY) == 0
    for request in requests:
        assert reply_of(runtime, request) is not None, request.request_id


def test_wait_reply_rearms_lost_wake_up(runtime: WorkerRuntime, celery_app: Celery) -> None:
    """A request whose wake-up task was lost still gets its reply: its sender queues another task."""
    client = runtime.store.redis
    stop = threading.Event()
    replied: list[int] = []

    def work() -> None:
        # A worker's loop: take each task off the Celery list and run it.
        worker_client = redis.Redis.from_url(runtime.settings.redis_url, socket_timeout=5.0)
        while not stop.is_set():
            if worker_client.blpop([QUEUE], timeout=0.2) is not None:
                replied.append(embed_pending(runtime, EmbedTaskMessage(queue=QUEUE), worker=WORKER, celery=celery_app))
        worker_client.close()

    request = make_request(runtime, [text("a cat")])
    send(runtime, celery_app, request)
    client.delete(QUEUE, WAKE_KEY)  # the task was lost and its wake key expired
    thread = threading.Thread(target=work, name="test-worker", daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        reply = wait_reply(client, request.request_id, time.time() + 30.0, celery=celery_app, queue=QUEUE)
        elapsed_s = time.monotonic() - started
    finally:
        stop.set()
        thread.join(timeout=30.0)

    assert reply is not None
    assert reply.error is None
    assert replied == [1]
    assert elapsed_s < 15.0  # one WAIT_STEP_S, then the tiny model, far from the 30 s deadline


def test_expired_request_skipped(runtime: WorkerRuntime, celery_app: Celery) -> None:
    request = make_request(runtime, [text("too late")], deadline_s=-1.0)
    send(runtime, celery_app, request)

    assert embed(runtime) == 0
    assert reply_of(runtime, request, wait_s=0.2) is None
    assert runtime.store.redis.exists(REALTIME_REQUEST_KEY.format(request_id=request.request_id)) == 0


def test_withdrawn_request_skipped(runtime: WorkerRuntime, celery_app: Celery) -> None:
    withdrawn = make_request(runtime, [text("nobody waits")])
    body_expired = make_request(runtime, [text("body gone")])
    send(runtime, celery_app, withdrawn, body_expired)
    withdraw_request(runtime.store.redis, QUEUE, withdrawn.request_id)
    runtime.store.redis.delete(REALTIME_REQUEST_KEY.format(request_id=body_expired.request_id))

    assert embed(runtime) == 0
    assert reply_of(runtime, withdrawn, wait_s=0.2) is None
    assert reply_of(runtime, body_expired, wait_s=0.2) is None


def test_other_model_not_served(runtime: WorkerRuntime, celery_app: Celery) -> None:
    request = make_request(runtime, [text("a cat")], model="openai/some-other-clip")
    send(runtime, celery_app, request)

    assert embed(runtime) == 1
    reply = reply_of(runtime, request)
    assert reply is not None
    assert reply.error is not None
    assert reply.error.code == "model_not_served"
    assert reply.error.status == 503
    assert "openai/some-other-clip" in reply.error.message
    assert reply.embeddings == ""


def test_text_too_long_rejected(runtime: WorkerRuntime, celery_app: Celery) -> None:
    # The tiny tokenizer has no merges, so every character is one token.
    long_text = "x" * 100
    request = make_request(runtime, [text("short"), text(long_text)])
    send(runtime, celery_app, request)

    embed(runtime)
    reply = reply_of(runtime, request)
    assert reply is not None
    assert reply.error is not None
    assert reply.error.code == "text_too_long"
    assert reply.error.index == 1
    assert reply.error.status == 400
    assert "102 tokens" in reply.error.message
    assert str(MAX_TEXT_TOKENS) in reply.error.message


@pytest.mark.parametrize(
    ("make_input", "code"),
    [
        (lambda photos: image_uri(photos["rocket.jpg"].replace("rocket", "missing")), "not_found"),
        (lambda photos: image_data(b"\xff\xd8\xff\xe0 this is not a JPEG"), "decode_error"),
        (lambda photos: RealtimeInput(kind="image", data="not base64!"), "invalid_input"),
        (lambda photos: image_uri("https://example.com/cat.jpg"), "access_denied"),
        (lambda photos: image_uri("/etc/passwd"), "access_denied"),
    ],
    ids=["not_found", "decode_error", "invalid_base64", "http_uri", "local_path"],
)
def test_bad_image_fails_request(
    runtime: WorkerRuntime, celery_app: Celery, photos: dict[str, str], make_input: Callable[[dict[str, str]], RealtimeInput], code: str
) -> None:
    request = make_request(runtime, [text("a cat"), image_uri(photos["chelsea.jpg"]), make_input(photos)])
    send(runtime, celery_app, request)

    assert embed(runtime) == 1
    reply = reply_of(runtime, request)
    assert reply is not None
    assert reply.error is not None
    assert reply.error.code == code
    assert reply.error.index == 2
    assert reply.error.status == 400
    assert reply.embeddings == ""


def test_bucket_outside_allowed_buckets(make_runtime: Callable[..., WorkerRuntime], celery_app: Celery, photos: dict[str, str]) -> None:
    runtime = make_runtime(allowed_buckets=["some-other-bucket"])
    request = make_request(runtime, [image_uri(photos["rocket.jpg"])])
    send(runtime, celery_app, request)

    embed(runtime)
    reply = reply_of(runtime, request)
    assert reply is not None
    assert reply.error is not None
    assert reply.error.code == "access_denied"
    assert reply.error.status == 400
    assert "CLIPFLEET_ALLOWED_BUCKETS" in reply.error.message


def test_base64_image_too_large(make_runtime: Callable[..., WorkerRuntime], celery_app: Celery) -> None:
    runtime = make_runtime(max_image_bytes=1000)
    request = make_request(runtime, [image_data((DATA / "rocket.jpg").read_bytes())])
    send(runtime, celery_app, request)

    embed(runtime)
    reply = reply_of(runtime, request)
    assert reply is not None
    assert reply.error is not None
    assert reply.error.code == "too_large"
    assert "CLIPFLEET_MAX_IMAGE_BYTES=1000" in reply.error.message


def test_bad_request_spares_others(runtime: WorkerRuntime, celery_app: Celery, photos: dict[str, str]) -> None:
    good_text = make_request(runtime, [text("a cat")])
    bad_image = make_request(runtime, [image_uri(photos["rocket.jpg"].replace("rocket", "missing"))])
    good_image = make_request(runtime, [image_uri(photos["astronaut.jpg"])])
    other_model = make_request(runtime, [text("a dog")], model="another-model")
    send(runtime, celery_app, good_text, bad_image, good_image, other_model)

    assert embed(runtime) == 4
    replies = {request.request_id: reply_of(runtime, request) for request in (good_text, bad_image, good_image, other_model)}
    assert replies[good_text.request_id].error is None
    assert replies[bad_image.request_id].error.code == "not_found"
    assert replies[good_image.request_id].error is None
    assert replies[other_model.request_id].error.code == "model_not_served"
    np.testing.assert_allclose(
        vectors(replies[good_image.request_id], 1), expected_images(runtime, [photos["astronaut.jpg"]]), atol=TOLERANCE
    )


def test_metrics_count_outcomes(
    runtime: WorkerRuntime, celery_app: Celery, photos: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", metrics.WorkerMetrics(registry))
    good = make_request(runtime, [text("a cat")])
    bad = make_request(runtime, [image_uri(photos["rocket.jpg"].replace("rocket", "missing"))])
    expired = make_request(runtime, [text("too late")], deadline_s=-1.0)
    send(runtime, celery_app, good, bad, expired)

    assert embed(runtime) == 2
    for outcome, count in {"succeeded": 1, "failed": 1, "expired": 1, "withdrawn": 0}.items():
        assert registry.get_sample_value("clipfleet_realtime_requests_total", {"outcome": outcome}) == count, outcome
    assert registry.get_sample_value("clipfleet_realtime_requests_per_call_count") == 1
    assert registry.get_sample_value("clipfleet_realtime_requests_per_call_sum") == 2


def test_invalid_stored_request_answered(runtime: WorkerRuntime) -> None:
    client = runtime.store.redis
    client.set(REALTIME_REQUEST_KEY.format(request_id="broken"), b'{"request_id": "broken"}')
    client.rpush(REALTIME_PENDING_KEY.format(queue=QUEUE), "broken")

    assert embed(runtime) == 1
    reply = wait_reply(client, "broken", time.time() + REPLY_WAIT_S)
    assert reply is not None
    assert reply.error is not None
    assert reply.error.code == "internal_error"
    assert reply.error.status == 500


def test_model_failure_replies_internal_error(make_runtime: Callable[..., WorkerRuntime], celery_app: Celery, tmp_path: Path) -> None:
    runtime = make_runtime(model=str(tmp_path / "no-such-model"))
    requests = [make_request(runtime, [text("a cat")]) for _ in range(2)]
    send(runtime, celery_app, *requests)

    assert embed(runtime) == 2
    for request in requests:
        reply = reply_of(runtime, request)
        assert reply is not None, request.request_id
        assert reply.error is not None, request.request_id
        assert reply.error.code == "internal_error"
        assert reply.error.status == 500
        assert "no-such-model" in reply.error.message


def test_other_queue_message_dropped(runtime: WorkerRuntime, celery_app: Celery) -> None:
    request = make_request(runtime, [text("a cat")])
    send(runtime, celery_app, request)

    assert embed_pending(runtime, EmbedTaskMessage(queue="another-queue")) == 0
    assert runtime.store.redis.llen(REALTIME_PENDING_KEY.format(queue=QUEUE)) == 1


def test_realtime_queue_consumed_first() -> None:
    assert consumed_queues(Settings(realtime_queue="rt", queue="batch")) == ["rt", "batch"]
    assert consumed_queues(Settings(realtime_queue="", queue="batch")) == ["batch"]
    assert consumed_queues(Settings(realtime_queue="same", queue="same")) == ["same"]


def test_realtime_only_skips_batch_queue() -> None:
    assert consumed_queues(Settings(realtime_queue="rt", queue="batch", realtime_only=True)) == ["rt"]


def test_realtime_only_needs_realtime_queue() -> None:
    with pytest.raises(ValueError, match="CLIPFLEET_REALTIME_QUEUE is empty"):
        Settings(realtime_queue="", realtime_only=True)


def test_realtime_only_worker_announces_no_batch_queue(redis_url: str, redis_client: redis.Redis) -> None:
    settings = Settings(redis_url=redis_url, model="tiny-model", realtime_queue="rt", queue="batch", realtime_only=True)
    heartbeat = Heartbeat(redis_client, WORKER, settings, lambda: True)

    heartbeat.beat()
    workers = live_workers(redis_client)
    assert (workers[0].queue, workers[0].realtime_queue) == ("", "rt")
    heartbeat.stop()


def test_worker_polls_queues_in_order() -> None:
    options = worker_config(Settings())["broker_transport_options"]
    assert options["queue_order_strategy"] == "priority"


def test_heartbeat_announces_when_ready(redis_url: str, redis_client: redis.Redis) -> None:
    ready = {"value": False}
    settings = Settings(redis_url=redis_url, model="tiny-model", realtime_queue="rt", queue="batch")
    heartbeat = Heartbeat(redis_client, WORKER, settings, lambda: ready["value"])

    heartbeat.beat()
    assert live_workers(redis_client) == []
    ready["value"] = True
    heartbeat.beat()
    workers = live_workers(redis_client)
    assert [worker.name for worker in workers] == [WORKER]
    assert (workers[0].model, workers[0].queue, workers[0].realtime_queue) == ("tiny-model", "batch", "rt")
    heartbeat.stop()
    assert live_workers(redis_client) == []


def test_heartbeat_survives_redis_outage(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # No test server listens on port 1: they all take ephemeral ports.
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    heartbeat = Heartbeat(unreachable, WORKER, Settings(redis_url=redis_url), lambda: True)

    with caplog.at_level(logging.WARNING, logger="workers.heartbeat"):
        heartbeat.beat()
    assert heartbeat.announced is False
    assert "could not refresh its registry entry" in caplog.text
    heartbeat.stop()
