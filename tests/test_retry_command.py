"""`clipfleet retry` and `Job.retry` on real components: redis-server, moto's S3 server, a Celery worker process.

Each job reads a manifest that names some objects not uploaded yet, so its first run finishes with
`not_found` rows. Uploading them and retrying must turn those rows into classified ones in place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer import Client
from producer.spec import build_spec
from producer.state import RetryNotStarted
from tests.support.worker import stack_client, worker_stack

DATA = Path(__file__).resolve().parent / "data"
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
WAIT_S = 180
CLI_TIMEOUT_S = 240
# Manifest entries: the key under the input prefix and the photo uploaded there, before or after the first run.
PRESENT = {"rocket.jpg": "rocket.jpg", "astronaut.jpg": "astronaut.jpg", "coffee.jpg": "coffee.jpg"}
LATE = {"late-1.jpg": "chelsea.jpg", "late-2.jpg": "rocket.jpg"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    """A private Redis, moto's S3 server and one worker process, shared by this module's jobs."""
    with worker_stack(tmp_path_factory.mktemp("worker-logs"), tiny_clip_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: dict[str, Any], tiny_clip_dir: Path) -> Client:
    return stack_client(stack, tiny_clip_dir)


@pytest.fixture(scope="module")
def cli_env(stack: dict[str, Any], tiny_clip_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLIPFLEET_")}
    env.update(CLIPFLEET_REDIS_URL=stack["redis_url"], CLIPFLEET_S3_ENDPOINT_URL=stack["s3"].endpoint_url, CLIPFLEET_MODEL=str(tiny_clip_dir))
    return env


def clipfleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env
    )


def finished_job(client: Client, late: dict[str, str] = LATE) -> dict[str, Any]:
    """Run a job over a manifest whose `late` keys are missing, in batches of two, and return its parts."""
    s3 = client.storage.client
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    for key, photo in PRESENT.items():
        s3.put_object(Bucket=bucket, Key=f"in/{key}", Body=(DATA / photo).read_bytes())
    keys = ["rocket.jpg", *late, "astronaut.jpg", "coffee.jpg"]
    uris = [f"s3://{bucket}/in/{key}" for key in keys]
    s3.put_object(Bucket=bucket, Key="manifest.txt", Body="\n".join(uris).encode())
    job = client.submit(source=f"s3://{bucket}/manifest.txt", labels=LABELS, output=f"s3://{bucket}/results/", batch_size=2, top_k=2)
    status = job.wait(timeout_s=WAIT_S, progress=False)
    return {"job": job, "status": status, "bucket": bucket, "uris": uris, "late": late}


def upload_late(client: Client, parts: dict[str, Any]) -> None:
    for key, photo in parts["late"].items():
        client.storage.client.put_object(Bucket=parts["bucket"], Key=f"in/{key}", Body=(DATA / photo).read_bytes())


def read_summary(client: Client, parts: dict[str, Any]) -> dict[str, Any]:
    key = f"results/{parts['job'].id}/_SUCCESS.json"
    return json.loads(client.storage.client.get_object(Bucket=parts["bucket"], Key=key)["Body"].read())


def error_codes(rows: list[dict[str, Any]]) -> dict[str, int]:
    codes: dict[str, int] = {}
    for row in rows:
        if row["error"] is not None:
            codes[row["error"]["code"]] = codes.get(row["error"]["code"], 0) + 1
    return codes


@pytest.fixture(scope="module")
def cli_retried(client: Client, cli_env: dict[str, str]) -> dict[str, Any]:
    """A job retried with `clipfleet retry JOB --wait` after its missing objects were uploaded."""
    parts = finished_job(client)
    parts["first_rows"] = list(parts["job"].results())
    upload_late(client, parts)
    parts["result"] = clipfleet(cli_env, "retry", parts["job"].id, "--wait")
    parts["rows"] = list(parts["job"].results())
    return parts


def test_first_run_rows_not_found(cli_retried: dict[str, Any]) -> None:
    assert cli_retried["status"].state == "succeeded"
    assert cli_retried["status"].errors == {"not_found": 2}
    assert error_codes(cli_retried["first_rows"]) == {"not_found": 2}


def test_cli_retry_exits_0(cli_retried: dict[str, Any]) -> None:
    result = cli_retried["result"]
    assert result.returncode == 0, result.stderr
    assert "retry round 1 enqueued 2 failed images in 2 batches" in result.stderr
    assert f"job {cli_retried['job'].id}: succeeded" in result.stdout


def test_cli_retry_rows_succeed(cli_retried: dict[str, Any]) -> None:
    assert error_codes(cli_retried["rows"]) == {}
    for row in cli_retried["rows"]:
        assert row["label"] in LABELS, row["uri"]


def test_cli_retry_every_input_once(cli_retried: dict[str, Any]) -> None:
    assert [row["uri"] for row in cli_retried["rows"]] == cli_retried["uris"]


def test_cli_retry_keeps_good_rows(cli_retried: dict[str, Any]) -> None:
    before = {row["uri"]: row for row in cli_retried["first_rows"] if row["error"] is None}
    after = {row["uri"]: row for row in cli_retried["rows"]}
    for uri, row in before.items():
        assert after[uri] == row, uri


def test_cli_retry_counters_match_rows(cli_retried: dict[str, Any]) -> None:
    status = cli_retried["job"].status()
    assert status.state == "succeeded"
    assert (status.total, status.succeeded, status.failed) == (5, 5, 0)
    assert status.errors == {}
    assert status.retry_round == 1


def test_cli_retry_summary_matches_rows(client: Client, cli_retried: dict[str, Any]) -> None:
    summary = read_summary(client, cli_retried)
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (5, 5, 0)
    assert summary["errors"] == {}
    assert summary["retry_round"] == 1


def test_cli_status_shows_counters(cli_env: dict[str, str], cli_retried: dict[str, Any]) -> None:
    result = clipfleet(cli_env, "status", cli_retried["job"].id, "--json")
    status = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert status["errors"] == {}
    assert status["retries_total"] == sum(status["retries"].values())
    assert status["redeliveries"] == 0
    assert status["retry_round"] == 1
    assert status["round_batches_done"] == status["round_batches_total"]
    assert status["round_batches_total"] > 0
    assert status["giveups"] == {}


def test_cli_retry_nothing_failed(cli_env: dict[str, str], cli_retried: dict[str, Any]) -> None:
    result = clipfleet(cli_env, "retry", cli_retried["job"].id)
    assert result.returncode == 0, result.stderr
    assert "no failed images to retry; nothing was enqueued" in result.stderr
    assert cli_retried["job"].status().retry_round == 1


def test_api_retry_by_code(client: Client) -> None:
    """Only one missing object is uploaded, so one row stays not_found; counters and summary follow the rows."""
    parts = finished_job(client)
    upload_late(client, {**parts, "late": {"late-1.jpg": "chelsea.jpg"}})

    skipped = parts["job"].retry(codes=["decode_error"])
    retried = parts["job"].retry(codes=["not_found"])
    status = parts["job"].wait(timeout_s=WAIT_S, progress=False)
    rows = list(parts["job"].results())
    summary = read_summary(client, parts)

    assert skipped.round is None
    assert (retried.round, retried.images, retried.batches) == (1, 2, 2)
    assert [row["uri"] for row in rows] == parts["uris"]
    assert error_codes(rows) == {"not_found": 1}
    assert (status.state, status.succeeded, status.failed, status.errors) == ("succeeded", 4, 1, {"not_found": 1})
    assert (summary["succeeded"], summary["failed"], summary["errors"]) == (4, 1, {"not_found": 1})


def test_api_retry_twice(client: Client) -> None:
    """A second round picks up what the first could not fix."""
    parts = finished_job(client, late={"late-3.jpg": "coffee.jpg"})
    parts["job"].retry()
    first = parts["job"].wait(timeout_s=WAIT_S, progress=False)
    upload_late(client, parts)

    second = parts["job"].retry()
    status = parts["job"].wait(timeout_s=WAIT_S, progress=False)

    assert first.errors == {"not_found": 1}
    assert second.round == 2
    assert (status.succeeded, status.failed, status.retry_round) == (4, 0, 2)
    assert read_summary(client, parts)["retry_round"] == 2


def running_job(client: Client) -> str:
    """Create a job that stays running: no batch of it is ever enqueued."""
    spec = build_spec(source="s3://photos/in/", labels=LABELS, output="s3://results/")
    job_id = f"running-{uuid.uuid4().hex[:8]}"
    client.store.create(job_id, spec)
    client.store.mark_batch_started(job_id)
    return job_id


def test_api_retry_running_rejected(client: Client) -> None:
    job = client.job(running_job(client))
    with pytest.raises(RetryNotStarted, match="is running"):
        job.retry()
    assert job.status().retry_round == 0


def test_cli_retry_running_rejected(client: Client, cli_env: dict[str, str]) -> None:
    job_id = running_job(client)
    result = clipfleet(cli_env, "retry", job_id)
    assert result.returncode == 1
    assert f"job {job_id} is running: only a succeeded or cancelled job can be retried" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_retry_unknown_job(cli_env: dict[str, str]) -> None:
    result = clipfleet(cli_env, "retry", "20260101-000000-deadbeef")
    assert result.returncode == 1
    assert "job '20260101-000000-deadbeef' not found in Redis" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_retry_unknown_code(cli_env: dict[str, str]) -> None:
    result = clipfleet(cli_env, "retry", "20260101-000000-deadbeef", "--codes", "not_found,lost")
    assert result.returncode == 2
    assert "unknown error code(s) ['lost']" in result.stderr


def test_api_retry_missing_shard_rejected(client: Client) -> None:
    parts = finished_job(client)
    client.storage.client.delete_object(Bucket=parts["bucket"], Key=f"results/{parts['job'].id}/part-000000.jsonl")

    with pytest.raises(RetryNotStarted) as caught:
        parts["job"].retry()

    assert "part-000000.jsonl" in str(caught.value)
    assert "no shard for 1 of its" in str(caught.value)
    assert parts["job"].status().retry_round == 0
