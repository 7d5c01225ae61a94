"""Job state in Redis: the spec, the counters and the timestamps of each job.

Counters are idempotent per batch: a batch that is delivered twice is counted once, because its number
is added to a set and the counters move only when that set grows. Each update is one Lua script, so it
is atomic even with many workers. What each batch added is kept per batch, so that a retry round can
replace a batch's counts with those of its rewritten shard.

The same scripts add a progress sample `"time:done"` (scored by time) to the job's progress set for
each counted batch, from which `status` computes the rate over the last minute. In a retry round `done`
is the round's count of re-classified images. Samples older than PROGRESS_KEEP_S are trimmed, and at most
PROGRESS_MAX_SAMPLES are kept, so the set stays small however fast batches finish.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from producer.constants import (
    ERRORS_FIELD_PREFIX,
    FINAL_STATES,
    GIVEUPS_FIELD_PREFIX,
    JOB_ATTEMPTS_KEY,
    JOB_BATCH_COUNTS_KEY,
    JOB_BATCHES_KEY,
    JOB_FINALIZED_KEY,
    JOB_KEY,
    JOB_PRODUCER_KEY,
    JOB_PROGRESS_KEY,
    JOB_ROUND_FINALIZED_KEY,
    JOBS_INDEX_KEY,
    REDELIVERIES_FIELD,
    RETRIES_FIELD_PREFIX,
    STATE_FAILED,
    STATE_QUEUED,
    STATE_RUNNING,
    STATE_SUCCEEDED,
)
from producer.errors import ClipfleetError, JobNotFound
from producer.messages import check_job_id
from producer.redis_client import make_redis
from producer.spec import JobSpec

# Age in seconds and maximum number of the progress samples kept per job. The rate needs only the last minute.
PROGRESS_KEEP_S = 300
PROGRESS_MAX_SAMPLES = 2000
RATE_WINDOW_S = 60.0

# Producer states that `JobStatus.producer` takes.
PRODUCER_ENQUEUEING = "enqueueing"
PRODUCER_DONE = "done"
PRODUCER_STOPPED = "stopped"
PRODUCER_LOST = "lost"

# Defines add_sample for the scripts below: it adds the sample "now:done" to a progress set, then drops the
# samples older than keep_s seconds before `now` and all but the newest max_samples.
_ADD_SAMPLE = """
local function add_sample(key, now, done, keep_s, max_samples)
  redis.call('ZADD', key, now, now .. ':' .. done)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (tonumber(now) - tonumber(keep_s)))
  redis.call('ZREMRANGEBYRANK', key, 0, -(tonumber(max_samples) + 1))
end
"""

# KEYS: job hash, batch set, batch counts hash, progress set. ARGV: batch number, succeeded, failed, now,
# batch counts as JSON {"succeeded", "failed", "errors": {code: rows}}, samples' keep seconds, max samples.
# Returns {1 if newly counted else 0, 1 if this call completed the job else 0}.
_RECORD_BATCH = _ADD_SAMPLE + """
if redis.call('HEXISTS', KEYS[1], 'state') == 0 then return {0, 0} end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return {0, 0} end
local succeeded = redis.call('HINCRBY', KEYS[1], 'succeeded', ARGV[2])
local failed = redis.call('HINCRBY', KEYS[1], 'failed', ARGV[3])
add_sample(KEYS[4], ARGV[4], succeeded + failed, ARGV[6], ARGV[7])
for code, rows in pairs(cjson.decode(ARGV[5])['errors']) do
  redis.call('HINCRBY', KEYS[1], 'errors:' .. code, rows)
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
local finished = redis.call('HINCRBY', KEYS[1], 'batches_done', 1)
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[4])
if redis.call('HGET', KEYS[1], 'state') == 'queued' then redis.call('HSET', KEYS[1], 'state', 'running') end
local listed = redis.call('HGET', KEYS[1], 'listing_done') == '1'
local total = tonumber(redis.call('HGET', KEYS[1], 'batches_total'))
if listed and finished == total then return {1, 1} end
return {1, 0}
"""

# KEYS: job hash. ARGV: now. Returns 1 when the job is now cancelled, 0 when it had ended or every batch
# of the job (or of its current retry round) is counted, so it is being finalized, -1 when it does not exist.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state == 'succeeded' or state == 'cancelled' or state == 'failed' then return 0 end
local round = tonumber(redis.call('HGET', KEYS[1], 'retry_round') or '0')
if round == 0 then
  local listed = redis.call('HGET', KEYS[1], 'listing_done') == '1'
  if listed and redis.call('HGET', KEYS[1], 'batches_done') == redis.call('HGET', KEYS[1], 'batches_total') then return 0 end
elseif redis.call('HGET', KEYS[1], 'round_batches_done') == redis.call('HGET', KEYS[1], 'round_batches_total') then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
return 1
"""

