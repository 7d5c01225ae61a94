"""The producer lease: which process enqueues a job, so that a crashed producer can be replaced by another.

A lease is the Redis key JOB_PRODUCER_KEY holding a random token, with a TTL that the holder refreshes
from a background thread. When the holder dies the key expires, and `clipfleet resume` may take the job
over. Publishing checks the token in the same script that pushes a batch (`producer.checkpoint`), so a
holder that was paused past the TTL cannot publish after the job was taken over.
"""

from __future__ import annotations

import logging
import secrets
import threading

import redis

from producer.constants import JOB_PRODUCER_KEY

logger = logging.getLogger(__name__)

# KEYS: lease key. ARGV: token, TTL in ms. Sets the lease when it is free or already ours. Returns 1 when held.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: lease key. ARGV: token, TTL in ms. Returns 1 when refreshed, 0 when the lease is no longer ours.
_REFRESH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: lease key. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def acquire_key(client: redis.Redis, key: str, token: str, ttl_ms: int) -> bool:
    """Set lease `key` to `token` with a TTL when it is free or already holds `token`. Returns whether `token` holds it."""
    return bool(client.eval(_ACQUIRE, 1, key, token, ttl_ms))


def refresh_key(client: redis.Redis, key: str, token: str, ttl_ms: int) -> bool:
    """Renew the TTL of lease `key` while it holds `token`. Returns False when the lease expired or another took it."""
    return bool(client.eval(_REFRESH, 1, key, token, ttl_ms))


def release_key(client: redis.Redis, key: str, token: str) -> None:
    """Delete lease `key` if it holds `token`. Idempotent."""
    client.eval(_RELEASE, 1, key, token)


class ProducerLease:
    """A claim on enqueueing one job. `acquire` once, then `start_refreshing`; `release` when done.

    Thread-safe: the refresh thread and the enqueueing thread share only the Redis client.
    """

    def __init__(self, client: redis.Redis, job_id: str, ttl_s: float, token: str | None = None) -> None:
        self.redis = client
        self.job_id = job_id
        self.ttl_s = ttl_s
        self.token = token or secrets.token_hex(16)
        self.key = JOB_PRODUCER_KEY.format(job_id=job_id)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lease when it is free or already has this token. Returns False when another producer has it."""
        return acquire_key(self.redis, self.key, self.token, self._ttl_ms)

    def remaining_s(self) -> float | None:
        """Return the seconds before the current holder's lease expires, or None when no producer has it."""
        ttl_ms = int(self.redis.pttl(self.key))
        return ttl_ms / 1000 if ttl_ms >= 0 else None

    def start_refreshing(self) -> None:
        """Refresh the lease every third of its TTL from a daemon thread until `release`."""
        self._thread = threading.Thread(target=self._refresh_loop, name=f"lease-{self.job_id}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop refreshing and delete the lease if this producer still holds it. Errors are logged, not raised."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            release_key(self.redis, self.key, self.token)
        except redis.exceptions.RedisError as e:
            logger.warning("Job %s: releasing the producer lease failed (%s); it expires in %g s", self.job_id, e, self.ttl_s)

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl_s * 1000)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                held = refresh_key(self.redis, self.key, self.token, self._ttl_ms)
            except redis.exceptions.RedisError as e:
                logger.warning("Job %s: refreshing the producer lease failed (%s); retrying", self.job_id, e)
                continue
            if not held:
                logger.error("Job %s: the producer lease expired or was taken over; this producer stops enqueueing", self.job_id)
                self.lost.set()
                return
