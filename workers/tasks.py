"""Celery tasks: thin wrappers that validate the message and call the plain functions in `workers.pipeline`."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from producer.constants import (
    BATCH_RETRIES_FIELD,
    PUBLISHED_AT_HEADER,
    REDIS_RETRIES_FIELD,
    TASK_CLASSIFY_BATCH,
    TASK_EMBED,
)
from producer.errors import StorageError
from producer.messages import BatchMessage
from producer.realtime import EmbedTaskMessage
from producer.redis_client import RedisRetryScope, redis_retry_scope
from workers.app import app, delivery_limits, settings

logger = logging.getLogger(__name__)

# Failures expected to pass: the batch may succeed once the service or the model is back. Any other
# exception is retried too, because the delivery cap in `process_batch` bounds every retry loop.
TRANSIENT_ERRORS = (StorageError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
LIMITS = delivery_limits(settings)


@app.task(
    name=TASK_CLASSIFY_BATCH,
    autoretry_for=(Exception,),
    max_retries=settings.max_delivery_attempts,
    retry_backoff=2,
    retry_backoff_max=LIMITS.retry_backoff_max_s,
    retry_jitter=True,
    # Celery's strategy, rejecting without requeue a message whose request cannot be built.
    Strategy="workers.strategy:reject_malformed_requests",
)
def classify_batch(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Classify one batch, sent as one positional argument: the JSON object of a `BatchMessage`.

    A message of another shape (other arguments, missing or mistyped fields, an invalid job id) is logged as
    an error and acknowledged without a retry, because no retry can fix it. Any exception while processing
    retries the batch with exponential backoff and jitter, and so does a batch that reaches its soft time limit
    (`SoftTimeLimitExceeded`, see `workers.app.delivery_limits`). Once retries run out, the delivery cap in
    `process_batch` records the batch's images as failed.
    """
    from workers.pipeline import process_batch
    from workers.runtime import get_runtime

    message = parse_message(args, kwargs)
    if message is None:
        return {"status": "invalid_message"}
    record_queue_wait()
    started = time.monotonic()
    redis_scope = RedisRetryScope(message.job_id, message.batch)
    try:
        with redis_retry_scope(message.job_id, message.batch) as redis_scope:
            outcome = process_batch(get_runtime(), message)
    except SoftTimeLimitExceeded:
        logger.error(
            "Job %s batch %d attempt %d reached its soft time limit of %g s (%g x CLIPFLEET_VISIBILITY_TIMEOUT_S=%d) "
            "and will be retried; raise CLIPFLEET_VISIBILITY_TIMEOUT_S or lower the batch size",
            message.job_id, message.batch, _attempt(), LIMITS.soft_time_limit_s,
            LIMITS.soft_time_limit_s / LIMITS.visibility_timeout_s, LIMITS.visibility_timeout_s,
        )
        _count_batch_retry(message)
        raise
    except TRANSIENT_ERRORS as e:
        logger.warning("Job %s batch %d attempt %d failed and will be retried: %s", message.job_id, message.batch, _attempt(), e)
        _count_batch_retry(message)
        raise
    except Exception:
        logger.exception("Job %s batch %d attempt %d failed unexpectedly and will be retried", message.job_id, message.batch, _attempt())
        _count_batch_retry(message)
        raise
    finally:
        warn_if_slow(message, time.monotonic() - started)
        _count_redis_retries(message, redis_scope.retries)
    return {"status": outcome.status, "succeeded": outcome.succeeded, "failed": outcome.failed}