# KEYS: job hash. ARGV: field, amount. A job hash without a state (lost in a Redis restart without
# persistence) is not recreated with a lone counter.
_COUNT_EVENT = """
if redis.call('HEXISTS', KEYS[1], 'state') == 1 then redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""

# A retry batch replaces the counts its batch added before with the counts of its rewritten shard.
# KEYS: job hash, batch set, batch counts hash, progress set. ARGV: member of the batch set ("round:batch"),
# batch number, round, the batch's new counts as JSON, or "" to keep the old ones (its shard could not be
# rewritten), images re-classified, now, samples' keep seconds, max samples.
# Returns {1 if newly counted else 0, 1 if this call finished the job's current round else 0}.
_RECORD_RETRY_BATCH = _ADD_SAMPLE + """
if redis.call('HEXISTS', KEYS[1], 'state') == 0 then return {0, 0} end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return {0, 0} end
local old_json = redis.call('HGET', KEYS[3], ARGV[2])
if ARGV[4] ~= '' and old_json then
  local old = cjson.decode(old_json)
  local new = cjson.decode(ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'succeeded', new['succeeded'] - old['succeeded'])
  redis.call('HINCRBY', KEYS[1], 'failed', new['failed'] - old['failed'])
  for code, rows in pairs(old['errors']) do redis.call('HINCRBY', KEYS[1], 'errors:' .. code, -rows) end
  for code, rows in pairs(new['errors']) do redis.call('HINCRBY', KEYS[1], 'errors:' .. code, rows) end
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
end
if redis.call('HGET', KEYS[1], 'retry_round') ~= ARGV[3] then return {1, 0} end
local images = redis.call('HINCRBY', KEYS[1], 'round_images_done', ARGV[5])
add_sample(KEYS[4], ARGV[6], images, ARGV[7], ARGV[8])
local finished = redis.call('HINCRBY', KEYS[1], 'round_batches_done', 1)
if finished == tonumber(redis.call('HGET', KEYS[1], 'round_batches_total')) then return {1, 1} end
return {1, 0}
"""

# Starts the next retry round of a finished job whose every first-run batch was counted, and empties the
# progress set, whose samples count the images of the run before.
# KEYS: job hash, batch counts hash, progress set. ARGV: the round the caller last read, batches in the new round, now,
# then pairs of batch number and counts JSON, stored only for batches that have none yet.
# Returns the new round, or -1 when the job is not succeeded or cancelled, -2 when its round changed since
# the caller read it, -3 when some first-run batch never finished.
_START_RETRY = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'succeeded' and state ~= 'cancelled' then return -1 end
local round = tonumber(redis.call('HGET', KEYS[1], 'retry_round') or '0')
if round ~= tonumber(ARGV[1]) then return -2 end
local listed = redis.call('HGET', KEYS[1], 'listing_done') == '1'
if not listed or redis.call('HGET', KEYS[1], 'batches_done') ~= redis.call('HGET', KEYS[1], 'batches_total') then
  return -3
end
for i = 4, #ARGV, 2 do redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) end
local finished_at = redis.call('HGET', KEYS[1], 'finished_at')
if finished_at then redis.call('HSETNX', KEYS[1], 'first_finished_at', finished_at) end
redis.call('HSET', KEYS[1], 'state', 'running', 'retry_round', round + 1, 'round_batches_total', ARGV[2],
  'round_batches_done', '0', 'round_images_done', '0', 'round_started_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'finished_at', 'error')
redis.call('DEL', KEYS[3])
return round + 1
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


class RetryNotStarted(ClipfleetError):
    """A retry round was not started because of the job's state. The message names the state and what to do."""


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one job. `done` counts finished images, successful or not; `failed` is part of `done`.

    `errors` maps each error code to its number of result rows (they sum to `failed`). `retries` maps each
    kind of retried operation (such as `s3_get`) to its count, and `retries_total` sums them. `giveups` maps
    each kind to the operations whose retries ran out. `redeliveries` counts deliveries of a batch beyond
    its first. `retry_round` is 0 until `clipfleet retry` starts round 1.

    `images_per_s` is the average rate since the first batch started. `images_per_s_last_minute` is the
    rate over the progress samples of the last 60 s (in a retry round, of the round's re-classified
    images), None with fewer than two samples in that window. `eta_s` uses the last minute's rate when
    there is one, else the average, and is None while listing and in retry rounds.

    `listing` is True until the producer has enqueued every batch, and `listed` counts the images it has
    enqueued so far. `producer` is "enqueueing" while the job's producer lease key (JOB_PRODUCER_KEY)
    exists, "done" once listing finished, "stopped" when the job ended before listing finished, and "lost"
    when listing did not finish, the job has not ended and the lease key has expired: `clipfleet resume JOB`
    then finishes enqueueing.
    """

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
    errors: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    retries_total: int = 0
    redeliveries: int = 0
    retry_round: int = 0
    giveups: dict[str, int] = field(default_factory=dict)
    round_batches_done: int = 0
    round_batches_total: int = 0
    images_per_s_last_minute: float | None = None
    listing: bool = False
    listed: int = 0
    producer: str = PRODUCER_DONE
    source: str | list[str] | None = None
    skipped_existing: int = 0  # images left out because earlier jobs classified them (`submit --skip-existing`)

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
        self._record_retry = client.register_script(_RECORD_RETRY_BATCH)
        self._start_retry = client.register_script(_START_RETRY)
        self._count_event = client.register_script(_COUNT_EVENT)
        self._cancel = client.register_script(_CANCEL)

    @classmethod
    def from_url(cls, url: str) -> "JobStore":
        return cls(make_redis(url))

    def create(self, job_id: str, spec: JobSpec) -> None:
        fields = {
            # Fields left at their defaults are left out, so workers from before a field existed still read the spec.
            "spec": spec.model_dump_json(exclude_defaults=True),
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

    def record_batch(
        self,
        job_id: str,
        batch: int,
        succeeded: int,
        failed: int,
        errors: Mapping[str, int] | None = None,
        now: float | None = None,
    ) -> tuple[bool, bool]:
        """Count a finished first-run batch once. Returns `(counted, completed_job)`; a repeat returns `(False, False)`.

        `errors` maps error codes to their numbers of rows in the batch, added to the `errors:<code>` counters.
        A counted batch adds a progress sample at `now` (Unix seconds, the current time by default).
        """
        counts = batch_counts_json(succeeded, failed, errors or {})
        keys = [_job_key(job_id), _job_key(job_id, JOB_BATCHES_KEY), _job_key(job_id, JOB_BATCH_COUNTS_KEY), _job_key(job_id, JOB_PROGRESS_KEY)]
        args = [batch, succeeded, failed, _now_text(now), counts, PROGRESS_KEEP_S, PROGRESS_MAX_SAMPLES]
        counted, completed = self._record(keys=keys, args=args)
        return bool(counted), bool(completed)

    def record_retry_batch(
        self,
        job_id: str,
        batch: int,
        retry_round: int,
        counts: tuple[int, int, Mapping[str, int]] | None,
        images: int = 0,
        now: float | None = None,
    ) -> tuple[bool, bool]:
        """Count a finished batch of retry round `retry_round` once, and correct the job's counters.

        `counts` is `(succeeded, failed, errors by code)` over the batch's whole rewritten shard. The counters
        move by the difference from what the batch counted before, so an image that now succeeds moves
        from `failed` and its `errors:<code>` to `succeeded`. Pass None when the shard could not be rewritten:
        the batch then counts as done without changing the counters. Returns `(counted, completed_round)`;
        a repeat returns `(False, False)`, and so does a batch of a round other than the job's current one
        for `completed_round`. A batch of the current round adds `images`, the URIs it re-classified, to the
        round's progress sample at `now` (Unix seconds, the current time by default).
        """
        keys = [
            _job_key(job_id), _job_key(job_id, JOB_BATCHES_KEY), _job_key(job_id, JOB_BATCH_COUNTS_KEY), _job_key(job_id, JOB_PROGRESS_KEY),
        ]
        counts_json = "" if counts is None else batch_counts_json(*counts)
        args = [
            _batch_member(batch, retry_round), batch, retry_round, counts_json, images, _now_text(now),
            PROGRESS_KEEP_S, PROGRESS_MAX_SAMPLES,
        ]
        counted, completed = self._record_retry(keys=keys, args=args)
        return bool(counted), bool(completed)

    def start_retry(self, job_id: str, seen_round: int, batches: int, baseline: Mapping[int, str]) -> int:
        """Move a finished job to running in retry round `seen_round + 1`, with `batches` batches to wait for.

        `baseline` maps batch numbers to counts JSON (see `batch_counts_json`) read from their shards. They
        are stored only for batches that recorded no counts, as jobs counted before per-batch counts existed.
        Returns the new round. Raises RetryNotStarted when the job is neither succeeded nor cancelled, when
        another retry started since `seen_round` was read, or when some first-run batch never finished.
        """
        args: list[Any] = [seen_round, batches, repr(time.time())]
        for batch, counts in baseline.items():
            args.extend((batch, counts))
        keys = [_job_key(job_id), _job_key(job_id, JOB_BATCH_COUNTS_KEY), _job_key(job_id, JOB_PROGRESS_KEY)]
        result = int(self._start_retry(keys=keys, args=args))
        if result == -1:
            raise RetryNotStarted(
                f"job {job_id} is {self.state(job_id)}: only a succeeded or cancelled job can be retried; "
                "wait for a running job to finish (`clipfleet wait`), and submit a failed job again"
            )
        if result == -2:
            raise RetryNotStarted(f"job {job_id}: another retry started meanwhile; follow it with `clipfleet wait {job_id}`")
        if result == -3:
            raise RetryNotStarted(
                f"job {job_id} was cancelled before every batch finished, so some images have no result row; "
                "submit the job again instead"
            )
        return result

    def retry_round(self, job_id: str) -> int:
        """Return the job's current retry round: 0 before any `clipfleet retry`. Raises JobNotFound."""
        self.state(job_id)
        return int(self.redis.hget(_job_key(job_id), "retry_round") or 0)

    def is_batch_done(self, job_id: str, batch: int, retry_round: int = 0) -> bool:
        return bool(self.redis.sismember(_job_key(job_id, JOB_BATCHES_KEY), _batch_member(batch, retry_round)))

    def count_delivery(self, job_id: str, batch: int, retry_round: int = 0) -> int:
        """Count one more delivery of a batch in a round and return how many there have been, this one included."""
        return int(self.redis.hincrby(_job_key(job_id, JOB_ATTEMPTS_KEY), _batch_member(batch, retry_round), 1))

    def count_event(self, job_id: str, field: str, amount: int = 1) -> None:
        """Add `amount` to the job's counter `field`, such as `redeliveries` or `retries:s3`.

        These counters describe what happened on the way and are not idempotent: a redelivered batch
        counts its retries again. A job that is no longer in Redis is not recreated.
        """
        self._count_event(keys=[_job_key(job_id)], args=[field, amount])

    def claim_finalization(self, job_id: str, retry_round: int = 0) -> bool:
        """Return True to exactly one caller per job and round: the one that writes the success marker."""
        if retry_round == 0:
            key = _job_key(job_id, JOB_FINALIZED_KEY)
        else:
            key = JOB_ROUND_FINALIZED_KEY.format(job_id=check_job_id(job_id), round=int(retry_round))
        return bool(self.redis.set(key, "1", nx=True))

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
        """Mark a job cancelled unless it already ended or every batch of it (or of its retry round) is
        counted, in which case it is being finalized and will succeed. Returns True when this call cancelled it.

        The check and the change are one Lua script, and so is the counting of the last batch, so a job is
        never reported cancelled and then finalized as succeeded.
        """
        result = int(self._cancel(keys=[_job_key(job_id)], args=[repr(time.time())]))
        if result < 0:
            raise JobNotFound(f"job {job_id!r} not found in Redis; check the id and CLIPFLEET_REDIS_URL")
        return result == 1

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
        # A hash without a state holds only counters that a worker wrote after Redis lost the job (a restart
        # without persistence), so the job is gone all the same.
        if b"state" not in raw:
            raise JobNotFound(f"job {job_id!r} not found in Redis; check the id and CLIPFLEET_REDIS_URL")
        return {key.decode(): value.decode() for key, value in raw.items()}

    def status(self, job_id: str, now: float | None = None) -> JobStatus:
        """Return a snapshot of the job, read in one round trip. Raises JobNotFound.

        `now` (Unix seconds, the current time by default) ends the window of the rate over the last minute.
        """
        status = self.statuses([job_id], now)[job_id]
        if status is None:
            raise JobNotFound(f"job {job_id!r} not found in Redis; check the id and CLIPFLEET_REDIS_URL")
        return status

    def statuses(self, job_ids: Sequence[str], now: float | None = None) -> dict[str, JobStatus | None]:
        """Return the status of each job, None for a job that is not in Redis, read in one round trip.

        Raises InvalidJobId for an id of another form.
        """
        now = time.time() if now is None else now
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(_job_key(job_id))
                pipe.exists(_job_key(job_id, JOB_PRODUCER_KEY))
                pipe.zrangebyscore(_job_key(job_id, JOB_PROGRESS_KEY), now - RATE_WINDOW_S, "+inf")
            replies = pipe.execute()
        statuses: dict[str, JobStatus | None] = {}
        for index, job_id in enumerate(job_ids):
            raw, producer_alive, samples = replies[3 * index: 3 * index + 3]
            # A hash without a state holds only counters that a worker wrote after Redis lost the job (a
            # restart without persistence), so the job is gone all the same.
            if b"state" not in raw:
                statuses[job_id] = None
                continue
            fields = {key.decode(): value.decode() for key, value in raw.items()}
            statuses[job_id] = _status_from_fields(job_id, fields, bool(producer_alive), samples, now)
        return statuses

    def listed(self, job_id: str) -> int:
        return int(self._fields(job_id)["listed"])


