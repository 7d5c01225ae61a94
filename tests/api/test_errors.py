"""Error responses of a live `clipfleet serve` process, seen through the official openai SDK.

Each test asserts the HTTP status and OpenAI's error body (type, code, param, message). Tests of the API layer
alone register a worker entry in Redis and reply to the requests of its realtime queue from a thread of the test
(FakeWorker). tests/api/test_embeddings.py runs a real worker.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis

from producer.api.app import create_app
from producer.constants import REALTIME_PENDING_KEY, REALTIME_REQUEST_KEY
from producer.fleet import WorkerInfo, announce, withdraw
from producer.realtime import (
    RealtimeError,
    RealtimeReply,
    RealtimeRequest,
    encode_vectors,
    push_reply,
)
from producer.settings import Settings
from tests.support.api_server import ApiServer, start_api_server
from tests.support.servers import RedisServer

MODEL = "fake/model-a"
QUEUE = "rt-fake"
FAKE_DIM = 8
ALLOWED_BUCKET = "allowed-bucket"
MAX_IMAGE_BYTES = 3000
MAX_REQUEST_BYTES = 20_000
MAX_INPUTS = 4
HIGH_WATER = 2
TIMEOUT_S = 2
KEYS = ("key-one", "key-two")
REPLY_WAIT_S = 15.0

SETTINGS = {
    "CLIPFLEET_API_MAX_INPUTS": str(MAX_INPUTS),
    "CLIPFLEET_ALLOWED_BUCKETS": ALLOWED_BUCKET,
    "CLIPFLEET_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
    "CLIPFLEET_API_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
    "CLIPFLEET_API_QUEUE_HIGH_WATER": str(HIGH_WATER),
    "CLIPFLEET_API_TIMEOUT_S": str(TIMEOUT_S),
}


def fake_vectors(request: RealtimeRequest) -> np.ndarray:
    """Return `[inputs, FAKE_DIM]` vectors whose row i is filled with i + 0.5."""
    return np.repeat(np.arange(len(request.inputs), dtype=np.float32)[:, None] + 0.5, FAKE_DIM, axis=1)


def echo_reply(request: RealtimeRequest) -> RealtimeReply:
    return RealtimeReply(
        request_id=request.request_id, model=request.model, worker="fake", dim=FAKE_DIM,
        embeddings=encode_vectors(fake_vectors(request)), tokens=[3] * len(request.inputs),
    )


def worker_info(model: str = MODEL, queue: str = QUEUE) -> WorkerInfo:
    now = time.time()
    return WorkerInfo(
        name=f"fake-{uuid.uuid4().hex[:8]}@test", model=model, revision="", queue="clipfleet",
        realtime_queue=queue, started_at=now, heartbeat_at=now,
    )


class FakeWorker:
    """A registry entry plus a thread that replies to the requests of its realtime queue with `answer(request)`.

    The thread waits until `min_pending` requests are pending, then replies to every pending one. It also empties the
    Celery queue list, which no Celery worker reads here, so wake-up tasks do not pile up between tests.
    """

    def __init__(
        self, redis_url: str, answer: Callable[[RealtimeRequest], RealtimeReply] = echo_reply, min_pending: int = 1
    ) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
        self.info = worker_info()
        self.answer = answer
        self.min_pending = min_pending
        self.requests: list[RealtimeRequest] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-worker", daemon=True)

    def __enter__(self) -> FakeWorker:
        announce(self.client, self.info, ttl_s=300)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        withdraw(self.client, self.info.name)
        self.client.close()

    def _run(self) -> None:
        pending_key = REALTIME_PENDING_KEY.format(queue=QUEUE)
        while not self._stop.wait(0.02):
            self.client.delete(QUEUE)
            if self.client.llen(pending_key) < self.min_pending:
                continue
            for request_id in self.client.lpop(pending_key, 10_000) or []:
                body = self.client.getdel(REALTIME_REQUEST_KEY.format(request_id=request_id.decode()))
                if body is not None:
                    request = RealtimeRequest.model_validate_json(body)
                    self.requests.append(request)
                    push_reply(self.client, self.answer(request))


@pytest.fixture(scope="module")
def server(start_api: Callable[..., ApiServer]) -> ApiServer:
    return start_api(**SETTINGS)


@pytest.fixture
def client(server: ApiServer, redis_url: str, make_openai: Callable[..., openai.OpenAI]) -> openai.OpenAI:
    """An SDK client of the module's server, with Redis emptied before the test."""
    return make_openai(server)


