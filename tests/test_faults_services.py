"""Transient faults of S3 and Redis under whole jobs on real processes.

Each test runs a job on a real redis-server, moto's S3 server and real Celery worker processes, injects a
fault, then reads every shard row and checks that each input appears exactly once. The measured figures
(images, faults, retries, rows lost and duplicated, job time) are printed and written as JSON under
pytest's base temporary directory, in `fault-figures/`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from botocore.client import BaseClient
from PIL import Image

from producer import Client, Settings
from producer.constants import JOBS_INDEX_KEY
from producer.embedded import ManagedProcess
from producer.errors import JobNotFound
from producer.messages import BatchMessage
from producer.queue import BatchSender, make_celery
from producer.redis_client import make_redis
from producer.state import JobStore
from tests.support.s3proxy import S3FaultProxy
from tests.support.servers import RedisServer, S3Server, free_port
from tests.support.worker import start_worker
from workers.app import COLD_SHUTDOWN_LIMIT_S

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg")
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
WAIT_S = 240.0

# Each of the three fault kinds fires for 3.45 % of the requests that reach it, so 1 - 0.9655**3 = 10 % of
# all worker requests to S3 fail.
FAULT_FRACTION_PER_KIND = 0.0345
FAULT_KINDS = ("error_500", "slow_down_503", "drop")
S3_FAULT_IMAGES = 240
# With 10 % of requests failing, 6 attempts leave a 1e-6 chance per image that all of them fail, so a
# correct implementation does not produce an error row by bad luck. The default of 4 would leave 1e-4.
S3_FAULT_MAX_ATTEMPTS = "6"

RESTART_IMAGES = 300
RESTART_BATCH_SIZE = 10
RESTART_OUTAGE_S = 2.5
# The producer pauses while the queue contains this many tasks, so it is still enqueueing when Redis stops.
RESTART_HIGH_WATER = 4


def small_photos() -> list[bytes]:
    """The test photos as 96-pixel JPEGs, so hundreds of copies stay small."""
    encoded = []
    for name in PHOTOS:
        with Image.open(DATA / name) as image:
            image = image.convert("RGB")
            image.thumbnail((96, 96))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            encoded.append(buffer.getvalue())
    return encoded


def upload_images(s3_client: BaseClient, bucket: str, count: int) -> list[str]:
    """Store `count` copies of the test photos under `in/` and return their URIs."""
    photos = small_photos()
    uris = []
    for index in range(count):
        key = f"in/{index:04d}-{PHOTOS[index % len(PHOTOS)]}"
        s3_client.put_object(Bucket=bucket, Key=key, Body=photos[index % len(photos)])
        uris.append(f"s3://{bucket}/{key}")
    return uris


def count_uris(rows: list[dict[str, Any]], uris: list[str]) -> dict[str, int]:
    """Return how many inputs have no row, how many have more than one, and how many rows are not inputs."""
    seen = Counter(row["uri"] for row in rows)
    expected = set(uris)
    return {
        "lost": len(expected - set(seen)),
        "duplicated": sum(1 for uri, times in seen.items() if times > 1),
        "unexpected": len(set(seen) - expected),
    }


def record_figures(name: str, figures: dict[str, Any], base: Path) -> None:
    folder = base / "fault-figures"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"\n{name}: {json.dumps(figures, sort_keys=True)}")


def event_counts(fields: dict[str, str], prefix: str) -> dict[str, int]:
    return {name: int(value) for name, value in fields.items() if name.startswith(prefix)}


def make_client(redis_url: str, s3_endpoint_url: str, model_dir: Path, **overrides: Any) -> Client:
    return Client(Settings(redis_url=redis_url, s3_endpoint_url=s3_endpoint_url, model=str(model_dir), **overrides))


@pytest.fixture
def buckets(make_bucket: Callable[[], str]) -> dict[str, str]:
    return {"input": make_bucket(), "output": make_bucket()}


# --- S3 faults between the worker and S3 --------------------------------------------------------


@pytest.mark.timeout(360)
def test_s3_faults_absorbed_by_retries(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_clip_dir: Path,
    redis_url: str,
    s3_server: S3Server,
    s3_client: BaseClient,
    buckets: dict[str, str],
) -> None:
    """500, 503 SlowDown and dropped connections on 10 % of the worker's GETs and PUTs cost no result."""
    uris = upload_images(s3_client, buckets["input"], S3_FAULT_IMAGES)
    with S3FaultProxy(s3_server.endpoint_url, seed=11) as proxy:
        # One certain fault on a shard write, so PUT retries are exercised whatever the random draws.
        proxy.add_rule("error_500", method="PUT", key_contains="/part-", max_hits=1)
        for kind in FAULT_KINDS:
            proxy.add_rule(kind, fraction=FAULT_FRACTION_PER_KIND)
        worker = start_worker(tmp_path, redis_url, tiny_clip_dir, proxy.endpoint_url, {"CLIPFLEET_S3_MAX_ATTEMPTS": S3_FAULT_MAX_ATTEMPTS})
        try:
            client = make_client(redis_url, s3_server.endpoint_url, tiny_clip_dir)
            started = time.monotonic()
            job = client.submit(f"s3://{buckets['input']}/in/", LABELS, f"s3://{buckets['output']}/results/", batch_size=8)
            status = job.wait(timeout_s=WAIT_S, progress=False)
            job_s = time.monotonic() - started
        finally:
            worker.stop()
        injected = proxy.injected

    rows = list(job.results())
    fields = client.store.fields(job.id)
    retries = event_counts(fields, "retries:s3")
    giveups = event_counts(fields, "giveups:s3")
    log = worker.log_path.read_text(errors="replace")
    # Shard writes name their batch; the write of _SUCCESS.json names only the job.
    retry_lines = [line for line in log.splitlines() if f"Job {job.id}" in line and "retrying in" in line]
    batch_retry_lines = [line for line in retry_lines if f"Job {job.id} batch " in line]
    figures = {
        "images": len(uris),
        "batches": -(-len(uris) // 8),
        "faults_injected": len(injected),
        "faults_by_kind": dict(Counter(fault.action for fault in injected)),
        "faults_by_method": dict(Counter(fault.method for fault in injected)),
        "retries_counted": retries,
        "giveups_counted": giveups,
        "retry_log_lines": len(retry_lines),
        "retry_log_lines_with_batch": len(batch_retry_lines),
        "error_rows": sum(1 for row in rows if row["error"] is not None),
        "job_s": round(job_s, 1),
        **count_uris(rows, uris),
    }
    record_figures("s3_faults", figures, tmp_path_factory.getbasetemp())

    assert status.state == "succeeded"
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0
    assert figures["unexpected"] == 0
    assert len(rows) == len(uris)
    assert figures["error_rows"] == 0
    assert retries.get("retries:s3_get", 0) > 0
    assert retries.get("retries:s3_put", 0) > 0
    counted = sum(retries.values()) + sum(giveups.values())
    # Every injected fault makes exactly one attempt fail. A few more failures may come from connections that
    # a drop left half-closed in the client's pool.
    assert len(injected) <= counted <= len(injected) + max(2, len(injected) // 10)
    assert len(retry_lines) == sum(retries.values())
    assert len(batch_retry_lines) >= retries["retries:s3_get"]


# --- Redis restarts ----------------------------------------------------------------------------


class ProducerThread(threading.Thread):
    """Runs `Client.submit` and `Job.wait` on a thread, keeping the final status or the exception."""

    def __init__(self, client: Client, source: str, output: str) -> None:
        super().__init__(name="producer", daemon=True)
        self.client = client
        self.source = source
        self.output = output
        self.status: Any = None
        self.error: BaseException | None = None
        self.submitted_at: float | None = None

    def run(self) -> None:
        try:
            job = self.client.submit(self.source, LABELS, self.output, batch_size=RESTART_BATCH_SIZE)
            self.submitted_at = time.monotonic()
            self.status = job.wait(timeout_s=WAIT_S, progress=False)
        except BaseException as e:  # reported by the test's asserts
            self.error = e


def newest_job_id(store: JobStore, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        newest = store.redis.zrange(JOBS_INDEX_KEY, -1, -1)
        if newest:
            return newest[0].decode()
        time.sleep(0.1)
    raise TimeoutError(f"no job was created within {timeout_s} s")


def wait_for_done(store: JobStore, job_id: str, images: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while store.status(job_id).done < images:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} did not reach {images} finished images within {timeout_s} s")
        time.sleep(0.1)


def stop_redis(server: RedisServer, signum: int) -> None:
    """Stop the server with `signum` and wait until the process is gone, without starting a new one."""
    pid = server.pid
    if pid is None:
        raise RuntimeError("redis-server is not running")
    os.kill(pid, signum)
    deadline = time.monotonic() + 10.0
    while server.is_running():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"redis-server pid {pid} did not exit within 10 s of signal {signum}")
        time.sleep(0.05)


@pytest.fixture
def workers_for(tmp_path: Path, tiny_clip_dir: Path) -> Iterator[Callable[[str, str, int], list[ManagedProcess]]]:
    started: list[ManagedProcess] = []

    def start(redis_url: str, s3_endpoint_url: str, count: int) -> list[ManagedProcess]:
        for _ in range(count):
            started.append(start_worker(tmp_path, redis_url, tiny_clip_dir, s3_endpoint_url))
        return list(started)

    yield start
    for worker in started:
        worker.stop()


@pytest.mark.timeout(420)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_redis_restart_with_aof(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_clip_dir: Path,
    s3_server: S3Server,
    s3_client: BaseClient,
    buckets: dict[str, str],
    workers_for: Callable[[str, str, int], list[ManagedProcess]],
    signum: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stops mid-submit and mid-job and comes back from its append-only file on the same port."""
    uris = upload_images(s3_client, buckets["input"], RESTART_IMAGES)
    aof = ["--appendonly", "yes", "--appendfsync", "always"]
    with RedisServer(port=free_port(), data_dir=tmp_path / "redis", extra_args=aof) as server:
        workers = workers_for(server.url, s3_server.endpoint_url, 2)
        worker_pids = [worker.process.pid for worker in workers]
        client = make_client(server.url, s3_server.endpoint_url, tiny_clip_dir, queue_high_water=RESTART_HIGH_WATER)
        monitor = JobStore(make_redis(server.url))
        producer = ProducerThread(client, f"s3://{buckets['input']}/in/", f"s3://{buckets['output']}/results/")

        started = time.monotonic()
        with caplog.at_level("WARNING"):
            producer.start()
            job_id = newest_job_id(monitor)
            wait_for_done(monitor, job_id, RESTART_IMAGES // 5)
            done_before = monitor.status(job_id).done
            stop_redis(server, signum)
            time.sleep(RESTART_OUTAGE_S)
            server.restart()
            restarted = time.monotonic()
            producer.join(WAIT_S)
        job_s = time.monotonic() - started
        submitted_after_restart = producer.submitted_at is not None and producer.submitted_at > restarted
        rows = list(client.job(job_id).results())
        fields = client.store.fields(job_id)
        workers_alive = [worker.running() for worker in workers]
        # kombu keeps each delivered, unacknowledged message in the "unacked" hash. A message left there would
        # be delivered again after the visibility timeout.
        unacked_left = monitor.redis.hlen("unacked")
        queue_left = monitor.redis.llen(client.settings.queue)
        logs = [worker.log_path.read_text(errors="replace") for worker in workers]

    producer_retry_lines = [record.getMessage() for record in caplog.records if "retrying" in record.getMessage()]
    figures = {
        "signal": signal.Signals(signum).name,
        "images": len(uris),
        "batches": RESTART_IMAGES // RESTART_BATCH_SIZE,
        "workers": len(workers),
        "images_done_before_stop": done_before,
        "outage_s": RESTART_OUTAGE_S,
        "submit_finished_after_restart": submitted_after_restart,
        "producer_retry_log_lines": len(producer_retry_lines),
        "worker_broker_reconnects": sum(log.count("Connection to broker lost") for log in logs),
        "worker_redis_retry_log_lines": sum(
            1 for log in logs for line in log.splitlines() if "Redis " in line and "retrying in" in line
        ),
        "redeliveries": int(fields.get("redeliveries", 0)),
        "unacked_messages_left": unacked_left,
        "queued_messages_left": queue_left,
        "job_s": round(job_s, 1),
        "error_rows": sum(1 for row in rows if row["error"] is not None),
        **count_uris(rows, uris),
    }
    record_figures(f"redis_restart_aof_{figures['signal'].lower()}", figures, tmp_path_factory.getbasetemp())

    assert producer.error is None, f"the producer raised {producer.error!r}"
    assert producer.status is not None
    assert producer.status.state == "succeeded"
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0
    assert figures["unexpected"] == 0
    assert figures["error_rows"] == 0
    assert workers_alive == [True, True]
    assert [worker.process.pid for worker in workers] == worker_pids
    assert figures["worker_broker_reconnects"] >= len(workers)


@pytest.mark.timeout(300)
def test_redis_restart_without_persistence_reports_lost_job(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_clip_dir: Path,
    s3_server: S3Server,
    s3_client: BaseClient,
    buckets: dict[str, str],
    workers_for: Callable[[str, str, int], list[ManagedProcess]],
) -> None:
    """Without persistence a restart empties Redis: `wait` and `status` end with "not found" instead of hanging."""
    uris = upload_images(s3_client, buckets["input"], 120)
    with RedisServer(port=free_port(), data_dir=tmp_path / "redis") as server:
        workers = workers_for(server.url, s3_server.endpoint_url, 1)
        client = make_client(server.url, s3_server.endpoint_url, tiny_clip_dir)
        job = client.submit(f"s3://{buckets['input']}/in/", LABELS, f"s3://{buckets['output']}/results/", batch_size=RESTART_BATCH_SIZE)
        wait_for_done(client.store, job.id, 20)
        server.restart()  # SIGTERM, then a new empty server on the same port
        # The batch in flight during the restart finishes against the empty server and writes its counters
        # there, so the checks below also meet a job hash that contains counters but no spec or state.
        time.sleep(3.0)
        restarted = time.monotonic()

        with pytest.raises(JobNotFound, match="not found in Redis"):
            job.wait(timeout_s=60, progress=False)
        wait_error_s = time.monotonic() - restarted
        leftover_fields = [name.decode() for name in client.store.redis.hkeys(f"clipfleet:job:{job.id}")]

        env = dict(os.environ, CLIPFLEET_REDIS_URL=server.url)
        command = [sys.executable, "-m", "producer.cli"]
        status_run = subprocess.run([*command, "status", job.id], capture_output=True, text=True, timeout=60, env=env, check=False)
        wait_started = time.monotonic()
        wait_run = subprocess.run([*command, "wait", job.id], capture_output=True, text=True, timeout=60, env=env, check=False)
        cli_wait_s = time.monotonic() - wait_started
        queue_length = client.store.redis.llen(client.settings.queue)
        time.sleep(2.0)  # the worker meets the missing job on its next Redis read; it must survive that
        worker_alive = workers[0].running()

    shards = list(client.storage.list_names(f"s3://{buckets['output']}/results/{job.id}/"))
    figures = {
        "images": len(uris),
        "shards_written_before_restart": len(shards),
        "queue_length_after_restart": queue_length,
        "python_wait_error_s": round(wait_error_s, 2),
        "leftover_job_fields": sorted(leftover_fields),
        "cli_wait_exit_code": wait_run.returncode,
        "cli_wait_s": round(cli_wait_s, 2),
        "cli_wait_stderr": wait_run.stderr.strip().splitlines()[-1] if wait_run.stderr.strip() else "",
        "cli_status_exit_code": status_run.returncode,
    }
    record_figures("redis_restart_no_persistence", figures, tmp_path_factory.getbasetemp())

    assert wait_error_s < 10.0
    assert status_run.returncode != 0
    assert "not found" in status_run.stderr
    assert wait_run.returncode != 0
    assert "not found" in wait_run.stderr
    assert cli_wait_s < 30.0
    assert queue_length == 0
    assert worker_alive


@pytest.mark.timeout(120)
def test_publish_rides_through_redis_restart(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch published while Redis is down is retried until Redis is back, and lands in the queue once."""
    aof = ["--appendonly", "yes", "--appendfsync", "always"]
    with RedisServer(port=free_port(), data_dir=tmp_path / "redis", extra_args=aof) as server:
        settings = Settings(redis_url=server.url)
        sender = BatchSender(make_celery(settings), settings.queue, high_water=100)
        sender.publish(BatchMessage(job_id="job-publish", batch=0, uris=["s3://bucket/a.jpg"]))
        stop_redis(server, signal.SIGKILL)
        restarter = threading.Timer(RESTART_OUTAGE_S, server.restart)
        restarter.start()
        started = time.monotonic()
        try:
            with caplog.at_level("WARNING", logger="producer.queue"):
                sender.publish(BatchMessage(job_id="job-publish", batch=1, uris=["s3://bucket/b.jpg"]))
            publish_s = time.monotonic() - started
        finally:
            restarter.join()
            sender.close()
        queue_length = make_redis(server.url).llen(settings.queue)

    retry_lines = [record.getMessage() for record in caplog.records if "publishing to queue" in record.getMessage()]
    record_figures("publish_restart", {"outage_s": RESTART_OUTAGE_S, "publish_s": round(publish_s, 2), "publish_retries": len(retry_lines)}, tmp_path_factory.getbasetemp())
    assert publish_s >= RESTART_OUTAGE_S - 0.5
    assert queue_length == 2
    assert retry_lines
    assert all(line.startswith("Job job-publish batch 1: publishing to queue") for line in retry_lines)


@pytest.mark.timeout(240)
def test_duplicate_batch_messages_counted_once(
    tmp_path: Path,
    tiny_clip_dir: Path,
    s3_server: S3Server,
    s3_client: BaseClient,
    buckets: dict[str, str],
    workers_for: Callable[[str, str, int], list[ManagedProcess]],
) -> None:
    """A batch message published twice, as a publish retry after a lost reply does, adds no row and no count."""
    uris = upload_images(s3_client, buckets["input"], 60)
    with RedisServer() as server:
        workers = workers_for(server.url, s3_server.endpoint_url, 1)
        client = make_client(server.url, s3_server.endpoint_url, tiny_clip_dir, queue_high_water=2)
        producer = ProducerThread(client, f"s3://{buckets['input']}/in/", f"s3://{buckets['output']}/results/")
        producer.start()
        job_id = newest_job_id(client.store)
        sender = BatchSender(make_celery(client.settings), client.settings.queue, high_water=100)
        try:
            # Batch 0 is enqueued already, so its copy comes second. The producer has not reached batches 4
            # and 5 yet (it pauses while 2 tasks wait), so their copies come first.
            for batch in (0, 4, 5):
                chunk = uris[batch * RESTART_BATCH_SIZE:(batch + 1) * RESTART_BATCH_SIZE]
                sender.publish(BatchMessage(job_id=job_id, batch=batch, uris=chunk))
        finally:
            sender.close()
        producer.join(WAIT_S)
        rows = list(client.job(job_id).results())
        fields = client.store.fields(job_id)
    log = workers[0].log_path.read_text(errors="replace")
    # Each pair of deliveries of one batch is written and counted once; the other delivery is ignored, or
    # dropped when the job has already succeeded.
    skipped_lines = [
        line for line in log.splitlines()
        if f"Job {job_id} batch " in line and ("already counted; delivery ignored" in line or "dropped: job is succeeded" in line)
    ]

    assert producer.error is None, f"the producer raised {producer.error!r}"
    assert producer.status.state == "succeeded"
    assert len(skipped_lines) == 3
    assert count_uris(rows, uris) == {"lost": 0, "duplicated": 0, "unexpected": 0}
    assert int(fields["succeeded"]) == len(uris)
    assert int(fields["batches_done"]) == int(fields["batches_total"])


@pytest.mark.timeout(180)
def test_sigterm_with_redis_gone_exits_soon_after_grace(
    tmp_path: Path, tiny_clip_dir: Path, s3_server: S3Server, s3_client: BaseClient, buckets: dict[str, str]
) -> None:
    """SIGTERM reaches a worker whose batch retries a stopped Redis, as when `clipfleet run` is killed and its
    private Redis and worker stop together: the worker and its pool process are gone soon after the grace."""
    grace_s = 2.0
    upload_images(s3_client, buckets["input"], 40)
    with RedisServer(port=free_port(), data_dir=tmp_path / "redis") as server, S3FaultProxy(s3_server.endpoint_url) as proxy:
        # Slow reads keep the first batch running while Redis stops; writing its results then retries Redis.
        proxy.add_rule("delay", method="GET", key_contains="/in/", delay_ms=500)
        worker = start_worker(tmp_path, server.url, tiny_clip_dir, proxy.endpoint_url, {"CLIPFLEET_SHUTDOWN_GRACE_S": str(grace_s)})
        try:
            pool_pids = [child.pid for child in psutil.Process(worker.process.pid).children()]
            client = make_client(server.url, s3_server.endpoint_url, tiny_clip_dir)
            client.submit(f"s3://{buckets['input']}/in/", LABELS, f"s3://{buckets['output']}/results/", batch_size=RESTART_BATCH_SIZE)
            deadline = time.monotonic() + 60
            while "attempt 1 started" not in worker.log_tail(50) and time.monotonic() < deadline:
                time.sleep(0.1)
            stop_redis(server, signal.SIGKILL)
            signalled = time.monotonic()
            worker.process.send_signal(signal.SIGTERM)
            exit_code = worker.process.wait(timeout=90)
            exit_s = time.monotonic() - signalled
            pools_alive = [pid for pid in pool_pids if _alive(pid)]
            log = worker.log_path.read_text(errors="replace")
        finally:
            worker.stop()
    print(f"measured: SIGTERM with Redis gone: exit code {exit_code} after {exit_s:.1f} s, grace {grace_s:g} s")
    assert len(pool_pids) == 1
    # The batch was retrying Redis when the grace ended.
    assert "Redis" in log
    assert "retrying in" in log
    assert "Cold shutdown still running 5 s after it began; killing pool processes" in log
    assert exit_code == 1
    assert grace_s + COLD_SHUTDOWN_LIMIT_S <= exit_s <= grace_s + COLD_SHUTDOWN_LIMIT_S + 5
    assert pools_alive == []


def _alive(pid: int) -> bool:
    """Return whether process `pid` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
