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
from producer.errors import ClipfleetError, InvalidJobSpec
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


class SourceChanged(ClipfleetError):
    """The sources no longer list the images that the job's batches were cut from, so resuming would lose
    some images and classify others twice."""


class ListingDigest:
    """A running BLAKE2b digest of a listing, batch by batch, so two listings can be compared at any batch."""

    def __init__(self) -> None:
        self.value = ""

    def add(self, uris: list[str]) -> str:
        body = "\n".join(uris).encode("utf-8", "surrogatepass")
        self.value = hashlib.blake2b(self.value.encode() + b"|" + body, digest_size=16).hexdigest()
        return self.value


@dataclass(frozen=True)
class ListingCheckpoint:
    """The last batch an earlier producer published, and the listing digest up to it."""

    batch: int
    digest: str

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "ListingCheckpoint | None":
        """Read the checkpoint of a job hash; None when nothing was published or the job predates digests."""
        next_batch = int(fields.get("next_batch", 0))
        digest = fields.get("listing_digest", "")
        return cls(next_batch - 1, digest) if next_batch > 0 and digest else None

    def check(self, batch: int, digest: str, job_id: str) -> None:
        """Raise SourceChanged when the listing differs from the earlier one at this checkpoint's batch."""
        if batch == self.batch and digest != self.digest:
            raise SourceChanged(_changed_message(job_id, self.batch))


def _changed_message(job_id: str, batch: int) -> str:
    return (
        f"job {job_id}: its sources no longer list the same images in batches 0 to {batch}, so continuing would "
        f"lose some images and classify others twice. Cancel it (`clipfleet cancel {job_id}`) and submit the job "
        "again with `--skip-existing OUTPUT`, which leaves out the images it classified"
    )


def verify_listing(uris: Iterator[str], batch_size: int, checkpoint: ListingCheckpoint, job_id: str) -> None:
    """List up to `checkpoint`'s batch without sending anything, and raise SourceChanged when the listing differs."""
    digest = ListingDigest()
    for batch in range(checkpoint.batch + 1):
        chunk = list(itertools.islice(uris, batch_size))
        if not chunk:
            raise SourceChanged(_changed_message(job_id, checkpoint.batch))
        checkpoint.check(batch, digest.add(chunk), job_id)


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
    is_done: Callable[[int], bool] | None = None,
    job_ended: Callable[[], bool] = lambda: False,
    checkpoint: ListingCheckpoint | None = None,
) -> EnqueueOutcome:
    """Publish the batches of `uris` numbered `start_batch` and above for which `is_done` is False.

    Stops early and returns `cancelled=True` when the job ends meanwhile (a cancel), which `job_ended` also
    reports while the producer waits for room in the queue. Raises LeaseLost when another producer took
    the job over, and SourceChanged when the listing differs from `checkpoint`'s. Listing and Redis errors propagate. Every batch sent before an error stays in the queue and
    in the checkpoint.
    """
    batch = sent = passed_over = listed = 0
    last_log = time.monotonic()

    def stop_waiting() -> None:
        if lease.lost.is_set():
            raise LeaseLost(f"job {job_id}: the producer lease was lost, so this producer stops enqueueing")
        if job_ended():
            raise JobEnded(f"job {job_id} ended while its producer waited for room in the queue")

    digest = ListingDigest()
    while chunk := list(itertools.islice(uris, batch_size)):
        listed += len(chunk)
        digest.add(chunk)
        if checkpoint is not None:
            checkpoint.check(batch, digest.value, job_id)
        if batch < start_batch or (is_done is not None and is_done(batch)):
            passed_over += 1
        else:
            if lease.lost.is_set():
                raise LeaseLost(f"job {job_id}: the producer lease was lost, so this producer stops enqueueing")
            try:
                message = BatchMessage(job_id=job_id, batch=batch, uris=chunk)
                if sender.send(message, PublishGuard(job_id, batch, lease.token, listed, digest.value), stop_waiting):
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
    if checkpoint is not None and batch <= checkpoint.batch:
        raise SourceChanged(_changed_message(job_id, checkpoint.batch))
    return EnqueueOutcome(batch, sent, passed_over, False, sender.paused_s)


# The JobSpec fields that every digest covers. A field added to JobSpec later enters the digest only when it
# differs from its default, so jobs submitted before it existed keep their digest and `--resume` finds them.
DIGEST_BASE_FIELDS = frozenset(
    {"source", "labels", "templates", "output", "model", "model_revision", "batch_size", "top_k", "extensions", "format"}
)


def spec_digest(spec: JobSpec) -> str:
    """Return a digest of the whole spec (sources, labels, templates, model, output, batch size, format, ...)."""
    at_default = {
        name for name, field in JobSpec.model_fields.items()
        if name not in DIGEST_BASE_FIELDS and getattr(spec, name) == field.get_default(call_default_factory=True)
    }
    return hashlib.sha256(spec.model_dump_json(exclude=at_default).encode()).hexdigest()


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


def check_log_path(log_path: Path) -> None:
    """Create the log file's folder and open the file for appending. Raises InvalidJobSpec when that fails."""
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab"):
            pass
    except OSError as e:
        raise InvalidJobSpec(f"--log-file {str(log_path)!r} cannot be written: {e.strerror}; choose a writable path") from e


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
