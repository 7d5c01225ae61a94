"""The Redis client that producers and workers use for job state."""

from __future__ import annotations

import redis


def make_redis(url: str) -> redis.Redis:
    """Return a client for the Redis at `url`. Raises ValueError for a URL redis-py cannot parse."""
    return redis.Redis.from_url(url, health_check_interval=30, socket_timeout=30)
