"""The state that every request handler of the API server shares: settings, Redis, object storage and the Celery app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from fastapi import Request

from producer.client import Client
from producer.redis_client import make_redis
from producer.settings import Settings
from producer.storage import Storage

# Request handlers retry a failed Redis command for this long only, and then the request fails with 503. A client
# waiting on an HTTP request is better served by a quick error than by the 30 s that batch producers wait for Redis.
API_REDIS_RETRY_MAX_S = 2.0


@dataclass
class ApiState:
    """The API server's connections. Thread-safe: redis-py and boto3 clients may be shared across threads."""

    settings: Settings
    client: Client
    # The client of request handlers, which retries for API_REDIS_RETRY_MAX_S. Background threads that must ride
    # through a Redis restart use `client.store.redis`, which retries for 30 s.
    redis: redis.Redis

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiState:
        """Connect lazily: nothing is contacted before the first request. Raises ClipfleetError without a Redis URL."""
        client = Client(settings)
        assert settings.redis_url is not None  # Client raised ClipfleetError otherwise
        return cls(settings, client, make_redis(settings.redis_url, retry_max_s=API_REDIS_RETRY_MAX_S))

    @property
    def storage(self) -> Storage:
        return self.client.storage

    @property
    def celery(self) -> Any:
        return self.client.celery


def get_state(request: Request) -> ApiState:
    """FastAPI dependency: the app's ApiState."""
    return request.app.state.api
