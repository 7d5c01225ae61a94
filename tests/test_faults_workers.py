"""Worker deaths and shutdowns on real processes: time limits, SIGTERM, SIGKILL and a batch that kills its worker.

Each test runs real Celery worker processes against a redis-server process and moto's S3 server behind the
fault proxy (tests/support/s3proxy.py). A `delay` rule on image reads makes batches last long enough to
signal a worker in the middle of one. Every test prints a `measured:` line with its figures; run with `-s`
to see them.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from botocore.client import BaseClient

from producer import Client, Settings
from producer.constants import DEFAULT_QUEUE, JOB_ATTEMPTS_KEY
from producer.embedded import ManagedProcess
from tests.support.poison_app import (
    HANG_MARKER,
    POISON_APP_MODULE,
    POISON_MARKER,
    START_DELAY_ENV,
)
from tests.support.s3proxy import S3FaultProxy
from tests.support.servers import S3Server
from tests.support.worker import start_worker

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="sends POSIX signals to process groups")

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = sorted(DATA.glob("*.jpg"))
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
POLL_S = 0.1
# Fetch timeouts of 5 s let the tests use visibility timeouts from 10 s (the startup check needs 2 x).
FETCH_TIMEOUT_S = "5"
# kombu keeps delivered, unacknowledged messages in this hash until they are acknowledged or restored.
UNACKED_KEY = "unacked"
STARTED = re.compile(r"Job \S+ batch (\d+) attempt (\d+) started")
FINISHED = re.compile(r"Job \S+ batch (\d+) attempt (\d+) finished")


@dataclass
class FaultStack:
    """A proxy in front of moto, a bucket, a producer client and the workers a test starts."""

    redis_url: str
    proxy: S3FaultProxy
    bucket: str
    s3: BaseClient
    client: Client
    log_dir: Path
    model_dir: Path
    workers: list[ManagedProcess] = field(default_factory=list)

    def start_worker(self, env: dict[str, str], app_module: str = "workers.app") -> ManagedProcess:
        worker_env = {"CLIPFLEET_FETCH_TIMEOUT_S": FETCH_TIMEOUT_S, **env}
        worker = start_worker(self.log_dir, self.redis_url, self.model_dir, self.proxy.endpoint_url, worker_env, app_module)
        self.workers.append(worker)
        return worker

    def upload(self, prefix: str, names: list[str]) -> list[str]:
        """Store a copy of one of the test photos under each `prefix/name` and return the URIs."""
        for index, name in enumerate(names):
            body = PHOTOS[index % len(PHOTOS)].read_bytes()
            self.s3.put_object(Bucket=self.bucket, Key=f"{prefix}/{name}", Body=body)
        return [f"s3://{self.bucket}/{prefix}/{name}" for name in names]

    def submit(self, prefix: str, batch_size: int) -> Any:
        return self.client.submit(
            source=f"s3://{self.bucket}/{prefix}/", labels=LABELS, output=f"s3://{self.bucket}/out-{prefix}/", batch_size=batch_size,
        )

    def attempts(self, job_id: str) -> dict[str, int]:
        """Return the delivery count of each batch, from the job's attempts hash in Redis."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            raw = client.hgetall(JOB_ATTEMPTS_KEY.format(job_id=job_id))
        finally:
            client.close()
        return {key.decode(): int(value) for key, value in raw.items()}


@pytest.fixture
def stack(
    tmp_path: Path, redis_url: str, s3_server: S3Server, s3_client: BaseClient, make_bucket: Callable[[], str], tiny_clip_dir: Path
) -> Iterator[FaultStack]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    with S3FaultProxy(s3_server.endpoint_url) as proxy:
        # The producer lists and checks the output directly, so only the workers' reads pass the proxy.
        client = Client(Settings(redis_url=redis_url, s3_endpoint_url=s3_server.endpoint_url, model=str(tiny_clip_dir)))
        fault_stack = FaultStack(redis_url, proxy, make_bucket(), s3_client, client, log_dir, tiny_clip_dir)
        try:
            yield fault_stack
        finally:
            for worker in fault_stack.workers:
                worker.stop()


