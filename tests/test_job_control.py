"""Job control on real components: `status`, `jobs`, `cancel` and `wait --progress`.

The command tests run `producer.cli.main` against a real Redis and moto's S3 server, with job state written
through `JobStore` at known times. The cancel tests run batches for real: in this process through
`process_batch`, and in a Celery worker process, with moto behind the fault proxy (tests/support/s3proxy.py)
so that `delay` rules make batches last long enough to cancel one in the middle. Tests with figures print a
`measured:` line; run with `-s` to see them.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.client import BaseClient

import producer.jobs
from producer.cli import EXIT_ERROR, main
from producer.client import Client, new_job_id
from producer.constants import (
    CANCELLED_MARKER,
    JOB_KEY,
    JOBS_INDEX_KEY,
    TASK_CLASSIFY_BATCH,
)
from producer.embedded import ManagedProcess
from producer.jobs import ProgressLine, format_duration, refresh_cancel_summary
from producer.lease import ProducerLease
from producer.messages import BatchMessage
from producer.settings import Settings
from producer.spec import build_spec
from producer.state import JobStatus, JobStore
from tests.support.s3proxy import S3FaultProxy
from tests.support.servers import RedisServer, S3Server
from tests.support.worker import start_worker
from workers.pipeline import process_batch
from workers.runtime import WorkerRuntime

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = sorted(DATA.glob("*.jpg"))
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
NOW = 1_800_000_000.0
POLL_S = 0.05
# Keys of `clipfleet status --json` before the rate over the last minute and the listing state were added.
PREVIOUS_STATUS_KEYS = {
    "job_id", "state", "total", "done", "succeeded", "failed", "skipped", "images_per_s", "eta_s", "error", "errors",
    "retries", "retries_total", "giveups", "redeliveries", "retry_round", "round_batches_done", "round_batches_total",
}
# Bounds well above the figures measured (printed by the tests), so that a loaded machine passes too.
CANCEL_STOP_LIMIT_S = 10.0
DROP_ALL_LIMIT_S = 120.0


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    job_store = JobStore.from_url(redis_url)
    yield job_store
    job_store.redis.close()


@pytest.fixture
def cli_env(redis_url: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Point the CLI at the test Redis and S3 server, and restore the signal handlers that `main` installs."""
    for name in list(os.environ):
        if name.startswith("CLIPFLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLIPFLEET_REDIS_URL", redis_url)
    monkeypatch.setenv("CLIPFLEET_S3_ENDPOINT_URL", s3_server.endpoint_url)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    yield dict(os.environ)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def create_job(store: JobStore, job_id: str, output: str = "s3://results/out/", source: str = "s3://photos/in/") -> str:
    store.create(job_id, build_spec(source=source, labels=["cat", "dog"], output=output))
    return job_id


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- status --------------------------------------------------------------------------------------------


