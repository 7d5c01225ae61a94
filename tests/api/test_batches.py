"""The Batch API end to end: live `clipfleet serve` processes, the openai SDK, a private Redis, moto's S3 server
and a real worker with the tiny checkpoint.

Every output line is checked against what the worker's own code gives outside the Batch API: the rows of a job
submitted with the Python client for classifications, and the realtime /v1/embeddings route for embeddings.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import redis
from openai import OpenAI

from producer.api.schemas import ClassificationResult
from producer.client import Client
from producer.constants import API_BATCH_KEY, FINAL_STATES
from tests.support.api_server import ApiServer, start_api_server, wait_for_model
from tests.support.worker import stack_client, worker_stack

DATA = Path(__file__).resolve().parents[1] / "data"
PHOTOS = {"a.jpg": "astronaut.jpg", "b.jpg": "chelsea.jpg", "c.jpg": "coffee.jpg", "d.jpg": "rocket.jpg"}
BUCKET = "batch-api"
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
PROMPTS = {"cat": ["a photo of a cat", "a kitten"], "rocket": ["a rocket launch"], "mug": ["a mug of coffee"]}
MANY_IMAGES = 120
TEXT_LINES = 16
BATCH_WAIT_S = 180.0
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    """A private Redis, moto's S3 server and one float32 worker that decodes JPEGs at full size."""
    env = {"CLIPFLEET_DTYPE": "float32", "CLIPFLEET_JPEG_DRAFT": "false"}
    with worker_stack(tmp_path_factory.mktemp("batch-worker-logs"), tiny_clip_dir, env) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: dict[str, Any], tiny_clip_dir: Path) -> Client:
    """A client of the stack, after the input images are uploaded: four photos, a corrupt JPEG and MANY_IMAGES copies."""
    client = stack_client(stack, tiny_clip_dir)
    s3 = client.storage.client
    s3.create_bucket(Bucket=BUCKET)
    for key, photo in PHOTOS.items():
        s3.put_object(Bucket=BUCKET, Key=f"in/{key}", Body=(DATA / photo).read_bytes())
    s3.put_object(Bucket=BUCKET, Key="in/e-corrupt.jpg", Body=b"\xff\xd8\xff\xe0 not a JPEG")
    rocket = (DATA / "rocket.jpg").read_bytes()
    for index in range(MANY_IMAGES):
        s3.put_object(Bucket=BUCKET, Key=f"many/{index:04d}.jpg", Body=rocket)
    return client