def log_lines(worker: ManagedProcess) -> list[str]:
    return worker.log_path.read_text(errors="replace").splitlines() if worker.log_path.exists() else []


def running_batch(worker: ManagedProcess, from_line: int = 0) -> int | None:
    """Return the batch that the worker's log shows started at or after `from_line` and not finished, or None."""
    running: int | None = None
    for line in log_lines(worker)[from_line:]:
        if match := STARTED.search(line):
            running = int(match.group(1))
        elif (match := FINISHED.search(line)) and running == int(match.group(1)):
            running = None
    return running


def wait_for_batch(worker: ManagedProcess, from_line: int = 0, timeout_s: float = 60.0) -> int:
    """Wait until the worker runs a batch that started at or after `from_line`, and return its number."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = running_batch(worker, from_line)
        if batch is not None:
            return batch
        time.sleep(POLL_S)
    raise TimeoutError(f"no batch started within {timeout_s} s:\n{worker.log_tail(20)}")


def row_counts(job: Any) -> Counter[str]:
    return Counter(row["uri"] for row in job.results())


def error_codes(job: Any) -> Counter[str | None]:
    return Counter(row["error"]["code"] if row["error"] else None for row in job.results())


def queue_lengths(redis_url: str) -> tuple[int, int]:
    """Return the number of messages waiting in the queue and the number delivered but unacknowledged."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.llen(DEFAULT_QUEUE)), int(client.hlen(UNACKED_KEY))
    finally:
        client.close()


def assert_each_input_once(counts: Counter[str], uris: list[str]) -> None:
    assert sorted(counts) == sorted(uris), "every input must have a row"
    assert max(counts.values()) == 1, "no input may have two rows"


# Visibility timeout and batch time limits.


def test_startup_rejects_short_visibility_timeout(stack: FaultStack) -> None:
    with pytest.raises(RuntimeError) as raised:
        stack.start_worker({"CLIPFLEET_VISIBILITY_TIMEOUT_S": "20", "CLIPFLEET_FETCH_TIMEOUT_S": "30"})
    message = str(raised.value)
    assert "exited with code 1" in message
    assert "CLIPFLEET_VISIBILITY_TIMEOUT_S=20 is below 2 x CLIPFLEET_FETCH_TIMEOUT_S=30" in message
    assert "at least 60" in message


def test_slow_batch_logs_warning(stack: FaultStack) -> None:
    # 8 images through 4 fetch threads at 6 s per read: about 13 s, above half of 20 s, below the 16 s limit.
    uris = stack.upload("slow", [f"img-{i:02d}.jpg" for i in range(8)])
    stack.proxy.add_rule("delay", method="GET", key_contains="/slow/", delay_ms=6000)
    worker = stack.start_worker({"CLIPFLEET_VISIBILITY_TIMEOUT_S": "20", "CLIPFLEET_FETCH_TIMEOUT_S": "10"})

    job = stack.submit("slow", batch_size=8)
    status = job.wait(timeout_s=60, progress=False)
    warnings = [line for line in log_lines(worker) if "more than half of CLIPFLEET_VISIBILITY_TIMEOUT_S=20 s" in line]

    assert status.state == "succeeded"
    assert len(warnings) == 1, log_lines(worker)[-30:]
    assert "WARNING" in warnings[0]
    assert "raise CLIPFLEET_VISIBILITY_TIMEOUT_S" in warnings[0]
    assert stack.attempts(job.id) == {"0": 1}
    assert_each_input_once(row_counts(job), uris)
    print(f"measured: slow batch warning: {warnings[0].split('took ')[1].split(',')[0]}")


