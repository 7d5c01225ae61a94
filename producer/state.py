"""Job state in Redis: the spec, the counters and the timestamps of each job.

Counters are idempotent per batch: a batch that is delivered twice is counted once, because its number
is added to a set and the counters move only when that set grows. Each update is one Lua script, so it
is atomic even with many workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from producer.constants import (
    FINAL_STATES,
    JOB_ATTEMPTS_KEY,
    JOB_BATCHES_KEY,
    JOB_FINALIZED_KEY,
    JOB_KEY,
    JOBS_INDEX_KEY,
    STATE_CANCELLED,
    STATE_FAILED,
    STATE_QUEUED,
    STATE_RUNNING,
    STATE_SUCCEEDED,
)
from producer.errors import JobNotFound
from producer.messages import check_job_id
from producer.redis_client import make_redis
from producer.spec import JobSpec

# KEYS: job hash, batch set. ARGV: batch number, succeeded, failed, now.
# Returns {1 if newly counted else 0, 1 if this call completed the job else 0}.
_RECORD_BATCH = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return {0, 0} end
redis.call('HINCRBY', KEYS[1], 'succeeded', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'failed', ARGV[3])
local finished = redis.call('HINCRBY', KEYS[1], 'batches_done', 1)
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[4])
if redis.call('HGET', KEYS[1], 'state') == 'queued' then redis.call('HSET', KEYS[1], 'state', 'running') end
local listed = redis.call('HGET', KEYS[1], 'listing_done') == '1'
local total = tonumber(redis.call('HGET', KEYS[1], 'batches_total'))
if listed and finished == total then return {1, 1} end
return {1, 0}
"""

# KEYS: job hash. ARGV: images, skipped, batches. Returns 1 if every batch had already finished.
_FINISH_LISTING = """
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'skipped', ARGV[2], 'batches_total', ARGV[3], 'listing_done', '1')
local finished = tonumber(redis.call('HGET', KEYS[1], 'batches_done'))
if finished == tonumber(ARGV[3]) then return 1 end
return 0
"""


