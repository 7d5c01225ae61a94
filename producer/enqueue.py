"""The enqueueing loop of one job: list its sources, cut batches, publish each batch exactly once.

Batch numbers follow the listing order, which is deterministic, so a producer that takes over a job lists
the sources again, passes over the batches before the job's `next_batch` checkpoint, and continues.
Memory does not depend on the number of images: the listing streams and a batch is dropped once sent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from producer.checkpoint import JobEnded, LeaseLost, PublishGuard
from producer.constants import JOB_KEY, SPEC_INDEX_KEY
from producer.lease import ProducerLease
from producer.messages import BatchMessage
from producer.queue import BatchSender
from producer.settings import Settings
from producer.spec import JobSpec

logger = logging.getLogger(__name__)

# KEYS: job hash. Clears what ended the previous run; counters and counted batches are kept.
_RESTART = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'cancelled' or state == 'failed' then
  redis.call('HSET', KEYS[1], 'state', 'running')
end
redis.call('HSET', KEYS[1], 'listing_done', '0', 'next_batch', '0', 'error', '')
redis.call('HDEL', KEYS[1], 'finished_at')
return 0
"""

# Progress is logged at most this often while enqueueing.
PROGRESS_LOG_INTERVAL_S = 30.0


@dataclass
class EnqueueOutcome:
    """Counts of one enqueueing run. `batches` counts every batch of the listing, sent now or earlier."""

    batches: int
    sent: int
    passed_over: int  # batches before the checkpoint, or already done, that were not sent again
    cancelled: bool
    paused_s: float


def enqueue_listing(
    sender: BatchSender,
    lease: ProducerLease,
    job_id: str,
    batch_size: int,
    uris: Iterator[str],
    start_batch: int,
    is_done: Callable[[int], bool] = lambda batch: False,
    job_ended: Callable[[], bool] = lambda: False,
) -> EnqueueOutcome:
    """Publish the batches of `uris` numbered `start_batch` and above for which `is_done` is False.

    Stops early and returns `cancelled=True` when the job ends meanwhile (a cancel), which `job_ended` also
    reports while the producer waits for room in the queue. Raises LeaseLost when another producer took
    the job over. Listing and Redis errors propagate. Every batch sent before an error stays in the queue and
    in the checkpoint.
    """
    batch = sent = passed_over = listed = 0
    last_log = time.monotonic()

    def stop_waiting() -> None:
        if lease.lost.is_set():
            raise LeaseLost(f"job {job_id}: the producer lease was lost, so this producer stops enqueueing")
        if job_ended():
            raise JobEnded(f"job {job_id} ended while its producer waited for room in the queue")

    while chunk := list(itertools.islice(uris, batch_size)):
        listed += len(chunk)
        if batch < start_batch or is_done(batch):
            passed_over += 1
        else:
            if lease.lost.is_set():
                raise LeaseLost(f"job {job_id}: the producer lease was lost, so this producer stops enqueueing")
            try:
                message = BatchMessage(job_id=job_id, batch=batch, uris=chunk)
                if sender.send(message, PublishGuard(job_id, batch, lease.token, listed), stop_waiting):
                    sent += 1
                else:
                    passed_over += 1
            except JobEnded:
                logger.info("Job %s ended while enqueueing; stopped after batch %d", job_id, batch - 1)
                return EnqueueOutcome(batch, sent, passed_over, True, sender.paused_s)
        batch += 1
        if time.monotonic() - last_log >= PROGRESS_LOG_INTERVAL_S:
            last_log = time.monotonic()
            logger.info("Job %s: %d images listed, %d batches sent so far", job_id, listed, sent)
    return EnqueueOutcome(batch, sent, passed_over, False, sender.paused_s)


def spec_digest(spec: JobSpec) -> str:
    """Return a digest of the whole spec (sources, labels, templates, model, output, batch size, format, ...)."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def index_spec(client: redis.Redis, digest: str, job_id: str) -> None:
    """Record `job_id` as the latest job with this spec digest, for `submit --resume`."""
    client.set(SPEC_INDEX_KEY.format(digest=digest), job_id)


def job_for_spec(client: redis.Redis, digest: str) -> str | None:
    """Return the latest job with this spec digest whose record still exists, or None."""
    job_id = client.get(SPEC_INDEX_KEY.format(digest=digest))
    if job_id is None or not client.hexists(JOB_KEY.format(job_id=job_id.decode()), "state"):
        return None
    return job_id.decode()


def restart_job(client: redis.Redis, job_id: str) -> None:
    """Move a cancelled or failed job back to running, with its listing and checkpoint started over."""
    client.eval(_RESTART, 1, JOB_KEY.format(job_id=job_id))


def spawn_producer(job_id: str, lease_token: str, log_path: Path, settings: Settings) -> int:
    """Start `clipfleet resume JOB` in a new session, detached from this terminal, and return its process id.

    The child takes over the lease this process holds (same token), so no other producer can start between.
    It gets `settings` as CLIPFLEET_* environment variables, so it uses the same Redis, S3 and queue.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "producer.cli", "-v", "resume", job_id, "--lease-token", lease_token]
    env = {**os.environ, **settings_environment(settings)}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True, close_fds=True
        )
    logger.info("Job %s: detached producer started, process %d, log %s", job_id, process.pid, log_path)
    return process.pid


def settings_environment(settings: Settings) -> dict[str, str]:
    """Return `settings` as the CLIPFLEET_* environment variables that `Settings()` reads back, unset ones left out."""
    environment = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        environment[f"CLIPFLEET_{name.upper()}"] = text
    return environment


def detached_log_path(job_id: str) -> Path:
    """Return where a detached producer logs: `$XDG_STATE_HOME/clipfleet/` or `~/.local/state/clipfleet/`."""
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "clipfleet" / f"producer-{job_id}.log"