def test_soft_time_limit_retries_batch(stack: FaultStack) -> None:
    # The first delivery reads 12 images at 4.5 s each through 4 threads (13.5 s), past the 9.6 s soft limit
    # of a 12 s visibility timeout. The rule stops after those 12 reads, so the retry reads at full speed.
    uris = stack.upload("limit", [f"img-{i:02d}.jpg" for i in range(12)])
    stack.proxy.add_rule("delay", method="GET", key_contains="/limit/", delay_ms=4500, max_hits=12)
    worker = stack.start_worker({"CLIPFLEET_VISIBILITY_TIMEOUT_S": "12"})

    started = time.monotonic()
    job = stack.submit("limit", batch_size=12)
    status = job.wait(timeout_s=60, progress=False)
    job_s = time.monotonic() - started
    lines = log_lines(worker)
    limit_lines = [line for line in lines if "reached its soft time limit of 9.6 s" in line]

    assert status.state == "succeeded"
    assert len(limit_lines) == 1, lines[-30:]
    assert "will be retried" in limit_lines[0]
    assert not [line for line in lines if "Hard time limit" in line]
    assert stack.attempts(job.id) == {"0": 2}
    assert "attempt 1 reached its soft time limit" in limit_lines[0]
    assert status.retries == {"batch": 1}
    assert status.redeliveries == 1
    assert error_codes(job) == Counter({None: 12})
    assert_each_input_once(row_counts(job), uris)
    print(f"measured: soft time limit: 12 images, 2 deliveries, job {job_s:.1f} s")


def test_hard_time_limit_requeues_batch(stack: FaultStack) -> None:
    # The second of two batches ignores its 8 s soft limit, so the 9 s hard limit kills its pool process on
    # each delivery. The message must go back to the queue each time, until the cap of 2 records the images.
    names = [f"{group}-{i}.jpg" for group in ("a", f"b-{HANG_MARKER}") for i in range(4)]
    uris = stack.upload("stuck", names)
    env = {"CLIPFLEET_VISIBILITY_TIMEOUT_S": "10", "CLIPFLEET_MAX_DELIVERY_ATTEMPTS": "2"}
    worker = stack.start_worker(env, app_module=POISON_APP_MODULE)

    started = time.monotonic()
    job = stack.submit("stuck", batch_size=4)
    status = job.wait(timeout_s=90, progress=False)
    job_s = time.monotonic() - started
    lines = log_lines(worker)
    hard_limits = [line for line in lines if "Hard time limit (9.0s) exceeded" in line]

    assert status.state == "succeeded"
    assert len(hard_limits) == 2, lines[-30:]
    assert stack.attempts(job.id) == {"0": 1, "1": 3}
    assert error_codes(job) == Counter({None: 4, "delivery_attempts_exceeded": 4})
    assert_each_input_once(row_counts(job), uris)
    print(f"measured: hard time limit: 8 images, {len(hard_limits)} hard kills, job {job_s:.1f} s")


# SIGTERM with a grace period.


def test_sigterm_finishes_batch_within_grace(stack: FaultStack) -> None:
    # Two batches of 8 at 1.5 s per read take about 3 s each. SIGTERM comes 0.5 s into the first, with 8 s of grace.
    grace_s = 8.0
    uris = stack.upload("term", [f"img-{i:02d}.jpg" for i in range(16)])
    stack.proxy.add_rule("delay", method="GET", key_contains="/term/", delay_ms=1500)
    env = {"CLIPFLEET_VISIBILITY_TIMEOUT_S": "30", "CLIPFLEET_SHUTDOWN_GRACE_S": str(grace_s)}
    first = stack.start_worker(env)

    started = time.monotonic()
    job = stack.submit("term", batch_size=8)
    batch = wait_for_batch(first)
    time.sleep(0.5)
    signalled = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    exit_code = first.process.wait(timeout=grace_s + 20)
    exit_s = time.monotonic() - signalled
    finished = [line for line in log_lines(first) if FINISHED.search(line)]

    assert exit_code == 0
    assert exit_s < grace_s, "the worker exits once the batch ends, before the grace period is over"
    assert not [line for line in log_lines(first) if "grace period of 8 s" in line]
    assert len(finished) == 1, "the running batch ends before the exit"
    assert f"batch {batch} attempt 1 finished" in finished[0]
    assert queue_lengths(stack.redis_url) == (1, 0), "the other batch stays queued and nothing stays unacknowledged"

    stack.start_worker(env)
    status = job.wait(timeout_s=60, progress=False)
    job_s = time.monotonic() - started
    assert status.state == "succeeded"
    assert stack.attempts(job.id) == {"0": 1, "1": 1}
    assert_each_input_once(row_counts(job), uris)
    print(f"measured: SIGTERM within grace: exit code {exit_code} after {exit_s:.1f} s, grace {grace_s:g} s, job {job_s:.1f} s")


