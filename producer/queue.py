"""The Celery configuration shared by producers and workers, and the enqueueing of batch tasks."""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery

from producer.constants import TASK_CLASSIFY_BATCH
from producer.messages import BatchMessage
from producer.retry import RetryPolicy, RetryScope, call_with_retry
from producer.settings import Settings

logger = logging.getLogger(__name__)

# Publishing a batch waits 0, 1, 2, 3, 3, ... s between attempts, about 30 s in all, so it rides through a
# Redis restart. kombu reconnects between attempts.
PUBLISH_MAX_RETRIES = 12
PUBLISH_INTERVAL_STEP_S = 1.0
PUBLISH_INTERVAL_MAX_S = 3.0
# Reading the queue length retries for up to 30 s too.
QUEUE_LENGTH_RETRY = RetryPolicy(max_attempts=30, base_s=0.5, max_total_s=30.0)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Return the Celery settings for at-least-once delivery of JSON batch messages.

    - `task_acks_late`: a message is acknowledged after its batch finished, so a worker that dies mid-batch
      leaves the message to be delivered again instead of losing it.
    - `task_reject_on_worker_lost`: when a pool process is killed (for example by the OOM killer) the
      message goes back to the queue instead of being acknowledged as failed.
    - `worker_prefetch_multiplier = 1`: a worker reserves one batch at a time, so batches are not stranded
      behind a slow or dead worker.
    - `visibility_timeout`: Redis redelivers an unacknowledged message after this many seconds. It must exceed
      the longest batch, or a slow batch runs twice. kombu's default of one hour would delay the recovery of a
      killed worker's batch by up to an hour.
    - `broker_use_ssl`: for a rediss:// URL without `ssl_*` query parameters, kombu 5.7 would connect without
      checking the server's certificate. Requiring it matches redis-py, which checks by default. Any `ssl_*`
      parameter in the URL replaces this whole setting (kombu reads the URL's parameters last).
    """
    config: dict[str, Any] = {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
    }
    if settings.redis_url and urlsplit(settings.redis_url).scheme.lower() == "rediss":
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def make_celery(settings: Settings, name: str = "clipfleet") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


class BatchSender:
    """Sends batch tasks by name, pausing while the queue is longer than `high_water` tasks. Use from one thread.

    Publishing and reading the queue length retry connection errors for about 30 s each, so a Redis restart
    of a few seconds delays a submission without failing it.
    """

    def __init__(self, app: Celery, queue: str, high_water: int, poll_s: float = 1.0) -> None:
        self.app = app
        self.queue = queue
        self.high_water = high_water
        self.poll_s = poll_s
        self._connection: Any = None

    def send(self, message: BatchMessage) -> None:
        """Wait while the queue is full, then publish one batch task; see `publish`."""
        self._wait_for_room()
        self.publish(message)

    def publish(self, message: BatchMessage) -> None:
        """Publish one batch task. Raises kombu's OperationalError when Redis stays unreachable for about 30 s.

        When Redis stores a message but the connection drops before its reply, the retry publishes the batch
        a second time. Workers count a batch once by its number (`JobStore.record_batch`) and rewrite the same
        shard, so the duplicate changes no result.
        """

        def log_publish_retry(error: BaseException, interval_s: float) -> None:
            logger.warning(
                "Job %s batch %d: publishing to queue %s failed, retrying in %.1f s: %s",
                message.job_id, message.batch, self.queue, interval_s, error,
            )

        self.app.send_task(
            TASK_CLASSIFY_BATCH,
            args=[message.model_dump(mode="json")],
            queue=self.queue,
            retry=True,
            retry_policy={
                "max_retries": PUBLISH_MAX_RETRIES,
                "interval_start": 0,
                "interval_step": PUBLISH_INTERVAL_STEP_S,
                "interval_max": PUBLISH_INTERVAL_MAX_S,
                "errback": log_publish_retry,
            },
        )

    def queue_length(self) -> int:
        """Return the number of tasks waiting in the queue (the length of its Redis list)."""
        return call_with_retry(
            self._read_queue_length, QUEUE_LENGTH_RETRY, RetryScope("redis_llen", self.queue), self._drop_broken_connection
        )

    def _read_queue_length(self) -> int:
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        return int(self._connection.default_channel.client.llen(self.queue))

    def _drop_broken_connection(self, error: BaseException) -> bool:
        """Release the connection after a connection error, so the retry opens a new one. Returns whether to retry."""
        if not isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)):
            return False
        try:
            self.close()
        except (redis.exceptions.RedisError, OSError) as e:  # the connection is broken already, and a new one replaces it
            logger.debug("Releasing the broken connection failed: %s", e)
            self._connection = None
        return True

    def close(self) -> None:
        if self._connection is not None:
            self._connection.release()
            self._connection = None

    def _wait_for_room(self) -> None:
        waited = False
        while self.queue_length() >= self.high_water:
            if not waited:
                logger.info("Queue %s contains %d or more tasks; pausing until it drains", self.queue, self.high_water)
                waited = True
            time.sleep(self.poll_s)