@pytest.fixture
def start_server(stack: dict[str, Any], client: Client, tiny_clip_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    """A function that starts `clipfleet serve` on the stack with extra settings; the servers stop after the test."""
    servers: list[ApiServer] = []

    def start(**env: str) -> ApiServer:
        settings = {"CLIPFLEET_MODEL": str(tiny_clip_dir), "CLIPFLEET_API_FILES_URI": f"s3://{BUCKET}/api/", **env}
        server = start_api_server(tmp_path, stack["redis_url"], stack["s3"].endpoint_url, settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def api(start_server: Callable[..., ApiServer], tiny_clip_dir: Path) -> Iterator[OpenAI]:
    server = start_server(CLIPFLEET_BATCH_SIZE="2")
    wait_for_model(server, str(tiny_clip_dir))
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60.0) as sdk:
        yield sdk


@pytest.fixture
def redis_client(stack: dict[str, Any]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack["redis_url"], socket_timeout=10.0, decode_responses=True)
    yield client
    client.close()


def request_line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def upload(api: OpenAI, lines: list[dict[str, Any]] | bytes) -> str:
    content = lines if isinstance(lines, bytes) else b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return api.files.create(file=("requests.jsonl", content), purpose="batch").id


def data_uri(photo: str) -> str:
    return "data:image/jpeg;base64," + base64.b64encode((DATA / photo).read_bytes()).decode()


def wait_for_batch(api: OpenAI, batch_id: str, statuses: tuple[str, ...] = ("completed", "failed", "cancelled", "expired")) -> Any:
    deadline = time.monotonic() + BATCH_WAIT_S
    while time.monotonic() < deadline:
        batch = api.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {BATCH_WAIT_S} s")


def read_lines(api: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """Return the lines of an output or error file by custom_id ({} for no file)."""
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in api.files.content(file_id).text.splitlines()]
    return {line["custom_id"]: line for line in lines}


def direct_rows(client: Client, labels: Any, top_k: int) -> dict[str, dict[str, Any]]:
    """Return the rows of a job over the four photos and the corrupt image, submitted with the Python client."""
    job = client.submit(source=f"s3://{BUCKET}/in/", labels=labels, output=f"s3://{BUCKET}/direct/", top_k=top_k, batch_size=2)
    status = job.wait(timeout_s=BATCH_WAIT_S, progress=False)
    assert status.state == "succeeded"
    return {row["uri"]: row for row in job.results()}


def assert_rows_match(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got["label"] == expected["label"]
    assert got["score"] == pytest.approx(expected["score"], abs=TOLERANCE)
    assert [entry["label"] for entry in got["top_k"]] == [entry["label"] for entry in expected["top_k"]]
    assert [entry["score"] for entry in got["top_k"]] == pytest.approx([entry["score"] for entry in expected["top_k"]], abs=TOLERANCE)
    assert got["error"] is None


def job_ids(redis_client: redis.Redis, batch_id: str) -> list[str]:
    fields = redis_client.hgetall(API_BATCH_KEY.format(batch_id=batch_id))
    return [value for name, value in fields.items() if name.startswith("job:")]


def test_classifications_match_direct_job(api: OpenAI, client: Client, tiny_clip_dir: Path) -> None:
    model = str(tiny_clip_dir)
    url = "/v1/classifications"
    lines = [
        request_line("a", url, {"model": model, "input": f"s3://{BUCKET}/in/a.jpg", "labels": LABELS}),
        request_line("b", url, {"model": model, "input": f"s3://{BUCKET}/in/b.jpg", "labels": LABELS}),
        request_line("c-inline", url, {"model": model, "input": data_uri("coffee.jpg"), "labels": LABELS}),
        request_line("corrupt", url, {"model": model, "input": f"s3://{BUCKET}/in/e-corrupt.jpg", "labels": LABELS}),
        request_line("d-short-name", url, {"model": tiny_clip_dir.name, "input": f"s3://{BUCKET}/in/d.jpg", "labels": LABELS}),
        request_line("a-prompts", url, {"model": model, "input": f"s3://{BUCKET}/in/a.jpg", "labels": PROMPTS, "top_k": 2}),
        request_line("no-labels", url, {"model": model, "input": f"s3://{BUCKET}/in/a.jpg"}),
        request_line("unknown-model", url, {"model": "no/such-model", "input": f"s3://{BUCKET}/in/a.jpg", "labels": LABELS}),
        request_line("text-input", url, {"model": model, "input": "a cat", "labels": LABELS}),
    ]
    batch = api.batches.create(input_file_id=upload(api, lines), endpoint=url, completion_window="24h", metadata={"run": "1"})
    assert batch.status == "validating"

    done = wait_for_batch(api, batch.id)
    output = read_lines(api, done.output_file_id)
    errors = read_lines(api, done.error_file_id)
    expected = direct_rows(client, LABELS, top_k=5)
    expected_prompts = direct_rows(client, PROMPTS, top_k=2)

    assert done.status == "completed"
    assert done.metadata == {"run": "1"}
    assert done.request_counts.model_dump() == {"total": 9, "completed": 5, "failed": 4}
    assert sorted(output) == ["a", "a-prompts", "b", "c-inline", "d-short-name"]
    assert sorted(errors) == ["corrupt", "no-labels", "text-input", "unknown-model"]
    for custom_id, photo in (("a", "a.jpg"), ("b", "b.jpg"), ("d-short-name", "d.jpg")):
        body = output[custom_id]["response"]["body"]
        assert output[custom_id]["response"]["status_code"] == 200
        assert body["uri"] == f"s3://{BUCKET}/in/{photo}"
        assert_rows_match(body, expected[f"s3://{BUCKET}/in/{photo}"])
        ClassificationResult.model_validate(body)  # the shape /openapi.json documents
    assert_rows_match(output["c-inline"]["response"]["body"], expected[f"s3://{BUCKET}/in/c.jpg"])
    assert_rows_match(output["a-prompts"]["response"]["body"], expected_prompts[f"s3://{BUCKET}/in/a.jpg"])
    assert errors["corrupt"]["response"]["status_code"] == 400
    assert errors["corrupt"]["response"]["body"]["error"]["code"] == "decode_error"
    assert errors["no-labels"]["response"]["body"]["error"]["param"] == "labels"
    assert errors["unknown-model"]["response"]["status_code"] == 404
    assert errors["text-input"]["response"]["body"]["error"]["code"] == "invalid_input"
    assert all(line["error"] is None and line["id"].startswith("batch_req_") for line in [*output.values(), *errors.values()])
    assert api.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_embeddings_match_realtime_route(api: OpenAI, tiny_clip_dir: Path) -> None:
    model = tiny_clip_dir.name
    url = "/v1/embeddings"
    mixed = [f"s3://{BUCKET}/in/a.jpg", "a rocket on the pad", data_uri("chelsea.jpg")]
    lines = [
        request_line("text", url, {"model": model, "input": "a photo of a cat"}),
        request_line("mixed", url, {"model": model, "input": mixed}),
        request_line("base64", url, {"model": model, "input": [f"s3://{BUCKET}/in/d.jpg"], "encoding_format": "base64"}),
        request_line("corrupt", url, {"model": model, "input": [f"s3://{BUCKET}/in/e-corrupt.jpg", "fine text"]}),
        request_line("empty", url, {"model": model, "input": []}),
    ]
    batch = api.batches.create(input_file_id=upload(api, lines), endpoint=url, completion_window="24h")

    done = wait_for_batch(api, batch.id)
    output = read_lines(api, done.output_file_id)
    errors = read_lines(api, done.error_file_id)

    assert done.status == "completed"
    assert done.request_counts.model_dump() == {"total": 5, "completed": 3, "failed": 2}
    assert sorted(errors) == ["corrupt", "empty"]
    assert errors["corrupt"]["response"]["body"]["error"]["code"] == "decode_error"
    assert errors["empty"]["response"]["body"]["error"]["param"] == "input"
    for custom_id, inputs in (("text", ["a photo of a cat"]), ("mixed", mixed)):
        body = output[custom_id]["response"]["body"]
        realtime = api.embeddings.create(model=model, input=inputs)
        assert body["model"] == model
        assert [item["index"] for item in body["data"]] == list(range(len(inputs)))
        got = np.array([item["embedding"] for item in body["data"]])
        want = np.array([item.embedding for item in realtime.data])
        np.testing.assert_allclose(got, want, atol=TOLERANCE)
        assert body["usage"] == realtime.usage.model_dump()
    encoded = output["base64"]["response"]["body"]["data"][0]["embedding"]
    realtime_d = api.embeddings.create(model=model, input=[f"s3://{BUCKET}/in/d.jpg"]).data[0].embedding
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), realtime_d, atol=TOLERANCE)


