"""Exactly-once publishing of a job's batches, with the producer's progress saved in the same Redis operation.

kombu's Redis transport publishes a task with one LPUSH. `CheckpointTransport` replaces that LPUSH, for
publishes made under a `PublishGuard`, with a Lua script that pushes the message and advances the job's
`next_batch` field together, and only while the caller holds the job's producer lease. So:

- a publish retried after a lost reply finds `next_batch` already past its batch and pushes nothing;
- a producer that resumes a job after a crash starts at `next_batch` and never sends a batch twice;
- a producer whose lease was taken over (it was paused past the lease's TTL) cannot publish any more.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from producer.constants import FINAL_STATES, JOB_KEY, JOB_PRODUCER_KEY

# KEYS: queue list, job hash, lease key. ARGV: message, batch, lease token, images listed up to this batch,
# digest of the listing up to this batch.
# Returns 1 when pushed, 0 when the batch was pushed before, -1 when the lease is not held, -2 when the job
# has ended (cancelled, failed or succeeded).
_PUBLISH = """
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return -1 end
local state = redis.call('HGET', KEYS[2], 'state')
if state == false or %s then return -2 end
local next_batch = tonumber(redis.call('HGET', KEYS[2], 'next_batch') or '0')
if next_batch > tonumber(ARGV[2]) then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'next_batch', tonumber(ARGV[2]) + 1, 'listed', ARGV[4], 'listing_digest', ARGV[5])
return 1
""" % " or ".join(f"state == '{state}'" for state in FINAL_STATES)

_GUARD: contextvars.ContextVar[PublishGuard | None] = contextvars.ContextVar("clipfleet_publish_guard", default=None)


class LeaseLost(Exception):
    """This producer no longer holds the job's lease, so another producer may be enqueueing it."""


class JobEnded(Exception):
    """The job was cancelled or ended while its batches were being enqueued."""


@dataclass
class PublishGuard:
    """The conditions of one guarded publish, and its outcome in `pushed` once the publish returns."""

    job_id: str
    batch: int
    lease_token: str
    listed: int  # images in this batch and every batch before it
    listing_digest: str = ""  # `ListingDigest` after this batch, so a later producer can check the listing is unchanged
    pushed: bool | None = None

    def keys(self) -> tuple[str, str]:
        return JOB_KEY.format(job_id=self.job_id), JOB_PRODUCER_KEY.format(job_id=self.job_id)


class guarded_publish:
    """Context manager that applies `guard` to the publishes made inside it, in this thread or task."""

    def __init__(self, guard: PublishGuard) -> None:
        self.guard = guard
        self._token: contextvars.Token[PublishGuard | None] | None = None

    def __enter__(self) -> PublishGuard:
        self._token = _GUARD.set(self.guard)
        return self.guard

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _GUARD.reset(self._token)


class CheckpointChannel(kombu_redis.Channel):
    """kombu's Redis channel, with guarded publishes pushed by the `_PUBLISH` script."""

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        guard = _GUARD.get()
        if guard is None:
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        job_key, lease_key = guard.keys()
        with self.conn_or_acquire() as client:
            arguments = (dumps(message), guard.batch, guard.lease_token, guard.listed, guard.listing_digest)
            result = int(client.eval(_PUBLISH, 3, key, job_key, lease_key, *arguments))
        if result == -1:
            raise LeaseLost(f"job {guard.job_id}: this producer no longer holds the job's lease, so it stops enqueueing")
        if result == -2:
            raise JobEnded(f"job {guard.job_id} ended while its batches were being enqueued")
        guard.pushed = result == 1


class CheckpointTransport(kombu_redis.Transport):
    """kombu's Redis transport with `CheckpointChannel`; pass it as `transport=` to a kombu Connection."""

    Channel = CheckpointChannel