@pytest.fixture
def fake_worker(redis_url: str) -> Iterator[FakeWorker]:
    with FakeWorker(redis_url) as worker:
        yield worker


def error_of(call: Callable[[], Any], error_class: type[openai.APIStatusError]) -> openai.APIStatusError:
    """Return the error `call` raises, which must be an `error_class`."""
    with pytest.raises(error_class) as caught:
        call()
    return caught.value


def message_of(error: openai.APIStatusError) -> str:
    assert isinstance(error.body, dict), error.body
    return str(error.body["message"])


def png_bytes(size_bytes: int) -> bytes:
    """Return `size_bytes` bytes that start like a PNG file; the API checks only their size and base64."""
    return (b"\x89PNG\r\n\x1a\n" + bytes(size_bytes))[:size_bytes]


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# (input, the text the message must contain); every one is a 400 invalid_input with param "input".
INVALID_INPUTS = [
    ([1, 2, 3], "token array"),
    ([[1, 2], [3]], "token array"),
    ("", "input[0] is an empty string"),
    (["a cat", ""], "input[1] is an empty string"),
    ([], "empty list"),
    (["a cat", 3], "input[1] is a number"),
    (["a cat", None], "input[1] is null"),
    ({"text": "a cat"}, "not an object"),
    (["a"] * (MAX_INPUTS + 1), f"more than CLIPFLEET_API_MAX_INPUTS={MAX_INPUTS}"),
    ("s3://Bad_Bucket/a.jpg", "invalid bucket name"),
    ("s3://other-bucket/a.jpg", "not in CLIPFLEET_ALLOWED_BUCKETS"),
    ("data:image/png,abcd", "not a base64 data URI"),
    ("data:image/png;base64,@@@@", "invalid base64"),
    ("data:image/png;base64,", "without image data"),
    (f"s3://{ALLOWED_BUCKET}/", f"input[0] 's3://{ALLOWED_BUCKET}/': the URI names no object key"),
    ("data:text/plain;base64,aGVsbG8=", "only data:image/ URIs are images; send text as plain strings"),
    ("data:,hello", "only data:image/ URIs are images"),
]


@pytest.mark.parametrize(("value", "expected"), INVALID_INPUTS)
def test_invalid_input_rejected(client: openai.OpenAI, fake_worker: FakeWorker, value: Any, expected: str) -> None:
    error = error_of(lambda: client.embeddings.create(model=MODEL, input=value), openai.BadRequestError)

    assert error.status_code == 400
    assert error.type == "invalid_request_error"
    assert error.code == "invalid_input"
    assert error.param == "input"
    assert expected in message_of(error)
    assert fake_worker.requests == []


# (extra body fields, the parameter named in the error)
INVALID_FIELDS = [
    ({"encoding_format": "hex"}, "encoding_format"),
    ({"dimensions": 0}, "dimensions"),
    ({"temperature": 1}, "temperature"),
    ({"model": ""}, "model"),
]


@pytest.mark.parametrize(("fields", "param"), INVALID_FIELDS)
def test_invalid_field_rejected(client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    error = error_of(lambda: client.embeddings.create(model=MODEL, input="a cat", extra_body=fields), openai.BadRequestError)

    assert error.status_code == 400
    assert error.type == "invalid_request_error"
    assert error.param == param
    assert message_of(error).startswith(f"{param}: ")


def test_malformed_json_is_invalid_json(server: ApiServer) -> None:
    response = httpx.post(
        server.base_url + "/embeddings", content=b'{"model": "tiny", "input": ', headers={"Content-Type": "application/json"}, timeout=10,
    )

    error = response.json()["error"]
    assert response.status_code == 400
    assert (error["code"], error["param"], error["type"]) == ("invalid_json", None, "invalid_request_error")
    assert "the request body is not valid JSON" in error["message"]
    assert "at byte 27" in error["message"]
    assert "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize(
    ("content", "headers"),
    [(b"[1, 2]", {"Content-Type": "application/json"}), (b'{"model": "m", "input": "a cat"}', {"Content-Type": ""})],
    ids=["array", "no-content-type"],
)
def test_non_object_body_rejected(server: ApiServer, content: bytes, headers: dict[str, str]) -> None:
    response = httpx.post(server.base_url + "/embeddings", content=content, headers=headers, timeout=10)

    error = response.json()["error"]
    assert response.status_code == 400
    assert error["param"] is None
    assert error["message"].startswith("the request body must be a JSON object")
    assert "Content-Type: application/json" in error["message"]