def test_sigterm_hands_back_batch_after_grace(stack: FaultStack) -> None:
    # Two batches of 8 at 4 s per read take about 8 s each. SIGTERM comes 1 s into the first, with 2 s of grace.
    grace_s = 2.0
    uris = stack.upload("handback", [f"img-{i:02d}.jpg" for i in range(16)])
    rule = stack.proxy.add_rule("delay", method="GET", key_contains="/handback/", delay_ms=4000)
    env = {"CLIPFLEET_VISIBILITY_TIMEOUT_S": "30", "CLIPFLEET_SHUTDOWN_GRACE_S": str(grace_s)}
    first = stack.start_worker(env)

    started = time.monotonic()
    job = stack.submit("handback", batch_size=8)
    batch = wait_for_batch(first)
    time.sleep(1.0)
    signalled = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    exit_code = first.process.wait(timeout=grace_s + 20)
    exit_s = time.monotonic() - signalled

    assert grace_s <= exit_s <= grace_s + 5
    assert [line for line in log_lines(first) if "grace period of 2 s (CLIPFLEET_SHUTDOWN_GRACE_S) is over" in line]
    assert not [line for line in log_lines(first) if FINISHED.search(line)]
    # Both batches wait in the queue at once, long before the 30 s visibility timeout could restore one.
    assert queue_lengths(stack.redis_url) == (2, 0)

    stack.proxy.clear_rules()
    stack.start_worker(env)
    status = job.wait(timeout_s=60, progress=False)
    job_s = time.monotonic() - started
    attempts = stack.attempts(job.id)
    assert status.state == "succeeded"
    assert attempts[str(batch)] == 2
    assert attempts[str(1 - batch)] == 1
    assert_each_input_once(row_counts(job), uris)
    print(
        f"measured: SIGTERM past grace: exit code {exit_code} after {exit_s:.1f} s, grace {grace_s:g} s, "
        f"delayed reads {rule.hits}, job {job_s:.1f} s"
    )


# SIGKILL in the middle of batches.


def kill_group(worker: ManagedProcess) -> None:
    """SIGKILL the worker's main process and its pool process at once, as the OOM killer or a lost node would."""
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)


def kill_pool_process(worker: ManagedProcess) -> int:
    """SIGKILL only the worker's pool process and return its pid."""
    children = psutil.Process(worker.process.pid).children()
    assert len(children) == 1, f"expected one pool process, found {children}"
    children[0].kill()
    return children[0].pid


def test_sigkill_three_times_loses_nothing(stack: FaultStack) -> None:
    # 512 images in 16 batches of 32 on two workers. Each read waits 300 ms, so a batch takes about 2.5 s.
    images, batch_size = 512, 32
    uris = stack.upload("kill", [f"img-{i:04d}.jpg" for i in range(images)])
    stack.proxy.add_rule("delay", method="GET", key_contains="/kill/", delay_ms=300)
    env = {"CLIPFLEET_VISIBILITY_TIMEOUT_S": "10"}
    workers = [stack.start_worker(env), stack.start_worker(env)]

    started = time.monotonic()
    job = stack.submit("kill", batch_size=batch_size)
    kills: list[str] = []
    for victim, how in ((0, "group"), (1, "pool"), (0, "group")):
        worker = workers[victim]
        from_line = len(log_lines(worker)) if how == "pool" else 0
        wait_for_batch(worker, from_line)
        time.sleep(1.0)
        batch = running_batch(worker, from_line)
        assert batch is not None, "the kill must land in the middle of a batch"
        if how == "group":
            kill_group(worker)
            workers[victim] = stack.start_worker(env)  # a Deployment starts a replacement
        else:
            kill_pool_process(worker)
        kills.append(f"{how} kill in batch {batch} at {time.monotonic() - started:.1f} s")
        assert job.status().state == "running", "the job must outlast the kills"
    status = job.wait(timeout_s=150, progress=False)
    job_s = time.monotonic() - started

    counts = row_counts(job)
    attempts = stack.attempts(job.id)
    redeliveries = sum(count - 1 for count in attempts.values())
    lost = len(set(uris) - set(counts))
    duplicated = sum(1 for count in counts.values() if count > 1)
    print(
        f"measured: SIGKILL x3: {images} images, kills [{'; '.join(kills)}], redeliveries {redeliveries}, "
        f"attempts {sorted(attempts.items())}, lost {lost}, duplicated {duplicated}, job {job_s:.1f} s"
    )
    assert status.state == "succeeded"
    assert job_s < 150
    assert lost == 0
    assert duplicated == 0
    assert_each_input_once(counts, uris)
    assert error_codes(job) == Counter({None: images})
    assert len(attempts) == images // batch_size
    assert redeliveries >= 3, attempts