def test_invalid_lines_fail_validation(api: OpenAI) -> None:
    body = {"model": "m", "input": "x"}
    content = (
        json.dumps(request_line("one", "/v1/embeddings", body)) + "\n"
        + json.dumps(request_line("one", "/v1/embeddings", body)) + "\n"
        + json.dumps(request_line("two", "/v1/classifications", body)) + "\n"
        + "{not json\n"
        + json.dumps({"custom_id": "three", "method": "GET", "url": "/v1/embeddings", "body": body}) + "\n"
    ).encode()
    batch = api.batches.create(input_file_id=upload(api, content), endpoint="/v1/embeddings", completion_window="24h")

    done = wait_for_batch(api, batch.id)

    assert done.status == "failed"
    assert done.failed_at is not None
    assert done.output_file_id is None
    assert [(error.line, error.code) for error in done.errors.data] == [
        (2, "duplicate_custom_id"), (3, "mismatched_endpoint"), (4, "invalid_json_line"), (5, "invalid_method"),
    ]


def test_text_requests_retried_while_queue_full(start_server: Callable[..., ApiServer], tiny_clip_dir: Path) -> None:
    """With CLIPFLEET_API_QUEUE_HIGH_WATER=1 the realtime route answers 429 to most concurrent requests; the
    driver backs off and sends them again, so every line completes."""
    server = start_server(CLIPFLEET_API_QUEUE_HIGH_WATER="1")
    model = tiny_clip_dir.name
    lines = [request_line(f"t{index:03d}", "/v1/embeddings", {"model": model, "input": [f"text {index}", "a cat"]}) for index in range(TEXT_LINES)]
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as api:
        wait_for_model(server, str(tiny_clip_dir))
        batch = api.batches.create(input_file_id=upload(api, lines), endpoint="/v1/embeddings", completion_window="24h")

        done = wait_for_batch(api, batch.id)
        errors = read_lines(api, done.error_file_id)

    assert not errors, list(errors.values())[:2]
    assert done.request_counts.model_dump() == {"total": TEXT_LINES, "completed": TEXT_LINES, "failed": 0}
    assert "failed with 429 queue_full" in server.process.log_path.read_text()