def test_batch_metadata_error_has_code(server: ApiServer) -> None:
    metadata = {f"key{index}": "value" for index in range(17)}
    body = {"input_file_id": "file-abc", "endpoint": "/v1/embeddings", "completion_window": "24h", "metadata": metadata}
    response = httpx.post(server.base_url + "/batches", json=body, timeout=10)

    error = response.json()["error"]
    assert response.status_code == 400
    assert (error["code"], error["param"]) == ("invalid_metadata", "metadata")
    assert "metadata has 17 keys" in error["message"]


def test_missing_input_rejected(server: ApiServer, redis_url: str) -> None:
    response = httpx.post(server.base_url + "/embeddings", json={"model": MODEL}, timeout=10)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_body_over_limit_is_413(client: openai.OpenAI) -> None:
    text = "a" * (MAX_REQUEST_BYTES + 1)

    error = error_of(lambda: client.embeddings.create(model=MODEL, input=text), openai.APIStatusError)

    assert error.status_code == 413
    assert error.type == "invalid_request_error"
    assert error.code == "request_too_large"
    assert f"over the limit of {MAX_REQUEST_BYTES} bytes" in message_of(error)


def test_chunked_body_over_limit_is_413(server: ApiServer, fake_worker: FakeWorker) -> None:
    # A generator body goes out with Transfer-Encoding: chunked and no Content-Length.
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "' + MODEL.encode() + b'", "input": "'
        for _ in range(MAX_REQUEST_BYTES // 1000 + 1):
            yield b"a" * 1000
        yield b'"}'

    response = httpx.post(server.base_url + "/embeddings", content=chunks(), headers={"Content-Type": "application/json"}, timeout=10)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert f"over the limit of {MAX_REQUEST_BYTES} bytes" in response.json()["error"]["message"]
    assert fake_worker.requests == []


def test_data_uri_image_over_limit_is_413(client: openai.OpenAI, fake_worker: FakeWorker) -> None:
    value = data_uri(png_bytes(MAX_IMAGE_BYTES + 1))

    error = error_of(lambda: client.embeddings.create(model=MODEL, input=["a cat", value]), openai.APIStatusError)

    assert error.status_code == 413
    assert error.code == "too_large"
    assert error.param == "input"
    assert f"input[1] is an image of {MAX_IMAGE_BYTES + 1} bytes" in message_of(error)
    assert fake_worker.requests == []


def test_data_uri_image_at_limit_is_sent(client: openai.OpenAI, fake_worker: FakeWorker) -> None:
    value = data_uri(png_bytes(MAX_IMAGE_BYTES))

    result = client.embeddings.create(model=MODEL, input=[value, "s3://allowed-bucket/a b.jpg"], encoding_format="float")

    assert len(result.data) == 2
    sent = fake_worker.requests[0].inputs
    assert sent[0].kind == "image"
    assert base64.b64decode(sent[0].data or "") == png_bytes(MAX_IMAGE_BYTES)
    assert sent[1].uri == "s3://allowed-bucket/a b.jpg"


def test_unknown_model_is_404(client: openai.OpenAI, fake_worker: FakeWorker) -> None:
    error = error_of(lambda: client.models.retrieve("no-such-model"), openai.NotFoundError)

    assert error.status_code == 404
    assert error.type == "not_found_error"
    assert error.code == "model_not_found"
    assert "'no-such-model' is not served" in message_of(error)
    assert repr(MODEL) in message_of(error)


def test_unknown_route_is_404(client: openai.OpenAI) -> None:
    error = error_of(lambda: client.get("/no/such/route", cast_to=object), openai.NotFoundError)

    assert error.status_code == 404
    assert error.type == "not_found_error"
    assert message_of(error).startswith("no route GET /v1/no/such/route")


def test_no_worker_is_503(client: openai.OpenAI) -> None:
    error = error_of(lambda: client.embeddings.create(model=MODEL, input="a cat"), openai.InternalServerError)

    assert error.status_code == 503
    assert error.type == "server_error"
    assert error.code == "model_not_served"
    assert error.param == "model"
    assert f"model {MODEL!r} is not served by any live worker" in message_of(error)
    assert "no live worker serves realtime requests" in message_of(error)


def test_other_model_is_503_naming_served(client: openai.OpenAI, fake_worker: FakeWorker) -> None:
    error = error_of(lambda: client.embeddings.create(model="other/model", input="a cat"), openai.InternalServerError)

    assert error.status_code == 503
    assert error.code == "model_not_served"
    assert f"the served models are {MODEL!r}" in message_of(error)


def test_queue_over_high_water_is_429(client: openai.OpenAI, redis_client: redis.Redis) -> None:
    pending_key = REALTIME_PENDING_KEY.format(queue=QUEUE)
    announce(redis_client, worker_info(), ttl_s=300)
    redis_client.rpush(pending_key, *[f"waiting-{index}" for index in range(HIGH_WATER)])

    error = error_of(lambda: client.embeddings.create(model=MODEL, input="a cat"), openai.RateLimitError)

    assert error.status_code == 429
    assert error.type == "rate_limit_error"
    assert error.code == "queue_full"
    assert error.response.headers["retry-after"] == "1"
    assert f"holds {HIGH_WATER} waiting requests" in message_of(error)
    assert redis_client.llen(pending_key) == HIGH_WATER
    assert redis_client.llen(QUEUE) == 0


def test_queued_tasks_alone_not_429(client: openai.OpenAI, redis_client: redis.Redis) -> None:
    # Celery tasks in the queue's list are wake-ups, not requests: only waiting requests count toward the mark.
    pending_key = REALTIME_PENDING_KEY.format(queue=QUEUE)
    queued_tasks = HIGH_WATER * 10
    announce(redis_client, worker_info(), ttl_s=300)
    redis_client.rpush(QUEUE, *[f"queued-{index}" for index in range(queued_tasks)])

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.embeddings.create, model=MODEL, input="a cat", encoding_format="float")
        popped = redis_client.blpop([pending_key], timeout=4)  # below the client's socket timeout of 5 s
        assert popped is not None, "the request was not queued"
        body = redis_client.getdel(REALTIME_REQUEST_KEY.format(request_id=popped[1].decode()))
        assert body is not None
        push_reply(redis_client, echo_reply(RealtimeRequest.model_validate_json(body)))
        result = future.result(timeout=REPLY_WAIT_S)

    assert [item.embedding[0] for item in result.data] == [0.5]
    assert redis_client.llen(QUEUE) == queued_tasks + 1  # the request's own wake-up


