"""The Celery task strategy of the workers: Celery's default, except that a message whose request cannot be
built is rejected without a requeue instead of stopping the worker.

Celery 5.7 (`celery.worker.strategy.default`) builds a `Request` from each task message and hands it to the
pool. The consumer catches only InvalidTaskError, ContentDisallowed and DecodeError from that step. Any other
exception ends the worker with "Unrecoverable error", for example the ValueError of a body that is not
`[args, kwargs, embed]` or of a `timelimit` header that is not a pair. The message was delivered but not
acknowledged, so it goes back to the queue and stops the next worker too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from numbers import Real
from typing import Any

from celery.worker.strategy import default

logger = logging.getLogger(__name__)

# A log line quotes at most this many bytes of a rejected message body.
EXCERPT_BYTES = 80


def check_time_limits(value: Any) -> None:
    """Raise ValueError unless `value`, a `timelimit` header, is empty or a [hard, soft] pair of seconds.

    Celery 5.7 unpacks the header only when it hands the request to the pool, after it counted the request
    as reserved, so a bad value is rejected here, before Celery's strategy runs. Each limit is null or a
    number of seconds of at least 0.
    """
    if not value:
        return
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"timelimit header {value!r:.{EXCERPT_BYTES}} is not a [hard, soft] pair")
    for limit in value:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, Real) or limit < 0):
            raise ValueError(f"timelimit header {value!r:.{EXCERPT_BYTES}} contains {limit!r:.{EXCERPT_BYTES}}, which is not a number of seconds >= 0")


def reject_malformed_requests(task: Any, app: Any, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Return Celery's default strategy for `task`, wrapped to reject messages whose request cannot be built.

    A rejected message is logged with one ERROR line and rejected with requeue=False, so kombu's Redis
    transport removes it from the unacknowledged messages and never returns it to the queue.
    """
    handle_message = default(task, app, consumer, **options)

    def handle_or_reject(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
        try:
            check_time_limits(message.headers.get("timelimit"))
            if isinstance(body, dict):  # a protocol 1 message carries its headers in the body
                check_time_limits(body.get("timelimit"))
            return handle_message(message, body, ack, reject, callbacks, **kwargs)
        # InvalidTaskError, ContentDisallowed and DecodeError subclass none of these, so they still reach
        # Celery's consumer, which logs and rejects them itself.
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            # NOTE: an exception raised after Celery counted the request as reserved (in `task_reserved`)
            # leaves it counted. The time limit check above catches the one case known to fail there.
            if message.acknowledged:
                raise
            _log_rejected(consumer, message, e)
            message.reject_log_error(logger, consumer.connection_errors, requeue=False)
            return None

    return handle_or_reject


def _log_rejected(consumer: Any, message: Any, error: Exception) -> None:
    queues = sorted(queue.name for queue in getattr(consumer.task_consumer, "queues", ()))
    body = message.body
    if not isinstance(body, bytes):
        body = (body if isinstance(body, str) else repr(body)).encode("utf-8", errors="replace")
    logger.error(
        "Rejected task message %.80r (task %.80r) from queue %s without requeue: %s: %.200s; body (%d bytes) starts %r",
        message.headers.get("id"), message.headers.get("task"), ", ".join(queues) or "(unknown)",
        type(error).__name__, str(error), len(body), body[:EXCERPT_BYTES],
    )