def _job_key(job_id: str, template: str = JOB_KEY) -> str:
    """Return the Redis key of `template` for a job. Raises InvalidJobId before an invalid id reaches a key."""
    return template.format(job_id=check_job_id(job_id))


def _batch_member(batch: int, retry_round: int) -> str:
    """Return a batch's name in the batch set and the attempts hash: `7` in the first run, `2:7` in round 2."""
    return str(batch) if retry_round == 0 else f"{retry_round}:{batch}"


def batch_counts_json(succeeded: int, failed: int, errors: Mapping[str, int]) -> str:
    """Return the JSON that `JobStore` keeps per batch: `{"succeeded": n, "failed": n, "errors": {code: n}}`."""
    return json.dumps({"succeeded": succeeded, "failed": failed, "errors": dict(errors)}, sort_keys=True)


def error_counts(fields: Mapping[str, str]) -> dict[str, int]:
    """Return the non-zero `errors:<code>` counters of a job hash as `{code: rows}`, sorted by code."""
    return _prefixed_counts(fields, ERRORS_FIELD_PREFIX)


def retry_counts(fields: Mapping[str, str]) -> dict[str, int]:
    """Return the non-zero `retries:<kind>` counters of a job hash as `{kind: retries}`, sorted by kind."""
    return _prefixed_counts(fields, RETRIES_FIELD_PREFIX)


