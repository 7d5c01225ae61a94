"""Retries of transient failures with exponential backoff and full jitter, logged and counted per job.

`call_with_retry` runs one call up to `RetryPolicy.max_attempts` times. Before each new attempt it sleeps a
random time between 0 and `base_s * 2 ** (failures - 1)` seconds ("full jitter"), so many workers that
failed together do not retry together. No retry starts after `max_total_s` seconds since the first attempt
began, so one call takes at most `max_total_s` plus the duration of one attempt.

Every retry logs one WARNING and every give-up one ERROR, both naming the job id, batch, attempt, target
and error, and both are counted in the job's hash as `retries:<operation>` and `giveups:<operation>`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Called with (job_id, field) to add 1 to a counter in the job's hash, such as `JobStore.count_event`.
EventCounter = Callable[[str, str], None]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one call. Defaults match the `CLIPFLEET_S3_*`/`CLIPFLEET_RETRY_*` settings."""

    max_attempts: int = 4
    base_s: float = 0.2
    max_total_s: float = 20.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts!r}")
        if self.base_s < 0 or self.max_total_s < 0:
            raise ValueError(f"base_s and max_total_s must not be negative, got {self.base_s!r} and {self.max_total_s!r}")

    def backoff_s(self, failures: int, rng: random.Random | None = None) -> float:
        """Return the sleep before the next attempt after `failures` failed ones: uniform in [0, base_s * 2**(failures-1)]."""
        ceiling_s = min(self.base_s * 2 ** (failures - 1), self.max_total_s)
        return (rng or random).uniform(0.0, ceiling_s)


@dataclass(frozen=True)
class RetryScope:
    """The operation, target and ids that a retried call's log lines and counters name.

    `operation` becomes the counter suffix (`s3_get` counts as `retries:s3_get`). Without a `job_id` the
    retries are logged but not counted.
    """

    operation: str
    target: str
    job_id: str | None = None
    batch: int | None = None


def call_with_retry(
    call: Callable[[], T],
    policy: RetryPolicy,
    scope: RetryScope,
    is_transient: Callable[[BaseException], bool],
    count_event: EventCounter | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Return `call()`, retrying it while it raises an exception for which `is_transient` returns True.

    Raises the first permanent exception at once, and the last transient one when attempts or time run out.
    Thread-safe when `call` and `count_event` are.
    """
    started = time.monotonic()
    failures = 0
    while True:
        try:
            return call()
        except Exception as error:
            if not is_transient(error):
                raise
            failures += 1
            delay_s = policy.backoff_s(failures)
            out_of_time = time.monotonic() - started + delay_s > policy.max_total_s
            if failures >= policy.max_attempts or out_of_time:
                _report_give_up(scope, failures, policy, error, count_event)
                raise
            _report_retry(scope, failures, policy, delay_s, error, count_event)
        sleep(delay_s)


def _report_retry(
    scope: RetryScope, failures: int, policy: RetryPolicy, delay_s: float, error: BaseException, count_event: EventCounter | None
) -> None:
    logger.warning(
        "%s%s %s failed on attempt %d of %d, retrying in %.2f s: %s",
        _ids(scope), scope.operation, scope.target, failures, policy.max_attempts, delay_s, _describe(error),
    )
    _count(scope, f"retries:{scope.operation}", count_event)


def _report_give_up(
    scope: RetryScope, failures: int, policy: RetryPolicy, error: BaseException, count_event: EventCounter | None
) -> None:
    logger.error(
        "%s%s %s failed on attempt %d of %d, giving up (retries stop after %.1f s): %s",
        _ids(scope), scope.operation, scope.target, failures, policy.max_attempts, policy.max_total_s, _describe(error),
    )
    _count(scope, f"giveups:{scope.operation}", count_event)


def _count(scope: RetryScope, field: str, count_event: EventCounter | None) -> None:
    if scope.job_id is None or count_event is None:
        return
    try:
        count_event(scope.job_id, field)
    except Exception as e:  # a counter that cannot be written must not turn a retried call into a failed one
        logger.warning("Job %s: counting %s failed: %s", scope.job_id, field, _describe(e))


def _ids(scope: RetryScope) -> str:
    if scope.job_id is None:
        return ""
    return f"Job {scope.job_id} batch {scope.batch}: " if scope.batch is not None else f"Job {scope.job_id}: "


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
