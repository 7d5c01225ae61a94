"""The retry helper, the S3 error classification and the Redis client's retries through a real restart."""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest
import redis
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from urllib3.exceptions import ProtocolError

from producer.redis_client import make_redis
from producer.retry import RetryPolicy, RetryScope, call_with_retry
from producer.storage import is_transient_s3_error
from tests.support.servers import RedisServer

FAST = RetryPolicy(max_attempts=4, base_s=0.01, max_total_s=5.0)
SCOPE = RetryScope("s3_get", "s3://bucket/a.jpg", "job-1", 3)


class Transient(Exception):
    pass


class Permanent(Exception):
    pass


def failing_then(result: str, failures: list[Exception]) -> tuple[list[int], object]:
    """Return a call counter and a call that raises each of `failures` in turn, then returns `result`."""
    calls = [0]

    def call() -> str:
        calls[0] += 1
        if calls[0] <= len(failures):
            raise failures[calls[0] - 1]
        return result

    return calls, call


def is_transient(error: BaseException) -> bool:
    return isinstance(error, Transient)


def counter() -> tuple[list[tuple[str, str]], object]:
    events: list[tuple[str, str]] = []
    return events, lambda job_id, field: events.append((job_id, field))


def client_error(code: str, status: int) -> ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


def test_retry_then_success_counts_retries(caplog: pytest.LogCaptureFixture) -> None:
    events, count = counter()
    calls, call = failing_then("ok", [Transient("a"), Transient("b")])
    with caplog.at_level(logging.WARNING, logger="producer.retry"):
        assert call_with_retry(call, FAST, SCOPE, is_transient, count) == "ok"
    assert calls[0] == 3
    assert events == [("job-1", "retries:s3_get"), ("job-1", "retries:s3_get")]
    assert len(caplog.records) == 2
    assert "Job job-1 batch 3: s3_get s3://bucket/a.jpg failed on attempt 1 of 4" in caplog.records[0].getMessage()


def test_permanent_error_not_retried() -> None:
    events, count = counter()
    calls, call = failing_then("ok", [Permanent("gone")])
    with pytest.raises(Permanent):
        call_with_retry(call, FAST, SCOPE, is_transient, count)
    assert calls[0] == 1
    assert events == []


def test_give_up_after_max_attempts(caplog: pytest.LogCaptureFixture) -> None:
    events, count = counter()
    calls, call = failing_then("ok", [Transient(str(n)) for n in range(10)])
    with caplog.at_level(logging.WARNING, logger="producer.retry"), pytest.raises(Transient, match="3"):
        call_with_retry(call, FAST, SCOPE, is_transient, count)
    assert calls[0] == 4
    assert events.count(("job-1", "retries:s3_get")) == 3
    assert events.count(("job-1", "giveups:s3_get")) == 1
    assert caplog.records[-1].levelno == logging.ERROR
    assert "giving up" in caplog.records[-1].getMessage()


def test_total_time_bound_stops_retries() -> None:
    policy = RetryPolicy(max_attempts=100, base_s=0.05, max_total_s=0.3)
    calls, call = failing_then("ok", [Transient(str(n)) for n in range(100)])
    started = time.monotonic()
    with pytest.raises(Transient):
        call_with_retry(call, policy, SCOPE, is_transient)
    assert time.monotonic() - started < 1.0
    assert calls[0] < 100


def test_backoff_within_full_jitter_range() -> None:
    policy = RetryPolicy(max_attempts=6, base_s=0.2, max_total_s=1.0)
    rng = random.Random(1)
    for failures, ceiling_s in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (5, 1.0)]:
        delays = [policy.backoff_s(failures, rng) for _ in range(200)]
        assert min(delays) >= 0.0
        assert max(delays) <= ceiling_s
        assert max(delays) > ceiling_s * 0.8


def test_counter_failure_does_not_fail_call() -> None:
    def broken_count(job_id: str, field: str) -> None:
        raise redis.exceptions.ConnectionError("Redis is down")

    _, call = failing_then("ok", [Transient("a")])
    assert call_with_retry(call, FAST, SCOPE, is_transient, broken_count) == "ok"


def test_retry_without_job_not_counted() -> None:
    events, count = counter()
    _, call = failing_then("ok", [Transient("a")])
    assert call_with_retry(call, FAST, RetryScope("s3_put", "s3://b/k"), is_transient, count) == "ok"
    assert events == []


def test_policy_rejects_zero_attempts() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize(
    "error",
    [
        client_error("InternalError", 500),
        client_error("SlowDown", 503),
        client_error("ServiceUnavailable", 503),
        client_error("Throttling", 400),
        client_error("RequestTimeout", 400),
        client_error("BadGateway", 502),
        client_error("GatewayTimeout", 504),
        ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ProtocolError("Connection aborted."),
    ],
)
def test_transient_s3_errors(error: Exception) -> None:
    assert is_transient_s3_error(error)


@pytest.mark.parametrize(
    "error",
    [
        client_error("NoSuchKey", 404),
        client_error("AccessDenied", 403),
        client_error("InvalidRange", 416),
        ValueError("cannot identify image file"),
    ],
)
def test_permanent_s3_errors(error: Exception) -> None:
    assert not is_transient_s3_error(error)


@pytest.mark.timeout(60)
def test_redis_client_rides_through_restart(caplog: pytest.LogCaptureFixture) -> None:
    """A command sent while Redis is down for 2 s waits for the new server instead of raising."""
    with RedisServer() as server:
        client = make_redis(server.url)
        client.set("before", "1")
        server.stop()  # a private data directory and persistence off: the new server starts empty
        restarter = threading.Timer(2.0, server.start)
        restarter.start()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="producer.redis_client"):
            assert client.incr("after") == 1
        elapsed_s = time.monotonic() - started
        restarter.join()
        client.close()
    assert elapsed_s >= 1.5
    retry_lines = [record.getMessage() for record in caplog.records if "retrying" in record.getMessage()]
    assert retry_lines
    assert all(line.startswith("Redis INCRBY failed") for line in retry_lines)


@pytest.mark.timeout(60)
def test_redis_client_gives_up_after_bound() -> None:
    with RedisServer() as server:
        client = make_redis(server.url, retry_max_s=1.0)
        client.ping()
        server.stop()
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError):
            client.get("key")
        elapsed_s = time.monotonic() - started
        client.close()
    assert elapsed_s < 5.0
