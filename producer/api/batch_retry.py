"""Retries of the realtime requests that embed a batch's texts, and the throttle they share.

A batch request whose realtime request fails with 400, 404 or 413 fails at once, because sending it again returns
the same error. Any other failure (429 queue_full, 503 no live worker or Redis unreachable, 504 timeout, 500 malformed
reply) is transient, so the request is sent again after an exponential backoff with jitter, at most
TEXT_MAX_ATTEMPTS times and TEXT_RETRY_LIMIT_S seconds after its first attempt, and never past the batch's
completion window. A 429 also pauses every request of the batch, so a full realtime queue is not sent more.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from producer.api.errors import REDIS_ERRORS, ApiError, redis_unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Statuses that fail a batch request at once. Every other error is retried.
FINAL_STATUSES = frozenset({400, 404, 413})
TEXT_MAX_ATTEMPTS = 30
TEXT_RETRY_LIMIT_S = 600.0
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 30.0
# How often a wait checks whether the driver stops or the batch is cancelled.
WAIT_SLICE_S = 0.5


class TextsInterrupted(Exception):
    """The driver stops or the batch was cancelled while a request waited to be sent again."""


class TextRetry:
    """Sends the realtime requests of one batch's texts with retries. Thread-safe: shared by the text threads.

    `deadline` is the Unix time at which the batch expires; `interrupted()` returns True when the waits must end
    (they then raise TextsInterrupted).
    """

    def __init__(
        self, deadline: float, interrupted: Callable[[], bool], *, max_attempts: int = TEXT_MAX_ATTEMPTS,
        limit_s: float = TEXT_RETRY_LIMIT_S, first_s: float = BACKOFF_FIRST_S, max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.deadline = deadline
        self.interrupted = interrupted
        self.max_attempts = max_attempts
        self.limit_s = limit_s
        self.first_s = first_s
        self.max_s = max_s
        self._lock = threading.Lock()
        self._paused_until = 0.0  # time.monotonic() before which no request of the batch is sent
        self.retries = 0

    def call(self, send: Callable[[], T], what: str) -> T:
        """Return `send()`, retrying transient failures; raise the last ApiError once the limits are reached.

        Redis connection errors count as the 503 `redis_unavailable`.
        """
        started = time.monotonic()
        for attempt in range(1, self.max_attempts + 1):
            self._wait(self._paused_until - time.monotonic())
            try:
                return send()
            except ApiError as e:
                error = e
            except REDIS_ERRORS:
                error = redis_unavailable()
            if error.status in FINAL_STATUSES or attempt == self.max_attempts:
                raise error
            delay_s = self._backoff_s(attempt, error)
            if time.time() + delay_s > self.deadline or time.monotonic() - started + delay_s > self.limit_s:
                raise error
            logger.warning("%s failed with %d %s (attempt %d); retrying in %.2f s", what, error.status, error.code, attempt, delay_s)
            self._count(error, delay_s)
            self._wait(delay_s)
        raise AssertionError("unreachable: the last attempt raises")

    def _backoff_s(self, attempt: int, error: ApiError) -> float:
        """Return a delay drawn between half and all of min(max_s, first_s * 2^(attempt-1)), at least Retry-After."""
        ceiling_s = min(self.max_s, self.first_s * 2 ** (attempt - 1))
        delay_s = random.uniform(ceiling_s / 2, ceiling_s)
        retry_after = (error.headers or {}).get("Retry-After", "")
        return max(delay_s, float(retry_after)) if retry_after.isdigit() else delay_s

    def _count(self, error: ApiError, delay_s: float) -> None:
        """Count a retry; on 429, pause every request of the batch for `delay_s`."""
        with self._lock:
            self.retries += 1
            if error.status == 429:
                self._paused_until = max(self._paused_until, time.monotonic() + delay_s)

    def _wait(self, delay_s: float) -> None:
        """Sleep `delay_s` seconds in slices; raise TextsInterrupted as soon as `interrupted()` is True."""
        if delay_s <= 0:
            return
        end = time.monotonic() + delay_s
        while True:
            if self.interrupted():
                raise TextsInterrupted()
            left_s = end - time.monotonic()
            if left_s <= 0:
                return
            time.sleep(min(left_s, WAIT_SLICE_S))