def test_no_reply_is_504_and_withdrawn(client: openai.OpenAI, redis_client: redis.Redis) -> None:
    announce(redis_client, worker_info(), ttl_s=300)

    started = time.monotonic()
    error = error_of(lambda: client.embeddings.create(model=MODEL, input="a cat"), openai.InternalServerError)
    elapsed_s = time.monotonic() - started

    assert error.status_code == 504
    assert error.code == "timeout"
    assert f"CLIPFLEET_API_TIMEOUT_S={TIMEOUT_S} s" in message_of(error)
    assert TIMEOUT_S <= elapsed_s < TIMEOUT_S + 5
    assert redis_client.llen(REALTIME_PENDING_KEY.format(queue=QUEUE)) == 0
    assert redis_client.keys(REALTIME_REQUEST_KEY.format(request_id="*")) == []
    assert redis_client.llen(QUEUE) == 1  # the task stays, and a worker that takes it finds nothing to do


def test_worker_error_mapped(client: openai.OpenAI, redis_url: str) -> None:
    def fail(request: RealtimeRequest) -> RealtimeReply:
        error = RealtimeError(index=1, code="not_found", message="input[1]: s3://allowed-bucket/x.jpg does not exist")
        return RealtimeReply(request_id=request.request_id, model=request.model, error=error)

    with FakeWorker(redis_url, answer=fail):
        error = error_of(
            lambda: client.embeddings.create(model=MODEL, input=["a cat", "s3://allowed-bucket/x.jpg"]), openai.BadRequestError
        )

    assert error.status_code == 400
    assert error.code == "not_found"
    assert error.param == "input"
    assert message_of(error) == "input[1]: s3://allowed-bucket/x.jpg does not exist"