def test_invalid_bodies_fail_their_lines(api: OpenAI, tiny_clip_dir: Path) -> None:
    model = tiny_clip_dir.name
    embeddings = [
        request_line("unknown-model", "/v1/embeddings", {"model": "no-such-model", "input": "a cat"}),
        request_line("text-data-uri", "/v1/embeddings", {"model": model, "input": "data:text/plain;base64,aGVsbG8="}),
        request_line("no-key", "/v1/embeddings", {"model": model, "input": ["a cat", f"s3://{BUCKET}/"]}),
    ]
    classifications = [
        request_line("string-labels", "/v1/classifications", {"model": model, "input": f"s3://{BUCKET}/in/a.jpg", "labels": "cat"}),
        request_line("no-key", "/v1/classifications", {"model": model, "input": f"s3://{BUCKET}/", "labels": LABELS}),
    ]
    created = [
        api.batches.create(input_file_id=upload(api, lines), endpoint=url, completion_window="24h")  # type: ignore[arg-type]
        for url, lines in (("/v1/embeddings", embeddings), ("/v1/classifications", classifications))
    ]

    errors = {}
    for batch in created:
        done = wait_for_batch(api, batch.id)
        assert done.request_counts.failed == {"/v1/embeddings": 3, "/v1/classifications": 2}[done.endpoint]
        errors[done.endpoint] = {key: line["response"] for key, line in read_lines(api, done.error_file_id).items()}

    unknown = errors["/v1/embeddings"]["unknown-model"]
    assert (unknown["status_code"], unknown["body"]["error"]["code"]) == (404, "model_not_found")
    text_uri = errors["/v1/embeddings"]["text-data-uri"]
    assert text_uri["status_code"] == 400
    assert "only data:image/ URIs are images; send text as plain strings" in text_uri["body"]["error"]["message"]
    for endpoint in errors:
        no_key = errors[endpoint]["no-key"]
        assert no_key["status_code"] == 400
        assert f"s3://{BUCKET}/" in no_key["body"]["error"]["message"]
        assert "the URI names no object key" in no_key["body"]["error"]["message"]
    labels = errors["/v1/classifications"]["string-labels"]["body"]["error"]
    assert labels["param"] == "labels"
    assert "list[str] or dict[str,list[str]]" in labels["message"]


def test_unknown_ids_and_listing(api: OpenAI) -> None:
    file_id = upload(api, [request_line("x", "/v1/embeddings", {"model": "m", "input": "x"})])
    created = [api.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h").id for _ in range(3)]

    with pytest.raises(openai.NotFoundError):
        api.batches.retrieve("batch_doesnotexist")
    with pytest.raises(openai.NotFoundError):
        api.batches.cancel("batch_doesnotexist")
    with pytest.raises(openai.BadRequestError) as caught:
        api.batches.create(input_file_id="file-doesnotexist", endpoint="/v1/embeddings", completion_window="24h")
    assert caught.value.body["param"] == "input_file_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        api.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")  # type: ignore[arg-type]
    page = api.batches.list(limit=2)
    assert [batch.id for batch in page.data] == created[:0:-1]
    assert page.has_more is True
    assert [batch.id for batch in api.batches.list(limit=1, after=created[1]).data] == [created[0]]


def many_lines(model: str) -> list[dict[str, Any]]:
    body = {"model": model, "labels": LABELS}
    return [
        request_line(f"img-{index:04d}", "/v1/classifications", {**body, "input": f"s3://{BUCKET}/many/{index:04d}.jpg"})
        for index in range(MANY_IMAGES)
    ]


def wait_for_progress(client: Client, redis_client: redis.Redis, batch_id: str) -> str:
    """Return the id of the batch's job once it has classified at least one image."""
    deadline = time.monotonic() + BATCH_WAIT_S
    while time.monotonic() < deadline:
        ids = job_ids(redis_client, batch_id)
        if ids and client.job(ids[0]).status().done >= 1:
            return ids[0]
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} started no job within {BATCH_WAIT_S} s")


