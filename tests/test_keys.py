"""Hard S3 keys and rejected URIs on real components: a redis-server, moto's S3 server and one worker process.

Every key below is uploaded to moto, listed from a prefix or read from a manifest, classified by the
worker and checked in the result rows byte for byte. The worker only allows the input and output
buckets, and the producer allows every bucket, so a manifest can send the worker a URI it must not read.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from uuid import uuid4

import pytest
from botocore.client import BaseClient

from producer import Client, Settings
from producer.client import Job, new_job_id
from producer.messages import BatchMessage
from producer.queue import BatchSender
from producer.spec import build_spec
from producer.uris import MAX_S3_KEY_BYTES, parse_s3_uri
from tests.support.servers import RedisServer, S3Server
from tests.support.worker import start_worker

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = sorted(DATA.glob("*.jpg"))
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
WAIT_S = 180

SUFFIX = uuid4().hex[:8]
INPUT_BUCKET = f"keys-in-{SUFFIX}"
OUTPUT_BUCKET = f"keys-out-{SUFFIX}"
DENIED_BUCKET = f"keys-denied-{SUFFIX}"


def key_of_bytes(size_bytes: int) -> str:
    """Return a key of exactly `size_bytes` UTF-8 bytes, mostly two-byte characters, ending in `.jpg`."""
    body_bytes = size_bytes - len("long/.jpg")
    return "long/" + "\u00e9" * (body_bytes // 2) + "x" * (body_bytes % 2) + ".jpg"


# Keys that URL quoting, `+` decoding, Unicode normalisation, path cleaning or line splitting would change.
HARD_KEYS = {
    "space": "a b.jpg",
    "plus": "a+b.jpg",
    "escaped-plus": "a%2Bb.jpg",
    "percent": "100%.jpg",
    "cjk": "caf\u00e9/\u65e5\u672c.jpg",
    "decomposed-accent": "cafe\u0301/\u65e5\u672c.jpg",
    "emoji": "\U0001f431/\U0001f600 smile.jpg",
    "leading-slash": "/a.jpg",
    "double-slash": "dir//b.jpg",
    "dot-segments": "dir/../c.jpg",
    "line-separator": "line\u2028separator.jpg",
    "next-line": "next\u0085line.jpg",
    "max-bytes": key_of_bytes(MAX_S3_KEY_BYTES),
}
# The order S3 lists keys in: by UTF-8 bytes, which is the order of Python's code point comparison.
LISTED_URIS = sorted(f"s3://{INPUT_BUCKET}/{key}" for key in HARD_KEYS.values())
# Manifests list the keys in reverse, so the manifest tests also check that manifest order is kept.
MANIFEST_URIS = LISTED_URIS[::-1]


def photo_for(index: int) -> bytes:
    return PHOTOS[index % len(PHOTOS)].read_bytes()


def manifest_body(name: str, uris: list[str]) -> bytes:
    """Return a manifest listing `uris` in the format that `name`'s suffix selects, as UTF-8 bytes."""
    if name.endswith(".jsonl"):
        # ensure_ascii=False writes U+2028 and U+0085 as raw characters, the case that line splitting breaks.
        return "".join(json.dumps({"uri": uri}, ensure_ascii=False) + "\n" for uri in uris).encode()
    if name.endswith(".csv"):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id", "uri"])
        writer.writerows([index, uri] for index, uri in enumerate(uris))
        return buffer.getvalue().encode()
    return "".join(uri + "\n" for uri in uris).encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    """A private Redis and moto S3 server with the three buckets filled, and one worker process."""
    log_dir = tmp_path_factory.mktemp("worker-logs")
    with RedisServer() as server, S3Server() as s3:
        client = Client(Settings(redis_url=server.url, s3_endpoint_url=s3.endpoint_url, model=str(tiny_clip_dir)))
        fill_buckets(client.storage.client)
        allowed = {"CLIPFLEET_ALLOWED_BUCKETS": f"{INPUT_BUCKET},{OUTPUT_BUCKET}"}
        worker = start_worker(log_dir, server.url, tiny_clip_dir, s3.endpoint_url, extra_env=allowed)
        try:
            yield {"client": client, "s3": s3, "worker": worker}
        finally:
            worker.stop()
            client._celery.close()
            client.store.redis.close()


def fill_buckets(s3: BaseClient) -> None:
    for bucket in (INPUT_BUCKET, OUTPUT_BUCKET, DENIED_BUCKET):
        s3.create_bucket(Bucket=bucket)
    for index, key in enumerate(HARD_KEYS.values()):
        s3.put_object(Bucket=INPUT_BUCKET, Key=key, Body=photo_for(index))
    s3.put_object(Bucket=DENIED_BUCKET, Key="a.jpg", Body=photo_for(0))


@pytest.fixture(scope="module")
def client(stack: dict[str, Any]) -> Client:
    return stack["client"]


def run_job(client: Client, source: str, output_name: str) -> tuple[Job, list[dict[str, Any]]]:
    job = client.submit(source=source, labels=LABELS, output=f"s3://{OUTPUT_BUCKET}/{output_name}/", top_k=2)
    status = job.wait(timeout_s=WAIT_S, progress=False)
    assert status.state == "succeeded", status
    return job, list(job.results())


def shard_uris(client: Client, job: Job) -> list[str]:
    """Return the `uri` of every row in the job's shards, read with boto3 and split at `\\n` only."""
    s3 = client.storage.client
    prefix = parse_s3_uri(job.output).key + "/"
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=prefix)["Contents"]]
    uris = []
    for key in sorted(key for key in keys if key.rsplit("/", 1)[1].startswith("part-")):
        text = s3.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read().decode("utf-8")
        uris.extend(json.loads(line)["uri"] for line in text.split("\n") if line)
    return uris