def giveup_counts(fields: Mapping[str, str]) -> dict[str, int]:
    """Return the non-zero `giveups:<kind>` counters of a job hash as `{kind: give-ups}`, sorted by kind."""
    return _prefixed_counts(fields, GIVEUPS_FIELD_PREFIX)


def _prefixed_counts(fields: Mapping[str, str], prefix: str) -> dict[str, int]:
    counts = {name[len(prefix):]: int(value) for name, value in fields.items() if name.startswith(prefix)}
    return {name: counts[name] for name in sorted(counts) if counts[name]}


def _status_from_fields(
    job_id: str, fields: Mapping[str, str], producer_alive: bool, samples: Sequence[bytes], now: float
) -> JobStatus:
    listing_done = fields["listing_done"] == "1"
    total = int(fields["total"]) if listing_done else None
    done = int(fields["succeeded"]) + int(fields["failed"])
    started_at = _float_or_none(fields.get("started_at"))
    finished_at = _float_or_none(fields.get("finished_at"))
    # The average rate is the first run's, because a retry round may start long after it ended.
    images_per_s = _rate(done, started_at, _float_or_none(fields.get("first_finished_at")) or finished_at or now)
    last_minute = rate_from_samples(samples)
    retry_round = int(fields.get("retry_round", 0))

    eta_s = None
    eta_rate = last_minute or images_per_s
    # A retry round re-runs images already counted in `done`, so no estimate is given for it.
    if eta_rate and total is not None and fields["state"] == STATE_RUNNING and not retry_round:
        eta_s = max(total - done, 0) / eta_rate

    retries = retry_counts(fields)
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
        errors=error_counts(fields),
        retries=retries,
        retries_total=sum(retries.values()),
        giveups=giveup_counts(fields),
        redeliveries=int(fields.get(REDELIVERIES_FIELD, 0)),
        retry_round=retry_round,
        round_batches_done=int(fields.get("round_batches_done", 0)),
        round_batches_total=int(fields.get("round_batches_total", 0)),
        images_per_s_last_minute=last_minute,
        listing=not listing_done,
        listed=int(fields.get("listed", 0)),
        skipped_existing=int(fields.get("skipped_existing") or 0),
        producer=_producer_state(fields["state"], listing_done, producer_alive),
        source=_spec_source(fields.get("spec")),
    )


