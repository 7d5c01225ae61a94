"""Celery tasks: thin wrappers that validate the message and call the plain functions in `workers.pipeline`."""

from __future__ import annotations

import logging
from typing import Any

import redis
from pydantic import ValidationError

from producer.constants import TASK_CLASSIFY_BATCH
from producer.errors import StorageError
from producer.messages import BatchMessage
from workers.app import app, settings

logger = logging.getLogger(__name__)

# Failures expected to pass: the batch may succeed once the service or the model is back. Any other
# exception is retried too, because the delivery cap in `process_batch` bounds every retry loop.
TRANSIENT_ERRORS = (StorageError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@app.task(
    name=TASK_CLASSIFY_BATCH,
    autoretry_for=(Exception,),
    max_retries=settings.max_delivery_attempts,
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
)
def classify_batch(payload: dict[str, Any]) -> dict[str, Any]:
    """Classify one batch. Any exception retries the batch with exponential backoff and jitter; the delivery
    cap in `process_batch` records the batch's images as failed once retries run out."""
    from workers.pipeline import process_batch
    from workers.runtime import get_runtime

    try:
        message = BatchMessage.model_validate(payload)
    except ValidationError as e:
        logger.error("Dropped a malformed batch message: %s", e)
        return {"status": "invalid_message"}
    try:
        outcome = process_batch(get_runtime(), message)
    except TRANSIENT_ERRORS as e:
        logger.warning("Job %s batch %d failed and will be retried: %s", message.job_id, message.batch, e)
        raise
    except Exception:
        logger.exception("Job %s batch %d failed unexpectedly and will be retried", message.job_id, message.batch)
        raise
    return {"status": outcome.status, "succeeded": outcome.succeeded, "failed": outcome.failed}