def scoring_errors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the rows that have no scores, by URI, with their error."""
    return {row["uri"]: row["error"] for row in rows if row["error"] is not None or row["label"] not in LABELS}


# --- an S3 prefix ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefix_job(client: Client) -> tuple[Job, list[dict[str, Any]]]:
    return run_job(client, f"s3://{INPUT_BUCKET}/", "prefix")


def test_max_bytes_key_is_at_limit() -> None:
    assert len(HARD_KEYS["max-bytes"].encode("utf-8")) == MAX_S3_KEY_BYTES


def test_prefix_rows_have_exact_uris(prefix_job: tuple[Job, list[dict[str, Any]]]) -> None:
    _, rows = prefix_job

    assert [row["uri"] for row in rows] == LISTED_URIS


def test_prefix_rows_all_scored(prefix_job: tuple[Job, list[dict[str, Any]]]) -> None:
    _, rows = prefix_job

    assert scoring_errors(rows) == {}


def test_prefix_shards_have_exact_uris(client: Client, prefix_job: tuple[Job, list[dict[str, Any]]]) -> None:
    job, _ = prefix_job

    assert shard_uris(client, job) == LISTED_URIS


# --- manifests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["list.txt", "list.csv", "list.jsonl"])
def manifest_job(request: pytest.FixtureRequest, client: Client) -> tuple[Job, list[dict[str, Any]]]:
    name = request.param
    client.storage.client.put_object(Bucket=OUTPUT_BUCKET, Key=f"manifests/{name}", Body=manifest_body(name, MANIFEST_URIS))
    return run_job(client, f"s3://{OUTPUT_BUCKET}/manifests/{name}", f"manifest-{name.replace('.', '-')}")


def test_manifest_rows_have_exact_uris(manifest_job: tuple[Job, list[dict[str, Any]]]) -> None:
    _, rows = manifest_job

    assert [row["uri"] for row in rows] == MANIFEST_URIS


def test_manifest_rows_all_scored(manifest_job: tuple[Job, list[dict[str, Any]]]) -> None:
    _, rows = manifest_job

    assert scoring_errors(rows) == {}


# --- URIs the worker must not read ----------------------------------------------------------------


class RequestLog(logging.Handler):
    """A logging handler that stores the request lines moto's server logs (werkzeug, running in this process)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def request_log() -> Iterator[RequestLog]:
    handler = RequestLog()
    logger = logging.getLogger("werkzeug")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_disallowed_bucket_not_read(client: Client, request_log: RequestLog) -> None:
    denied = f"s3://{DENIED_BUCKET}/a.jpg"
    allowed = f"s3://{INPUT_BUCKET}/a b.jpg"
    client.storage.client.put_object(Bucket=OUTPUT_BUCKET, Key="manifests/denied.txt", Body=f"{denied}\n{allowed}\n".encode())

    _, rows = run_job(client, f"s3://{OUTPUT_BUCKET}/manifests/denied.txt", "denied")

    assert [row["uri"] for row in rows] == [denied, allowed]
    assert rows[0]["error"]["code"] == "access_denied"
    assert DENIED_BUCKET in rows[0]["error"]["message"]
    assert rows[1]["error"] is None
    assert any(f"GET /{INPUT_BUCKET}/a%20b.jpg " in line for line in request_log.lines), "the request log captured nothing"
    assert [line for line in request_log.lines if f"/{DENIED_BUCKET}" in line] == []


class CountingHandler(BaseHTTPRequestHandler):
    """An HTTP handler that serves a photo for any GET and records each request path."""

    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        CountingHandler.requests.append(self.path)
        body = photo_for(0)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    """The base URL of an HTTP server on 127.0.0.1 that serves a real photo for any path."""
    CountingHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def send_forged_batch(client: Client, uris: list[str], model_dir: Path) -> Job:
    """Create a job whose source and output the worker allows and enqueue one batch of `uris` by hand.

    This is what someone who can write to Redis could do; the producer itself never sends such URIs.
    """
    spec = build_spec(source=f"s3://{INPUT_BUCKET}/", labels=LABELS, output=f"s3://{OUTPUT_BUCKET}/forged/", model=str(model_dir))
    job_id = new_job_id()
    client.store.create(job_id, spec)
    sender = BatchSender(client._celery, client.settings.queue, high_water=1000)
    try:
        sender.send(BatchMessage(job_id=job_id, batch=0, uris=uris))
    finally:
        sender.close()
    client.store.finish_listing(job_id, len(uris), 0, 1)
    return Job(client, job_id)


def test_other_schemes_in_message_not_read(client: Client, http_server: str, tiny_clip_dir: Path) -> None:
    local_photo = str(PHOTOS[0])
    refused = [
        f"{http_server}/a.jpg",
        f"{http_server.replace('http://', 'https://')}/a.jpg",
        f"file://{local_photo}",
        local_photo,
        f"S3://{INPUT_BUCKET}/a b.jpg",
    ]
    control = f"s3://{INPUT_BUCKET}/a b.jpg"
    job = send_forged_batch(client, [*refused, control], tiny_clip_dir)

    status = job.wait(timeout_s=WAIT_S, progress=False)
    rows = list(job.results())

    assert status.state == "succeeded", status
    assert [row["uri"] for row in rows] == [*refused, control]
    codes = {row["uri"]: (row["error"] or {}).get("code") for row in rows[:-1]}
    assert codes == {uri: "access_denied" for uri in refused}
    assert rows[-1]["error"] is None
    assert CountingHandler.requests == []