def test_malformed_reply_is_500(client: openai.OpenAI, redis_url: str) -> None:
    def short(request: RealtimeRequest) -> RealtimeReply:
        return echo_reply(request).model_copy(update={"tokens": []})

    with FakeWorker(redis_url, answer=short):
        error = error_of(lambda: client.embeddings.create(model=MODEL, input="a cat"), openai.InternalServerError)

    assert error.status_code == 500
    assert error.code == "server_error"
    assert "0 token counts for 1 inputs" in message_of(error)


def test_dimensions_must_match(client: openai.OpenAI, fake_worker: FakeWorker) -> None:
    error = error_of(lambda: client.embeddings.create(model=MODEL, input="a cat", dimensions=FAKE_DIM // 2), openai.BadRequestError)
    matching = client.embeddings.create(model=MODEL, input="a cat", dimensions=FAKE_DIM, encoding_format="float")

    assert error.code == "invalid_dimensions"
    assert error.param == "dimensions"
    assert f"returns {FAKE_DIM}-dimensional embeddings" in message_of(error)
    assert len(matching.data[0].embedding) == FAKE_DIM


def test_short_model_name_routes(client: openai.OpenAI, fake_worker: FakeWorker) -> None:
    result = client.embeddings.create(model="model-a", input=["a", "b"], encoding_format="float")

    assert result.model == "model-a"
    assert fake_worker.requests[0].model == MODEL  # the worker's CLIPFLEET_MODEL, not the short name
    assert [item.embedding for item in result.data] == [[0.5] * FAKE_DIM, [1.5] * FAKE_DIM]
    assert result.usage.prompt_tokens == 6
    assert result.usage.total_tokens == 6


def test_models_listed(client: openai.OpenAI, fake_worker: FakeWorker, redis_client: redis.Redis) -> None:
    announce(redis_client, worker_info(model="fake/batch-only", queue=""), ttl_s=300)

    listed = client.models.list()
    model = client.models.retrieve(MODEL)
    by_short_name = client.models.retrieve("model-a")

    assert [item.id for item in listed.data] == [MODEL]
    assert listed.data[0].owned_by == "clipfleet"
    assert listed.data[0].object == "model"
    assert listed.data[0].created == int(fake_worker.info.started_at)
    assert model.id == MODEL
    assert by_short_name.id == MODEL


def test_concurrent_requests_beyond_default_threads(
    start_api: Callable[..., ApiServer], redis_url: str, make_openai: Callable[..., openai.OpenAI]
) -> None:
    """48 requests wait at once, more than anyio's default of 40 threads: each must get its reply."""
    requests = 48
    server = start_api(CLIPFLEET_API_TIMEOUT_S=str(REPLY_WAIT_S))
    sdk = make_openai(server)
    with FakeWorker(redis_url, min_pending=requests) as worker:
        with ThreadPoolExecutor(requests) as pool:
            texts = [f"text {index}" for index in range(requests)]
            results = list(pool.map(lambda text: sdk.embeddings.create(model=MODEL, input=[text, text], encoding_format="float"), texts))

    assert len(worker.requests) == requests
    assert sorted(request.inputs[0].text or "" for request in worker.requests) == sorted(texts)
    for result in results:
        assert [item.embedding[0] for item in result.data] == [0.5, 1.5]


def test_api_keys_checked(start_api: Callable[..., ApiServer], redis_url: str, make_openai: Callable[..., openai.OpenAI]) -> None:
    server = start_api(CLIPFLEET_API_KEYS=",".join(KEYS))
    missing = httpx.get(server.base_url + "/models", timeout=10)
    error = error_of(make_openai(server, api_key="wrong-key").models.list, openai.AuthenticationError)
    listed = make_openai(server, api_key=KEYS[1]).models.list()
    public = httpx.get(server.url + "/openapi.json", timeout=10)

    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert "missing API key" in missing.json()["error"]["message"]
    assert error.status_code == 401
    assert error.code == "invalid_api_key"
    assert "incorrect API key" in message_of(error)
    assert "wrong-key" not in message_of(error)
    assert listed.data == []
    assert public.status_code == 200


def test_api_key_not_logged(start_api: Callable[..., ApiServer], redis_url: str, make_openai: Callable[..., openai.OpenAI]) -> None:
    server = start_api(CLIPFLEET_API_KEYS=KEYS[0])
    make_openai(server, api_key=KEYS[0]).models.list()
    error_of(make_openai(server, api_key="secret-wrong-key").models.list, openai.AuthenticationError)
    log = server.process.log_path.read_text(errors="replace")

    assert '"GET /v1/models HTTP/1.1" 200' in log
    assert '"GET /v1/models HTTP/1.1" 401' in log
    assert KEYS[0] not in log
    assert "secret-wrong-key" not in log


def test_redis_down_is_503(tmp_path: Path, make_openai: Callable[..., openai.OpenAI]) -> None:
    with RedisServer() as private_redis:
        server = start_api_server(tmp_path, private_redis.url)
        try:
            sdk = make_openai(server)
            listed_before = sdk.models.list()
            private_redis.stop()
            started = time.monotonic()
            models_error = error_of(sdk.models.list, openai.InternalServerError)
            embeddings_error = error_of(lambda: sdk.embeddings.create(model=MODEL, input="a cat"), openai.InternalServerError)
            elapsed_s = time.monotonic() - started
        finally:
            server.stop()

    assert listed_before.data == []

    for error in (models_error, embeddings_error):
        assert error.status_code == 503
        assert error.type == "server_error"
        assert error.code == "redis_unavailable"
        assert "cannot reach Redis" in message_of(error)
    assert elapsed_s < 20


def test_openapi_lists_every_route(client: openai.OpenAI, server: ApiServer, redis_url: str) -> None:
    app = create_app(Settings(redis_url=redis_url))
    routes = {(route.path, method) for route in app.routes if getattr(route, "include_in_schema", False) for method in route.methods}

    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    listed = {(path, method.upper()) for path, operations in schema["paths"].items() for method in operations}

    assert routes <= listed
    assert {("/v1/models", "GET"), ("/v1/models/{model_id}", "GET"), ("/v1/embeddings", "POST")} <= listed
    responses = {(path, method.upper()): set(operation["responses"]) for path, operations in schema["paths"].items() for method, operation in operations.items()}
    assert [route for route, statuses in responses.items() if "422" in statuses] == []
    assert [route for route, statuses in responses.items() if route[0].startswith("/v1/") and "401" not in statuses] == []
    assert {"400", "413", "500", "503"} <= responses[("/v1/files", "POST")]
    assert {"404", "409"} <= responses[("/v1/batches/{batch_id}/cancel", "POST")]
    assert "404" in responses[("/v1/files/{file_id}/content", "GET")]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    description = schema["paths"]["/v1/embeddings"]["post"]["description"]
    assert "s3://bucket/key" in description
    assert "data:text/plain" in description
    assert "data:image/" in description
    assert "Token arrays" in description


def test_openapi_describes_batch_lines(server: ApiServer) -> None:
    components = httpx.get(server.url + "/openapi.json", timeout=10).json()["components"]["schemas"]

    assert {"BatchRequestLine", "ClassificationRequest", "ClassificationResult", "TopKEntry", "RowError"} <= set(components)
    assert {"model", "input", "labels", "templates", "top_k"} <= set(components["ClassificationRequest"]["properties"])
    assert components["ClassificationResult"]["required"] == ["uri", "label", "score", "top_k", "error"]


def test_api_server_loads_no_model_code() -> None:
    # The server process must stay light: no torch or transformers behind the app or the serve command.
    code = (
        "import sys; from producer.api.app import create_app; from producer.settings import Settings; "
        "create_app(Settings(redis_url='redis://127.0.0.1:1/0')); import producer.cli; "
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_serve_without_redis_url_exits_2(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if name != "CLIPFLEET_REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "serve", "--port", "1"], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 2
    assert "CLIPFLEET_REDIS_URL is not set" in result.stderr