# KEYS: job hash. ARGV: now.
_START_BATCH = """
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
if redis.call('HGET', KEYS[1], 'state') == 'queued' then redis.call('HSET', KEYS[1], 'state', 'running') end
return 0
"""


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one job. `done` counts finished images, successful or not; `failed` is part of `done`."""

    job_id: str
    state: str
    total: int | None
    done: int
    failed: int
    skipped: int
    images_per_s: float | None
    eta_s: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None = None

    @property
    def succeeded(self) -> int:
        return self.done - self.failed

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


class JobStore:
    """Reads and writes job state in Redis. Safe to share between threads (redis-py pools connections).

    Every method that takes a job id raises InvalidJobId (see `producer.messages.check_job_id`) for an id
    of another form, before any key is built from it.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._record = client.register_script(_RECORD_BATCH)
        self._finish = client.register_script(_FINISH_LISTING)
        self._start = client.register_script(_START_BATCH)

    @classmethod
    def from_url(cls, url: str) -> "JobStore":
        return cls(make_redis(url))

    def create(self, job_id: str, spec: JobSpec) -> None:
        fields = {
            "spec": spec.model_dump_json(),
            "state": STATE_QUEUED,
            "created_at": repr(time.time()),
            "listing_done": "0",
            "total": "0",
            "listed": "0",
            "skipped": "0",
            "batches_total": "0",
            "batches_done": "0",
            "succeeded": "0",
            "failed": "0",
        }
        key = _job_key(job_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping=fields)
            pipe.zadd(JOBS_INDEX_KEY, {job_id: time.time()})
            pipe.execute()

    def add_listed(self, job_id: str, images: int) -> None:
        """Add enqueued images to the running count shown while listing goes on."""
        self.redis.hincrby(_job_key(job_id), "listed", images)

    def finish_listing(self, job_id: str, images: int, skipped: int, batches: int) -> bool:
        """Record the final totals. Returns True when every batch had already finished, so the caller finalizes."""
        return bool(self._finish(keys=[_job_key(job_id)], args=[images, skipped, batches]))

    def record_batch(self, job_id: str, batch: int, succeeded: int, failed: int) -> tuple[bool, bool]:
        """Count a finished batch once. Returns `(counted, completed_job)`; a repeat returns `(False, False)`."""
        keys = [_job_key(job_id), _job_key(job_id, JOB_BATCHES_KEY)]
        counted, completed = self._record(keys=keys, args=[batch, succeeded, failed, repr(time.time())])
        return bool(counted), bool(completed)

    def is_batch_done(self, job_id: str, batch: int) -> bool:
        return bool(self.redis.sismember(_job_key(job_id, JOB_BATCHES_KEY), batch))

    def count_delivery(self, job_id: str, batch: int) -> int:
        """Count one more delivery of a batch and return how many there have been, this one included."""
        return int(self.redis.hincrby(_job_key(job_id, JOB_ATTEMPTS_KEY), str(batch), 1))

    def count_event(self, job_id: str, field: str, amount: int = 1) -> None:
        """Add `amount` to the job's counter `field`, such as `redeliveries` or `retries:s3`.

        These counters describe what happened on the way and are not idempotent: a redelivered batch
        counts its retries again.
        """
        self.redis.hincrby(_job_key(job_id), field, amount)

    def claim_finalization(self, job_id: str) -> bool:
        """Return True to exactly one caller per job: the one that writes the success marker."""
        return bool(self.redis.set(_job_key(job_id, JOB_FINALIZED_KEY), "1", nx=True))

    def set_fields(self, job_id: str, **fields: Any) -> None:
        self.redis.hset(_job_key(job_id), mapping={k: str(v) for k, v in fields.items()})

    def mark_batch_started(self, job_id: str) -> None:
        """Record the job's start time once, and move a queued job to running."""
        self._start(keys=[_job_key(job_id)], args=[repr(time.time())])

    def set_field_once(self, job_id: str, name: str, value: str) -> None:
        self.redis.hsetnx(_job_key(job_id), name, value)

    def fail(self, job_id: str, error: str) -> None:
        """Mark a job failed with the error that ends it, unless it already ended."""
        if self.state(job_id) not in FINAL_STATES:
            self.set_fields(job_id, state=STATE_FAILED, error=error, finished_at=repr(time.time()))

    def mark_succeeded(self, job_id: str, finished_at: float) -> None:
        self.set_fields(job_id, state=STATE_SUCCEEDED, finished_at=repr(finished_at))

    def cancel(self, job_id: str) -> bool:
        """Mark a job cancelled unless it already ended. Returns True when this call cancelled it."""
        fields = self._fields(job_id)
        if fields["state"] in FINAL_STATES:
            return False
        self.set_fields(job_id, state=STATE_CANCELLED, finished_at=repr(time.time()))
        return True

    def state(self, job_id: str) -> str:
        state = self.redis.hget(_job_key(job_id), "state")
        if state is None:
            raise JobNotFound(f"job {job_id!r} not found in Redis; check the id and CLIPFLEET_REDIS_URL")
        return state.decode()

    def spec(self, job_id: str) -> JobSpec:
        return JobSpec.model_validate_json(self._fields(job_id)["spec"])

    def fields(self, job_id: str) -> dict[str, str]:
        return self._fields(job_id)

    def _fields(self, job_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(_job_key(job_id))
        if not raw:
            raise JobNotFound(f"job {job_id!r} not found in Redis; check the id and CLIPFLEET_REDIS_URL")
        return {key.decode(): value.decode() for key, value in raw.items()}

    def status(self, job_id: str) -> JobStatus:
        fields = self._fields(job_id)
        listing_done = fields["listing_done"] == "1"
        total = int(fields["total"]) if listing_done else None
        done = int(fields["succeeded"]) + int(fields["failed"])
        started_at = _float_or_none(fields.get("started_at"))
        finished_at = _float_or_none(fields.get("finished_at"))
        images_per_s = _rate(done, started_at, finished_at)
        eta_s = None
        if images_per_s and total is not None and fields["state"] == STATE_RUNNING:
            eta_s = max(total - done, 0) / images_per_s
        return JobStatus(
            job_id=job_id,
            state=fields["state"],
            total=total,
            done=done,
            failed=int(fields["failed"]),
            skipped=int(fields["skipped"]),
            images_per_s=images_per_s,
            eta_s=eta_s,
            created_at=float(fields["created_at"]),
            started_at=started_at,
            finished_at=finished_at,
            error=fields.get("error") or None,
        )

    def listed(self, job_id: str) -> int:
        return int(self._fields(job_id)["listed"])


def _job_key(job_id: str, template: str = JOB_KEY) -> str:
    """Return the Redis key of `template` for a job. Raises InvalidJobId before an invalid id reaches a key."""
    return template.format(job_id=check_job_id(job_id))


def _float_or_none(value: str | None) -> float | None:
    return float(value) if value else None


def _rate(done: int, started_at: float | None, finished_at: float | None) -> float | None:
    if not done or started_at is None:
        return None
    elapsed_s = (finished_at or time.time()) - started_at
    return done / elapsed_s if elapsed_s > 0 else None
