"""The Celery configuration shared by producers and workers, and the enqueueing of batch tasks."""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery

from producer.checkpoint import CheckpointTransport, PublishGuard, guarded_publish
from producer.constants import (
    DEFAULT_AHEAD_S,
    DEFAULT_LOW_WATER,
    DEFAULT_MAX_TASKS,
    PUBLISHED_AT_HEADER,
    TASK_CLASSIFY_BATCH,
)
from producer.messages import BatchMessage
from producer.retry import RetryPolicy, RetryScope, call_with_retry
from producer.settings import Settings

logger = logging.getLogger(__name__)

# Publishing a batch waits 0, 1, 2, 3, 3, ... s between attempts, about 30 s in all, so it rides through a
# Redis restart. kombu reconnects between attempts.
PUBLISH_MAX_RETRIES = 12
PUBLISH_INTERVAL_STEP_S = 1.0
PUBLISH_INTERVAL_MAX_S = 3.0
# The automatic high-water mark is never below this many tasks, so a fleet just starting has work queued.
MIN_AUTO_HIGH_WATER = 100
# The drain rate is measured over intervals of at least this length and smoothed over about this long.
RATE_MIN_INTERVAL_S = 1.0
RATE_SMOOTHING_S = 60.0
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


class Backpressure:
    """Decides when a producer pauses: at or above the high-water mark, until the queue drains to the low-water mark.

    With `high_water="auto"` the mark is the number of tasks the fleet finishes in `ahead_s` seconds, measured
    from how fast the queue drains while this producer watches it, between MIN_AUTO_HIGH_WATER and `max_tasks`.
    Before any drain is seen the mark is MIN_AUTO_HIGH_WATER. Not thread-safe.
    """

    def __init__(
        self, high_water: int | str, low_water: float, ahead_s: float, max_tasks: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.fixed_high_water = high_water if isinstance(high_water, int) else None
        self.low_water = low_water
        self.ahead_s = ahead_s
        self.max_tasks = max_tasks
        self.clock = clock
        self.rate_tasks_per_s: float | None = None  # smoothed rate at which workers take tasks from the queue
        self.paused = False
        self._last: tuple[float, int] | None = None  # (time, queue length) of the previous observation
        self._sent_since_last = 0

    @property
    def high_water(self) -> int:
        if self.fixed_high_water is not None:
            return self.fixed_high_water
        if self.rate_tasks_per_s is None:
            return min(MIN_AUTO_HIGH_WATER, self.max_tasks)
        wanted = int(self.rate_tasks_per_s * self.ahead_s)
        return max(min(MIN_AUTO_HIGH_WATER, self.max_tasks), min(wanted, self.max_tasks))

    def sent(self, tasks: int = 1) -> None:
        self._sent_since_last += tasks

    def needs_check(self) -> bool:
        """Return whether to read the queue length before the next send.

        It is read while paused, at least once per RATE_MIN_INTERVAL_S, and whenever this producer's own
        sends could have filled the queue to the high-water mark since the last reading. So other producers
        of the same queue can overfill it by what this one sends in that interval.
        """
        if self._last is None or self.paused:
            return True
        last_time, last_length = self._last
        return last_length + self._sent_since_last >= self.high_water or self.clock() - last_time >= RATE_MIN_INTERVAL_S

    def should_wait(self, queue_length: int) -> bool:
        """Record an observation of the queue's length and return whether to wait before sending more."""
        self._observe(queue_length)
        high = self.high_water
        if self.paused:
            self.paused = queue_length > int(high * self.low_water)
        else:
            self.paused = queue_length >= high
        return self.paused

    def _observe(self, queue_length: int) -> None:
        now = self.clock()
        if self._last is not None:
            last_time, last_length = self._last
            elapsed_s = now - last_time
            available = last_length + self._sent_since_last
            taken = available - queue_length
            if elapsed_s >= RATE_MIN_INTERVAL_S:
                # A second in which tasks waited and none was taken counts as a rate of 0. Workers that finish
                # their batches in step take tasks in bursts, and leaving out the seconds between the bursts
                # made the estimate about twice the real rate. Seconds with an empty queue are left out.
                if taken > 0 or (taken == 0 and available > 0):
                    rate = taken / elapsed_s
                    weight = min(1.0, elapsed_s / RATE_SMOOTHING_S)
                    previous = self.rate_tasks_per_s if self.rate_tasks_per_s is not None else rate
                    self.rate_tasks_per_s = previous + weight * (rate - previous)
                self._last = (now, queue_length)
                self._sent_since_last = 0
                return
            return
        self._last = (now, queue_length)
        self._sent_since_last = 0


class BatchSender:
    """Sends batch tasks by name, pausing while `backpressure` reports the queue full. Use from one thread.

    Publishing and reading the queue length retry connection errors for about 30 s each, so a Redis restart
    of a few seconds delays a submission without failing it. A publish made with a `PublishGuard` is exactly
    once (see `producer.checkpoint`); one without may publish a batch twice when a reply is lost.
    """

    def __init__(
        self,
        app: Celery,
        queue: str,
        high_water: int | str = "auto",
        poll_s: float = 1.0,
        backpressure: Backpressure | None = None,
    ) -> None:
        """`backpressure` decides when to pause; without it, a Backpressure with `high_water` and the defaults."""
        self.app = app
        self.queue = queue
        self.backpressure = backpressure or Backpressure(high_water, DEFAULT_LOW_WATER, DEFAULT_AHEAD_S, DEFAULT_MAX_TASKS)
        self.poll_s = poll_s
        self.paused_s = 0.0  # time spent waiting for the queue to drain
        self._connection: Any = None
        self._publish_connection: Any = None

    @classmethod
    def for_settings(cls, app: Celery, settings: Settings) -> BatchSender:
        backpressure = Backpressure(
            settings.queue_high_water, settings.queue_low_water, settings.queue_ahead_s, settings.queue_max_tasks
        )
        return cls(app, settings.queue, backpressure=backpressure)

    def send(
        self, message: BatchMessage, guard: PublishGuard | None = None, stop_waiting: Callable[[], None] | None = None
    ) -> bool:
        """Wait while the queue is full, then publish one batch task; see `publish`.

        `stop_waiting` is called once per poll while waiting, and may raise to stop the wait (a cancelled job).
        """
        self._wait_for_room(stop_waiting)
        return self.publish(message, guard)

    def publish(self, message: BatchMessage, guard: PublishGuard | None = None) -> bool:
        """Publish one batch task and return whether it was pushed (False: a guarded batch was pushed before).

        Raises kombu's OperationalError when Redis stays unreachable for about 30 s, and with a guard, LeaseLost
        or JobEnded (see `producer.checkpoint`). Without a guard, when Redis stores a message but the connection
        drops before its reply, the retry publishes the batch a second time. Workers count a batch once by its
        number (`JobStore.record_batch`) and rewrite the same shard, so the duplicate changes no result.
        """

        def log_publish_retry(error: BaseException, interval_s: float) -> None:
            logger.warning(
                "Job %s batch %d: publishing to queue %s failed, retrying in %.1f s: %s",
                message.job_id, message.batch, self.queue, interval_s, error,
            )

        options: dict[str, Any] = {}
        if guard is not None:
            options["connection"] = self._checkpoint_connection()
        with contextlib.ExitStack() as stack:
            if guard is not None:
                stack.enter_context(guarded_publish(guard))
            self.app.send_task(
                TASK_CLASSIFY_BATCH,
                args=[message.model_dump(mode="json")],
                queue=self.queue,
                # Celery's default is the repr of the URIs, about 1 KB per task in Redis; Flower shows this instead.
                argsrepr=f"job {message.job_id} batch {message.batch}: {len(message.uris)} images",
                headers={PUBLISHED_AT_HEADER: time.time()},
                retry=True,
                retry_policy={
                    "max_retries": PUBLISH_MAX_RETRIES,
                    "interval_start": 0,
                    "interval_step": PUBLISH_INTERVAL_STEP_S,
                    "interval_max": PUBLISH_INTERVAL_MAX_S,
                    "errback": log_publish_retry,
                },
                **options,
            )
        pushed = True if guard is None else bool(guard.pushed)
        if pushed:
            self.backpressure.sent()
        return pushed

    def _checkpoint_connection(self) -> Any:
        if self._publish_connection is None:
            self._publish_connection = self.app.connection_for_write(transport=CheckpointTransport)
        return self._publish_connection

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
        if self._publish_connection is not None:
            self._publish_connection.release()
            self._publish_connection = None

    def _wait_for_room(self, stop_waiting: Callable[[], None] | None = None) -> None:
        if not self.backpressure.needs_check():
            return
        started = None
        while self.backpressure.should_wait(self.queue_length()):
            if stop_waiting is not None:
                stop_waiting()
            if started is None:
                started = time.monotonic()
                logger.info(
                    "Queue %s contains %d or more tasks; pausing until it drains to %d",
                    self.queue, self.backpressure.high_water, int(self.backpressure.high_water * self.backpressure.low_water),
                )
            time.sleep(self.poll_s)
        if started is not None:
            self.paused_s += time.monotonic() - started