# A batch that kills its worker on every delivery.


def test_poison_batch_capped_then_recorded(stack: FaultStack) -> None:
    # Four batches of 5; the second one's images carry the marker that kills the pool process.
    names = [f"{group}-{i}.jpg" for group in ("a", f"b-{POISON_MARKER}", "c", "d") for i in range(5)]
    uris = stack.upload("capped", names)  # a prefix without the marker
    max_attempts = 3
    worker = stack.start_worker({"CLIPFLEET_MAX_DELIVERY_ATTEMPTS": str(max_attempts)}, app_module=POISON_APP_MODULE)
    main_pid = worker.process.pid
    first_pool_pid = psutil.Process(main_pid).children()[0].pid

    started = time.monotonic()
    job = stack.submit("capped", batch_size=5)
    status = job.wait(timeout_s=90, progress=False)
    job_s = time.monotonic() - started

    rows = {row["uri"]: row for row in job.results()}
    poisoned = [uri for uri in uris if POISON_MARKER in uri]
    lost_pool_processes = [line for line in log_lines(worker) if "exited with 'signal 9 (SIGKILL)'" in line]
    pool_pids = [child.pid for child in psutil.Process(main_pid).children()]
    print(
        f"measured: poison batch: {len(uris)} images, attempts {sorted(stack.attempts(job.id).items())}, "
        f"pool processes killed {len(lost_pool_processes)}, job {job_s:.1f} s"
    )
    assert status.state == "succeeded"
    assert job_s < 90
    # Deliveries 1 to 3 die in the pool process, and delivery 4 is over the cap and records the failure rows.
    assert stack.attempts(job.id) == {"0": 1, "1": max_attempts + 1, "2": 1, "3": 1}
    assert len(lost_pool_processes) == max_attempts
    assert {rows[uri]["error"]["code"] for uri in poisoned} == {"delivery_attempts_exceeded"}
    assert all(rows[uri]["error"] is None for uri in uris if uri not in poisoned)
    assert_each_input_once(row_counts(job), uris)
    assert worker.running(), "the main process survives its pool processes"
    assert len(pool_pids) == 1
    assert pool_pids[0] != first_pool_pid, "the main process forks a new pool process after each kill"


# A pool process that takes long to start.


def test_slow_pool_process_start_kept(stack: FaultStack) -> None:
    # Celery's main process kills a replacement pool process that has not reported within
    # worker_proc_alive_timeout (4 s unless set), and loading a model can take longer. The poisoned batch
    # kills the first pool process, so a replacement must start slowly and record the batch as failed.
    delay_s = 6.0
    names = [f"{group}-{i}.jpg" for group in ("a", f"b-{POISON_MARKER}") for i in range(3)]
    uris = stack.upload("slow-start", names)
    env = {START_DELAY_ENV: str(delay_s), "CLIPFLEET_MAX_DELIVERY_ATTEMPTS": "1"}
    worker = stack.start_worker(env, app_module=POISON_APP_MODULE)

    job = stack.submit("slow-start", batch_size=3)
    status = job.wait(timeout_s=90, progress=False)
    lines = log_lines(worker)

    assert status.state == "succeeded"
    assert not [line for line in lines if "Timed out waiting for UP message" in line], lines[-30:]
    assert len([line for line in lines if "runs the model with torch threads=" in line]) == 2, lines[-30:]
    assert error_codes(job) == Counter({None: 3, "delivery_attempts_exceeded": 3})
    assert_each_input_once(row_counts(job), uris)