def test_cancel_keeps_partial_results(start_server: Callable[..., ApiServer], client: Client, redis_client: redis.Redis, tiny_clip_dir: Path) -> None:
    server = start_server(CLIPFLEET_BATCH_SIZE="1")
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as api:
        batch = api.batches.create(input_file_id=upload(api, many_lines(str(tiny_clip_dir))), endpoint="/v1/classifications", completion_window="24h")
        job_id = wait_for_progress(client, redis_client, batch.id)

        cancelling = api.batches.cancel(batch.id)
        done = wait_for_batch(api, batch.id, ("cancelled", "completed"))
        output = read_lines(api, done.output_file_id)
        errors = read_lines(api, done.error_file_id)

    assert cancelling.status == "cancelling"
    assert done.status == "cancelled"
    assert done.cancelled_at is not None
    assert client.job(job_id).status().state == "cancelled"
    assert done.request_counts.total == MANY_IMAGES
    assert 1 <= done.request_counts.completed < MANY_IMAGES
    assert done.request_counts.completed + done.request_counts.failed == MANY_IMAGES
    assert len(output) == done.request_counts.completed
    assert sorted([*output, *errors]) == [line["custom_id"] for line in many_lines("")]
    assert {line["error"]["code"] for line in errors.values()} == {"batch_cancelled"}
    assert all(line["response"] is None for line in errors.values())


def test_restart_resumes_batch(start_server: Callable[..., ApiServer], client: Client, redis_client: redis.Redis, tiny_clip_dir: Path) -> None:
    first = start_server(CLIPFLEET_BATCH_SIZE="1")
    with OpenAI(base_url=first.base_url, api_key="unused", max_retries=0) as api:
        batch = api.batches.create(input_file_id=upload(api, many_lines(str(tiny_clip_dir))), endpoint="/v1/classifications", completion_window="24h")
        wait_for_progress(client, redis_client, batch.id)
    first.stop()
    assert client.job(job_ids(redis_client, batch.id)[0]).status().state not in FINAL_STATES

    second = start_server(CLIPFLEET_BATCH_SIZE="1")
    with OpenAI(base_url=second.base_url, api_key="unused", max_retries=0) as api:
        done = wait_for_batch(api, batch.id)
        output = read_lines(api, done.output_file_id)

    assert done.status == "completed"
    assert done.request_counts.model_dump() == {"total": MANY_IMAGES, "completed": MANY_IMAGES, "failed": 0}
    assert done.error_file_id is None
    assert sorted(output) == [line["custom_id"] for line in many_lines("")]
    assert len(job_ids(redis_client, batch.id)) == 1


def test_two_servers_drive_batch_once(start_server: Callable[..., ApiServer], redis_client: redis.Redis, tiny_clip_dir: Path) -> None:
    servers = [start_server(CLIPFLEET_BATCH_SIZE="4"), start_server(CLIPFLEET_BATCH_SIZE="4")]
    with OpenAI(base_url=servers[0].base_url, api_key="unused", max_retries=0) as api:
        batch = api.batches.create(input_file_id=upload(api, many_lines(str(tiny_clip_dir))[:40]), endpoint="/v1/classifications", completion_window="24h")
        done = wait_for_batch(api, batch.id)
    logs = [server.process.log_path.read_text() for server in servers]

    assert done.status == "completed"
    assert done.request_counts.completed == 40
    assert len(job_ids(redis_client, batch.id)) == 1
    assert sum(f"Batch {batch.id} in progress" in log for log in logs) == 1
    assert sum(f"Batch {batch.id} completed" in log for log in logs) == 1


def test_killed_server_batch_taken_over(start_server: Callable[..., ApiServer], client: Client, redis_client: redis.Redis, tiny_clip_dir: Path) -> None:
    """A server killed while it enqueues a job: another server takes the batch over once the lease expires and
    resumes the job, whose producer is gone."""
    short_lease = {"CLIPFLEET_BATCH_SIZE": "1", "CLIPFLEET_PRODUCER_LEASE_S": "2"}
    first = start_server(CLIPFLEET_QUEUE_HIGH_WATER="2", **short_lease)
    with OpenAI(base_url=first.base_url, api_key="unused", max_retries=0) as api:
        batch = api.batches.create(input_file_id=upload(api, many_lines(str(tiny_clip_dir))), endpoint="/v1/classifications", completion_window="24h")
        job_id = wait_for_progress(client, redis_client, batch.id)
    os.killpg(first.process.process.pid, signal.SIGKILL)
    first.process.process.wait(timeout=10)
    assert client.store.fields(job_id)["listing_done"] != "1"

    second = start_server(**short_lease)
    with OpenAI(base_url=second.base_url, api_key="unused", max_retries=0) as api:
        done = wait_for_batch(api, batch.id)
        output = read_lines(api, done.output_file_id)

    assert done.status == "completed"
    assert done.request_counts.model_dump() == {"total": MANY_IMAGES, "completed": MANY_IMAGES, "failed": 0}
    assert sorted(output) == [line["custom_id"] for line in many_lines("")]
    assert job_ids(redis_client, batch.id) == [job_id]
    assert f"Job {job_id} lost its producer; resuming it" in second.process.log_path.read_text()