def _producer_state(state: str, listing_done: bool, producer_alive: bool) -> str:
    if producer_alive:
        return PRODUCER_ENQUEUEING
    if listing_done:
        return PRODUCER_DONE
    return PRODUCER_STOPPED if state in FINAL_STATES else PRODUCER_LOST


def _spec_source(spec_json: str | None) -> str | list[str] | None:
    """Return the spec's source (a string, or the list of a job with several) without validating the whole spec.

    Returns None when the spec cannot be read.
    """
    try:
        source = json.loads(spec_json or "{}").get("source")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(source, list) and source and all(isinstance(item, str) for item in source):
        return source
    return source if isinstance(source, str) else None


def rate_from_samples(samples: Iterable[bytes | str]) -> float | None:
    """Return images per second between the oldest and the newest of the progress samples `"time:done"`.

    Returns None with fewer than two samples, when they span no time, or when `done` went down.
    """
    points = sorted(_parse_sample(sample) for sample in samples)
    if len(points) < 2:
        return None
    (first_s, first_done), (last_s, last_done) = points[0], points[-1]
    if last_s <= first_s or last_done < first_done:
        return None
    return (last_done - first_done) / (last_s - first_s)


def _parse_sample(sample: bytes | str) -> tuple[float, int]:
    text = sample.decode() if isinstance(sample, bytes) else sample
    time_text, _, done_text = text.rpartition(":")
    return float(time_text), int(done_text)


def _now_text(now: float | None) -> str:
    return repr(time.time() if now is None else float(now))


def _float_or_none(value: str | None) -> float | None:
    return float(value) if value else None


def _rate(done: int, started_at: float | None, finished_at: float) -> float | None:
    if not done or started_at is None:
        return None
    elapsed_s = finished_at - started_at
    return done / elapsed_s if elapsed_s > 0 else None