def test_status_text_while_listing_lost(store: JobStore, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    job = create_job(store, "20260101-000000-0000000a")
    store.add_listed(job, 128)
    store.record_batch(job, 0, succeeded=50, failed=14, errors={"not_found": 10, "decode_error": 4})

    code, out, _ = run_cli(capsys, "status", job)

    assert code == 0
    assert f"job {job}: running" in out
    assert "total:       listing… (128 images enqueued so far)" in out
    assert "done:        64 (50 classified, 14 failed)" in out
    assert "failed:      14 (not_found 10, decode_error 4)" in out
    assert "producer:    lost" in out
    assert f"run `clipfleet resume {job}`" in out
    assert f"results:     s3://results/out/{job}" in out


def test_status_text_with_rate_and_eta(store: JobStore, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    job = create_job(store, "20260101-000000-0000000b")
    store.finish_listing(job, images=1000, skipped=3, batches=10)
    now = time.time()
    store.record_batch(job, 0, succeeded=100, failed=0, now=now - 30)
    store.record_batch(job, 1, succeeded=100, failed=0, now=now - 10)

    code, out, _ = run_cli(capsys, "status", job)

    assert code == 0
    assert "total:       1,000" in out
    assert "skipped:     3 (not images)" in out
    assert "rate:        5.0 images/s over the last minute" in out
    assert "ETA:         2 min 40 s" in out
    assert "producer:    done" in out


def test_status_json_keeps_previous_keys(store: JobStore, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    job = create_job(store, "20260101-000000-0000000c")

    code, out, _ = run_cli(capsys, "status", job, "--json")

    assert code == 0
    assert PREVIOUS_STATUS_KEYS <= set(json.loads(out))


def test_status_json_listing_lost(store: JobStore, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    job = create_job(store, "20260101-000000-0000000d")
    store.add_listed(job, 64)

    printed = json.loads(run_cli(capsys, "status", job, "--json")[1])

    assert printed["total"] is None
    assert printed["listing"] is True
    assert printed["listed"] == 64
    assert printed["producer"] == "lost"
    assert printed["images_per_s_last_minute"] is None
    assert printed["source"] == "s3://photos/in/"


def test_status_json_rate_last_minute(store: JobStore, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    job = create_job(store, "20260101-000000-0000000e")
    now = time.time()
    store.record_batch(job, 0, succeeded=10, failed=0, now=now - 20)
    store.record_batch(job, 1, succeeded=30, failed=0, now=now - 10)

    printed = json.loads(run_cli(capsys, "status", job, "--json")[1])

    assert printed["images_per_s_last_minute"] == 3.0


# --- jobs ----------------------------------------------------------------------------------------------


@pytest.fixture
def three_jobs(store: JobStore) -> list[str]:
    """Three jobs created 10 minutes apart, returned oldest first: succeeded, running while listing, queued."""
    job_ids = [create_job(store, f"20260101-00000{index}-0000000{index}", source=f"s3://photos/in{index}/") for index in range(3)]
    for index, job_id in enumerate(job_ids):
        store.redis.zadd(JOBS_INDEX_KEY, {job_id: NOW + 600 * index})
        store.set_fields(job_id, created_at=repr(NOW + 600 * index))
    store.finish_listing(job_ids[0], images=4, skipped=0, batches=1)
    store.record_batch(job_ids[0], 0, succeeded=3, failed=1, errors={"not_found": 1})
    store.mark_succeeded(job_ids[0], finished_at=NOW + 60)
    store.add_listed(job_ids[1], 64)
    store.record_batch(job_ids[1], 0, succeeded=64, failed=0)
    return job_ids


def test_jobs_newest_first(make_client: Callable[..., Client], three_jobs: list[str]) -> None:
    assert [status.job_id for status in make_client().jobs()] == three_jobs[::-1]


def test_jobs_filtered_by_state(make_client: Callable[..., Client], three_jobs: list[str]) -> None:
    assert [status.job_id for status in make_client().jobs(state="succeeded")] == [three_jobs[0]]


def test_jobs_limited(make_client: Callable[..., Client], three_jobs: list[str]) -> None:
    assert [status.job_id for status in make_client().jobs(limit=2)] == three_jobs[:0:-1]


def test_jobs_unknown_state_rejected(make_client: Callable[..., Client], three_jobs: list[str]) -> None:
    with pytest.raises(ValueError, match="unknown job state 'paused'"):
        make_client().jobs(state="paused")


def test_jobs_skip_and_unindex_gone_ids(make_client: Callable[..., Client], store: JobStore, three_jobs: list[str]) -> None:
    store.redis.delete(JOB_KEY.format(job_id=three_jobs[1]))

    listed = [status.job_id for status in make_client().jobs()]

    assert listed == [three_jobs[2], three_jobs[0]]
    assert store.redis.zscore(JOBS_INDEX_KEY, three_jobs[1]) is None


def test_jobs_chunks_skip_nothing_after_removal(
    make_client: Callable[..., Client], store: JobStore, three_jobs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(producer.jobs, "LIST_CHUNK", 1)
    store.redis.delete(JOB_KEY.format(job_id=three_jobs[1]))

    assert [status.job_id for status in make_client().jobs()] == [three_jobs[2], three_jobs[0]]


def test_jobs_command_table(three_jobs: list[str], cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "jobs")
    lines = out.splitlines()

    assert code == 0
    assert lines[0].split()[:3] == ["JOB", "STATE", "DONE/TOTAL"]
    assert [line.split()[0] for line in lines[1:]] == three_jobs[::-1]
    assert lines[2].split()[1:4] == ["running", "64/listing…", "0"]
    assert lines[2].endswith("s3://photos/in1/")
    assert lines[3].split()[1:4] == ["succeeded", "4/4", "1"]


def test_jobs_command_json_filtered(three_jobs: list[str], cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "jobs", "--state", "running", "--json")
    printed = json.loads(out)

    assert code == 0
    assert [item["job_id"] for item in printed] == [three_jobs[1]]
    assert printed[0]["listing"] is True


def test_jobs_command_rejects_zero_limit(cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["jobs", "--limit", "0"])

    assert raised.value.code == 2
    assert "'0' must be 1 or more" in capsys.readouterr().err


# --- cancel without workers ----------------------------------------------------------------------------


def read_json(s3_client: BaseClient, bucket: str, key: str) -> dict[str, Any]:
    return json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_cancel_prints_summary(
    store: JobStore, cli_env: dict[str, str], make_bucket: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = make_bucket()
    job = create_job(store, "20260101-000000-000000c1", output=f"s3://{bucket}/out/")
    store.add_listed(job, 20)
    store.record_batch(job, 0, succeeded=8, failed=2, errors={"not_found": 2})

    code, out, _ = run_cli(capsys, "cancel", job)

    assert code == 0
    assert f"cancelled {job}: 10 images done with 2 failed (the total is unknown because the producer was still listing)" in out
    assert f"results so far: s3://{bucket}/out/{job}" in out
    assert f"summary: s3://{bucket}/out/{job}/{CANCELLED_MARKER}" in out


def test_cancel_summary_while_listing(store: JobStore, cli_env: dict[str, str], make_bucket: Callable[[], str], s3_client: BaseClient) -> None:
    bucket = make_bucket()
    job = create_job(store, "20260101-000000-000000c2", output=f"s3://{bucket}/out/")
    store.record_batch(job, 0, succeeded=8, failed=2, errors={"not_found": 2})
    store.record_batch(job, 1, succeeded=10, failed=0)

    main(["cancel", job])
    summary = read_json(s3_client, bucket, f"out/{job}/{CANCELLED_MARKER}")

    assert summary["state"] == "cancelled"
    assert (summary["batches_done"], summary["batches_total"], summary["total"]) == (2, None, None)
    assert (summary["succeeded"], summary["failed"], summary["errors"]) == (18, 2, {"not_found": 2})
    assert summary["output"] == f"s3://{bucket}/out/{job}"
    assert summary["labels"] == ["cat", "dog"]


def test_cancel_summary_after_listing(
    store: JobStore, cli_env: dict[str, str], make_bucket: Callable[[], str], s3_client: BaseClient, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = make_bucket()
    job = create_job(store, "20260101-000000-000000c3", output=f"s3://{bucket}/out/")
    store.finish_listing(job, images=40, skipped=1, batches=4)
    store.record_batch(job, 0, succeeded=10, failed=0)

    out = run_cli(capsys, "cancel", job)[1]
    summary = read_json(s3_client, bucket, f"out/{job}/{CANCELLED_MARKER}")

    assert f"cancelled {job}: 10 images done of 40 with 0 failed; workers drop the remaining batches" in out
    assert (summary["batches_done"], summary["batches_total"], summary["total"], summary["skipped"]) == (1, 4, 40, 1)


def test_late_batch_rewrites_cancel_summary(
    store: JobStore, cli_env: dict[str, str], make_bucket: Callable[[], str], s3_client: BaseClient, make_client: Callable[..., Client]
) -> None:
    bucket = make_bucket()
    job = create_job(store, "20260101-000000-000000c4", output=f"s3://{bucket}/out/")
    store.finish_listing(job, images=40, skipped=0, batches=4)
    store.record_batch(job, 0, succeeded=10, failed=0)
    client = make_client()
    client.job(job).cancel()

    store.record_batch(job, 1, succeeded=9, failed=1, errors={"decode_error": 1})
    refresh_cancel_summary(store, client.storage, job)
    summary = read_json(s3_client, bucket, f"out/{job}/{CANCELLED_MARKER}")

    assert summary["batches_done"] == 2
    assert (summary["succeeded"], summary["failed"]) == (19, 1)


def test_cancel_ended_job_exits_error(store: JobStore, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    job = create_job(store, "20260101-000000-000000c5")
    store.mark_succeeded(job, finished_at=time.time())

    code, out, err = run_cli(capsys, "cancel", job)

    assert code == EXIT_ERROR
    assert out == ""
    assert "had already ended (succeeded); nothing was cancelled" in err


# --- wait --progress -----------------------------------------------------------------------------------


def read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def test_wait_progress_when_not_terminal(store: JobStore, cli_env: dict[str, str]) -> None:
    job = create_job(store, "20260101-000000-000000d1")
    store.add_listed(job, 8)
    # A producer holds the job while it lists; without one, `wait` reports the producer lost and stops.
    ProducerLease(store.redis, job, 60.0).acquire()
    command = [sys.executable, "-m", "producer.cli", "wait", job, "--progress", "--timeout-s", "60"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process.stderr, lines), daemon=True)
    reader.start()
    try:
        first = lines.get(timeout=60)
        store.finish_listing(job, images=8, skipped=0, batches=2)
        store.record_batch(job, 0, succeeded=4, failed=0)
        store.record_batch(job, 1, succeeded=3, failed=1, errors={"not_found": 1})
        store.mark_succeeded(job, finished_at=time.time())
        process.wait(timeout=60)
        stdout = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    rest = []
    while not lines.empty():
        rest.append(lines.get())

    assert process.returncode == 0
    assert first.startswith("queued: 0/listing… images (8 enqueued), 0 failed, - images/s (last minute), ETA -")
    assert rest[-1].startswith("succeeded: [####################] 8/8 images, 1 failed,")
    assert "\r" not in first + "".join(rest)
    assert json.loads(stdout)["state"] == "succeeded"


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_status(done: int, state: str = "running") -> JobStatus:
    return JobStatus(
        job_id="20260101-000000-000000d2", state=state, total=100, done=done, failed=1, skipped=0, images_per_s=None,
        eta_s=90.0, created_at=NOW, started_at=NOW, finished_at=None, images_per_s_last_minute=12.34,
    )


def test_progress_line_redrawn_on_terminal() -> None:
    stream = TerminalStream()
    line = ProgressLine(stream)

    line.update(progress_status(10))
    line.update(progress_status(50))
    line.close()

    assert stream.getvalue().count("\r") == 2
    assert stream.getvalue().count("\n") == 1
    assert stream.getvalue().endswith(
        "\rrunning: [##########..........] 50/100 images, 1 failed, 12.3 images/s (last minute), ETA 1 min 30 s\n"
    )


def test_progress_lines_spaced_in_logs() -> None:
    stream = io.StringIO()
    line = ProgressLine(stream, log_interval_s=3600)

    line.update(progress_status(10))
    line.update(progress_status(20))
    line.update(progress_status(30))
    line.close()
    lines = stream.getvalue().splitlines()

    assert len(lines) == 2
    assert " 10/100 images" in lines[0]
    assert " 30/100 images" in lines[1]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (-3.0, "0 s"), (59.4, "59 s"), (60, "1 min 0 s"), (3725, "1 h 2 min"), (2 * 86400 + 7200, "2 d 2 h")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


# --- cancel inside a running batch, in this process ----------------------------------------------------


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.endpoint_url) as fault_proxy:
        yield fault_proxy


def upload_photos(s3_client: BaseClient, bucket: str, prefix: str, count: int) -> list[str]:
    for index in range(count):
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}/img-{index:04d}.jpg", Body=PHOTOS[index % len(PHOTOS)].read_bytes())
    return [f"s3://{bucket}/{prefix}/img-{index:04d}.jpg" for index in range(count)]


def test_running_batch_abandoned_on_cancel(
    redis_url: str, proxy: S3FaultProxy, s3_client: BaseClient, make_bucket: Callable[[], str], tiny_clip_dir: Path
) -> None:
    settings = Settings(
        redis_url=redis_url, s3_endpoint_url=proxy.endpoint_url, model=str(tiny_clip_dir),
        fetch_threads=1, model_batch_size=1, device="cpu", dtype="float32",
    )
    runtime = WorkerRuntime(settings)
    bucket = make_bucket()
    uris = upload_photos(s3_client, bucket, "slow", 20)
    job = new_job_id()
    runtime.store.create(job, build_spec(source=f"s3://{bucket}/slow/", labels=LABELS, output=f"s3://{bucket}/out/", model=str(tiny_clip_dir)))
    runtime.store.finish_listing(job, images=len(uris), skipped=0, batches=1)
    proxy.add_rule("delay", method="GET", key_contains="/slow/", delay_ms=200)
    cancelled_at: list[float] = []

    def cancel_after_three_reads() -> None:
        deadline = time.monotonic() + 60
        while len(proxy.injected) < 3 and time.monotonic() < deadline:
            time.sleep(POLL_S)
        runtime.store.cancel(job)
        cancelled_at.append(time.monotonic())

    canceller = threading.Thread(target=cancel_after_three_reads)
    canceller.start()
    try:
        outcome = process_batch(runtime, BatchMessage(job_id=job, batch=0, uris=uris))
        returned_at = time.monotonic()
    finally:
        canceller.join()
        runtime.pool.shutdown(cancel_futures=True)
        runtime.store.redis.close()
    stop_s = returned_at - cancelled_at[0]
    print(f"measured: batch abandoned {stop_s:.2f} s after the cancel, after {len(proxy.injected)} of {len(uris)} image reads")

    assert outcome.status == "abandoned_cancelled"
    assert stop_s < 2.0
    assert len(proxy.injected) < len(uris)
    assert [item["Key"] for item in s3_client.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])] == []
    assert runtime.store.fields(job)["batches_done"] == "0"


# --- cancel on a Celery worker process -----------------------------------------------------------------


@dataclass
class WorkerStack:
    redis_url: str
    proxy: S3FaultProxy
    client: Client
    worker: ManagedProcess


@pytest.fixture(scope="module")
def worker_stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, s3_server: S3Server) -> Iterator[WorkerStack]:
    """A private Redis and one worker process that reads S3 through the fault proxy. The client reads S3 directly."""
    env = {"CLIPFLEET_FETCH_THREADS": "2", "CLIPFLEET_MODEL_BATCH_SIZE": "2", "CLIPFLEET_FETCH_TIMEOUT_S": "5"}
    with RedisServer() as server, S3FaultProxy(s3_server.endpoint_url) as fault_proxy:
        worker = start_worker(tmp_path_factory.mktemp("worker-logs"), server.url, tiny_clip_dir, fault_proxy.endpoint_url, env)
        client = Client(Settings(redis_url=server.url, s3_endpoint_url=s3_server.endpoint_url, model=str(tiny_clip_dir)))
        try:
            yield WorkerStack(server.url, fault_proxy, client, worker)
        finally:
            worker.stop()
            client._celery.close()
            client.store.redis.close()


STARTED = re.compile(r"Job (\S+) batch (\d+) attempt \d+ started")
FINISHED = re.compile(r"Job (\S+) batch (\d+) attempt \d+ finished")
ABANDONED = re.compile(r"Job (\S+) batch (\d+) attempt \d+ abandoned")
DROPPED = re.compile(r"Job (\S+) batch (\d+) dropped: job is cancelled")
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):")


def log_lines(worker: ManagedProcess) -> list[str]:
    return worker.log_path.read_text(errors="replace").splitlines() if worker.log_path.exists() else []


def batches_matching(pattern: re.Pattern[str], lines: list[str], job_id: str) -> list[int]:
    return [int(match.group(2)) for line in lines if (match := pattern.search(line)) and match.group(1) == job_id]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s")
        time.sleep(POLL_S)


def test_worker_cancel_stops_running_job(worker_stack: WorkerStack, s3_client: BaseClient, make_bucket: Callable[[], str]) -> None:
    bucket = make_bucket()
    upload_photos(s3_client, bucket, "running", 96)
    worker_stack.proxy.add_rule("delay", method="GET", key_contains="/running/", delay_ms=250)
    job = worker_stack.client.submit(f"s3://{bucket}/running/", LABELS, f"s3://{bucket}/out/", batch_size=8)
    worker = worker_stack.worker
    wait_for(lambda: batches_matching(FINISHED, log_lines(worker), job.id) != [], 120, "a first finished batch")
    # Cancel while the log shows a batch started and not finished, so that one batch is mid-way.
    wait_for(lambda: len(batches_matching(STARTED, log_lines(worker), job.id)) > len(batches_matching(FINISHED, log_lines(worker), job.id)),
             60, "the start of another batch")
    assert job.cancel() is True
    cancelled_at = time.monotonic()

    def every_batch_accounted() -> bool:
        lines = log_lines(worker)
        ended = {*batches_matching(FINISHED, lines, job.id), *batches_matching(ABANDONED, lines, job.id), *batches_matching(DROPPED, lines, job.id)}
        return len(ended) == 12

    wait_for(every_batch_accounted, 60, "an outcome for each of the 12 batches")
    stop_s = time.monotonic() - cancelled_at
    lines = log_lines(worker)
    summary = json.loads(s3_client.get_object(Bucket=bucket, Key=f"out/{job.id}/{CANCELLED_MARKER}")["Body"].read())
    shards = [item["Key"] for item in s3_client.list_objects_v2(Bucket=bucket, Prefix=f"out/{job.id}/part-").get("Contents", [])]
    rows = list(job.results())
    status = job.status()
    worker_stack.proxy.clear_rules()
    print(
        f"measured: worker accounted for all 12 batches {stop_s:.2f} s after the cancel: "
        f"{len(batches_matching(FINISHED, lines, job.id))} finished, {len(batches_matching(ABANDONED, lines, job.id))} abandoned, "
        f"{len(batches_matching(DROPPED, lines, job.id))} dropped"
    )

    assert stop_s < CANCEL_STOP_LIMIT_S
    assert len(batches_matching(ABANDONED, lines, job.id)) == 1
    assert status.state == "cancelled"
    assert summary["state"] == "cancelled"
    assert summary["batches_total"] == 12
    assert summary["batches_done"] == len(shards)
    assert summary["succeeded"] + summary["failed"] == len(rows)
    assert len(rows) == status.done


def log_time(line: str) -> float:
    match = LOG_TIME.match(line)
    if match is None:
        raise ValueError(f"worker log line without a timestamp: {line!r}")
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_worker_drops_queued_tasks_fast(worker_stack: WorkerStack, s3_client: BaseClient, make_bucket: Callable[[], str]) -> None:
    bucket = make_bucket()
    upload_photos(s3_client, bucket, "blocker", 8)
    # One batch of 8 reads at 1 s each on 2 threads keeps the worker busy while the 1,000 tasks are queued.
    worker_stack.proxy.add_rule("delay", method="GET", key_contains="/blocker/", delay_ms=1000)
    client, worker = worker_stack.client, worker_stack.worker
    blocker = client.submit(f"s3://{bucket}/blocker/", LABELS, f"s3://{bucket}/out/", batch_size=8)
    wait_for(lambda: batches_matching(STARTED, log_lines(worker), blocker.id) != [], 60, "the start of the blocking batch")
    job = new_job_id()
    client.store.create(job, build_spec(source=f"s3://{bucket}/none/", labels=LABELS, output=f"s3://{bucket}/out/"))
    client.store.finish_listing(job, images=1000, skipped=0, batches=1000)
    client.store.cancel(job)
    sent_started = time.monotonic()
    with client._celery.producer_or_acquire() as producer:
        for batch in range(1000):
            message = BatchMessage(job_id=job, batch=batch, uris=[f"s3://{bucket}/none/{batch}.jpg"])
            client._celery.send_task(TASK_CLASSIFY_BATCH, args=[message.model_dump(mode="json")], queue=client.settings.queue, producer=producer)
    send_s = time.monotonic() - sent_started
    blocker_still_running = batches_matching(FINISHED, log_lines(worker), blocker.id) == []

    wait_for(lambda: len(batches_matching(DROPPED, log_lines(worker), job)) == 1000, DROP_ALL_LIMIT_S, "1,000 dropped tasks")
    all_dropped_s = time.monotonic() - sent_started
    drop_lines = [line for line in log_lines(worker) if (match := DROPPED.search(line)) and match.group(1) == job]
    drop_span_s = log_time(drop_lines[-1]) - log_time(drop_lines[0])
    worker_stack.proxy.clear_rules()
    print(
        f"measured: 1,000 tasks sent in {send_s:.2f} s (blocker still running: {blocker_still_running}); the worker "
        f"dropped them in {drop_span_s:.2f} s from first to last ({1000 / max(drop_span_s, 0.001):.0f} tasks/s), "
        f"{all_dropped_s:.2f} s after sending started"
    )

    assert blocker.wait(timeout_s=60, progress=False).state == "succeeded"
    assert all_dropped_s < DROP_ALL_LIMIT_S
    assert client.store.fields(job)["batches_done"] == "0"
