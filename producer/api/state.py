"""What every request handler of the API server shares: settings, Redis, object storage and the Celery app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from fastapi import Request

from producer.client import Client
from producer.settings import Settings
from producer.storage import Storage


@dataclass
class ApiState:
    """The API server's connections. Thread-safe: redis-py and boto3 clients may be shared across threads."""

    settings: Settings
    client: Client

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiState:
        """Connect lazily: nothing is contacted before the first request. Raises ClipfleetError without a Redis URL."""
        return cls(settings, Client(settings))

    @property
    def redis(self) -> redis.Redis:
        return self.client.store.redis

    @property
    def storage(self) -> Storage:
        return self.client.storage

    @property
    def celery(self) -> Any:
        return self.client.celery


def get_state(request: Request) -> ApiState:
    """FastAPI dependency: the app's ApiState."""
    return request.app.state.api
