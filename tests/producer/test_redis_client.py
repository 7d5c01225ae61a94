"""Retries of the job store's Redis client: bounded, logged with the job and batch, and counted."""

from __future__ import annotations

import logging

import pytest
import redis

from producer.embedded import free_port
from producer.redis_client import make_redis, redis_retry_scope


def test_retries_logged_with_job_and_batch(caplog: pytest.LogCaptureFixture) -> None:
    client = make_redis(f"redis://127.0.0.1:{free_port()}/0", retry_max_s=1.0)
    caplog.set_level(logging.WARNING, logger="producer.redis_client")

    with redis_retry_scope("job-a", 3) as scope, pytest.raises(redis.exceptions.ConnectionError):
        client.ping()

    retry_lines = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    give_up_lines = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert scope.retries == len(retry_lines)
    assert scope.retries > 0
    assert all(line.startswith("Job job-a batch 3: Redis PING failed") for line in retry_lines)
    assert len(give_up_lines) == 1
    assert "giving up" in give_up_lines[0]


def test_retries_outside_scope_not_attributed(caplog: pytest.LogCaptureFixture) -> None:
    client = make_redis(f"redis://127.0.0.1:{free_port()}/0", retry_max_s=0.5)
    caplog.set_level(logging.WARNING, logger="producer.redis_client")

    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()

    assert caplog.records
    assert not [record for record in caplog.records if "Job " in record.getMessage()]
