"""The Redis client that producers and workers use for job state.

Every client retries a command that fails with a connection error or a timeout, with exponential backoff
and jitter, for up to `REDIS_RETRY_MAX_S` seconds, so a Redis restart of a few seconds passes unnoticed
apart from one WARNING per retry. A command that never reached the server is safe to repeat. A command
whose reply was lost is sent again: the job store's Lua scripts are idempotent per batch, but a plain
counter such as `HINCRBY` may then count twice.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

logger = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_RETRY_MAX_S = 30.0
REDIS_RETRY_BASE_S = 0.25
REDIS_RETRY_CAP_S = 2.0
# An upper bound only: the time limit ends the retries long before this many.
REDIS_MAX_RETRIES = 1000
REDIS_SOCKET_TIMEOUT_S = 30.0
REDIS_CONNECT_TIMEOUT_S = 5.0

# The command a client is running, named in retry log lines. Pipelines and connection set-up show the default.
_operation: ContextVar[str] = ContextVar("redis_operation", default="command")


@dataclass
class RedisRetryScope:
    """The job and batch whose work the current thread is doing, and the Redis retries it has needed."""

    job_id: str
    batch: int
    retries: int = 0


_scope: ContextVar[RedisRetryScope | None] = ContextVar("redis_retry_scope", default=None)


@contextlib.contextmanager
def redis_retry_scope(job_id: str, batch: int) -> Iterator[RedisRetryScope]:
    """Name `job_id` and `batch` in the Redis retry log lines of this thread, and count the retries.

    The count is in the yielded scope's `retries`, so the caller can record it once Redis is back.
    """
    scope = RedisRetryScope(job_id, batch)
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(token)


def _scope_prefix() -> str:
    scope = _scope.get()
    return f"Job {scope.job_id} batch {scope.batch}: " if scope is not None else ""


class LoggedRetry(Retry):
    """A redis-py `Retry` that stops after `max_total_s` seconds and logs a WARNING for every retry.

    redis-py nests retries (connecting is retried inside a command's retry), so the time limit, not a count,
    bounds the total: an outer retry finds its own time already spent once an inner one gives up.
    """

    def __init__(self, max_total_s: float = REDIS_RETRY_MAX_S) -> None:
        super().__init__(
            ExponentialWithJitterBackoff(cap=REDIS_RETRY_CAP_S, base=REDIS_RETRY_BASE_S),
            REDIS_MAX_RETRIES,
            supported_errors=(ConnectionError, TimeoutError, socket.timeout),
        )
        self.max_total_s = max_total_s

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        """Return `do()`, retried like `redis.retry.Retry.call_with_retry` but bounded by `max_total_s` and logged."""
        self._backoff.reset()
        started = time.monotonic()
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                # The same order as redis-py 8.2: a policy-level rejection still runs `fail` for its clean-up.
                if self._is_retryable is not None and not self._is_retryable(error):
                    _call_fail(fail, error, failures + 1, with_failure_count)
                    raise
                if is_retryable is not None and not is_retryable(error):
                    raise
                failures += 1
                _call_fail(fail, error, failures, with_failure_count)
                delay_s = self._backoff.compute(failures)
                elapsed_s = time.monotonic() - started
                if failures > self._retries or elapsed_s + delay_s > self.max_total_s:
                    logger.error(
                        "%sRedis %s failed %d times in %.1f s; giving up: %s",
                        _scope_prefix(), _operation.get(), failures, elapsed_s, error,
                    )
                    raise
                logger.warning(
                    "%sRedis %s failed (attempt %d, %.1f s since the first); retrying in %.2f s: %s",
                    _scope_prefix(), _operation.get(), failures, elapsed_s, delay_s, error,
                )
                scope = _scope.get()
                if scope is not None:
                    scope.retries += 1
            time.sleep(delay_s)


def _call_fail(fail: Callable[..., Any], error: Exception, failures: int, with_failure_count: bool) -> None:
    if with_failure_count:
        fail(error, failures)
    else:
        fail(error)


class LoggedRedis(redis.Redis):
    """A `redis.Redis` that names the running command in the log lines of `LoggedRetry`."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        token = _operation.set(str(args[0]) if args else "command")
        try:
            return super().execute_command(*args, **options)
        finally:
            _operation.reset(token)


def make_redis(url: str, retry_max_s: float = REDIS_RETRY_MAX_S) -> redis.Redis:
    """Return a client for the Redis at `url` that retries connection errors and timeouts for up to `retry_max_s` seconds.

    Raises ValueError for a URL redis-py cannot parse. Thread-safe, like any redis-py client.
    """
    return LoggedRedis.from_url(
        url,
        health_check_interval=30,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        retry=LoggedRetry(retry_max_s),
        retry_on_error=[ConnectionError, TimeoutError],
    )