@app.task(name=TASK_EMBED, Strategy="workers.strategy:reject_malformed_requests")
def embed(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Embed the waiting requests of a realtime queue, sent as one positional argument: the JSON object of an
    `EmbedTaskMessage` (see `workers.realtime.embed_pending`).

    A message of another shape is logged as an error and dropped. Nothing is retried, because the requests'
    senders wait only until their deadlines. A failure after the requests were taken sends them error replies.
    Requests left waiting get one more task, sent with this worker's app (see `producer.realtime`).
    """
    from workers.realtime import embed_pending
    from workers.runtime import get_runtime

    if len(args) != 1 or kwargs:
        logger.error("Dropped an embed message with %d positional and %d keyword arguments; expected one JSON object", len(args), len(kwargs))
        return {"status": "invalid_message"}
    try:
        message = EmbedTaskMessage.model_validate(args[0])
    except ValidationError as e:
        logger.error("Dropped a malformed embed message: %s", _describe_errors(e))
        return {"status": "invalid_message"}
    replied = embed_pending(get_runtime(), message, worker=embed.request.hostname or "", celery=app)
    return {"status": "done", "replied": replied}


def warn_if_slow(message: BatchMessage, elapsed_s: float) -> None:
    """Log a warning when a batch ran longer than half the visibility timeout, the margin before redelivery."""
    if elapsed_s <= LIMITS.slow_batch_s:
        return
    logger.warning(
        "Job %s batch %d took %.1f s, more than half of CLIPFLEET_VISIBILITY_TIMEOUT_S=%d s; raise "
        "CLIPFLEET_VISIBILITY_TIMEOUT_S above twice the longest batch (or lower the batch size), because a batch "
        "still running after %g s is stopped and retried",
        message.job_id, message.batch, elapsed_s, LIMITS.visibility_timeout_s, LIMITS.soft_time_limit_s,
    )


def parse_message(args: tuple[Any, ...], kwargs: dict[str, Any]) -> BatchMessage | None:
    """Return the validated message of a task call, or None after logging why it is invalid."""
    if len(args) != 1 or kwargs:
        logger.error(
            "Dropped a batch message with %d positional and %d keyword arguments (%s); expected one JSON object",
            len(args), len(kwargs), _shorten(repr(sorted(kwargs))),
        )
        return None
    payload = args[0]
    try:
        return BatchMessage.model_validate(payload)
    except ValidationError as e:
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        batch = payload.get("batch") if isinstance(payload, dict) else None
        logger.error(
            "Dropped a malformed batch message (job id %s, batch %s): %s",
            _shorten(repr(job_id)), _shorten(repr(batch)), _describe_errors(e),
        )
        return None


def _describe_errors(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "message"
        problems.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def _shorten(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


def record_queue_wait() -> None:
    """Observe the queue wait of the current task's first delivery, from the header its producer set.

    Retries and redeliveries are left out: their wait includes a backoff or a visibility timeout, not the queue.
    Messages without the header (sent by other clients) are left out too.
    """
    from workers.metrics import record_safely

    request = classify_batch.request
    published_at = getattr(request, PUBLISHED_AT_HEADER, None)
    if request.retries or (request.delivery_info or {}).get("redelivered") or not isinstance(published_at, (int, float)):
        return
    wait_s = time.time() - published_at
    record_safely(lambda metrics: metrics.record_queue_wait(wait_s))


def _attempt() -> int:
    """Return the number of this run of the current task: 1, then 2 for its first retry, and so on."""
    return int(classify_batch.request.retries or 0) + 1


def _count_batch_retry(message: BatchMessage) -> None:
    """Count a retried batch as `retries:batch` in the job's hash, if Redis can be reached."""
    from workers.runtime import get_runtime

    try:
        get_runtime().store.count_event(message.job_id, BATCH_RETRIES_FIELD)
    except Exception:  # noqa: BLE001 - the batch's own error, being re-raised, matters more
        logger.warning("Could not count the retry of job %s batch %d", message.job_id, message.batch, exc_info=True)


def _count_redis_retries(message: BatchMessage, retries: int) -> None:
    """Count the Redis commands this batch retried as `retries:redis`, once Redis responds again."""
    if not retries:
        return
    from workers.runtime import get_runtime

    try:
        get_runtime().store.count_event(message.job_id, REDIS_RETRIES_FIELD, retries)
    except Exception:  # noqa: BLE001 - counting must not turn a finished batch into a failed one
        logger.warning("Could not count %d Redis retries of job %s batch %d", retries, message.job_id, message.batch, exc_info=True)
