"""The worker's entry in the registry of live workers (`producer.fleet`), kept by a thread of the main process.

The thread announces the worker once it is ready, every HEARTBEAT_INTERVAL_S after that, and withdraws it when
the worker stops being ready or `Heartbeat.stop` is called. A Redis failure is logged as a warning and the
thread carries on, so a Redis restart never stops the worker. The entry then expires HEARTBEAT_TTL_S after
the last announcement that reached Redis.

This module imports no torch: it runs in the main process that forks the pool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from producer.fleet import HEARTBEAT_INTERVAL_S, WorkerInfo, announce, withdraw
from producer.redis_client import make_redis
from producer.settings import Settings

logger = logging.getLogger(__name__)

# Seconds between readiness checks before the worker is ready, so it appears soon after its model loads.
READY_POLL_S = 0.2
# Redis calls of the heartbeat retry connection errors this long, well under the heartbeat TTL.
REDIS_RETRY_S = 2.0
# Seconds `stop` waits for the thread to end before it withdraws the entry itself.
STOP_JOIN_S = 5.0


class Heartbeat:
    """Announces one worker in the registry from a daemon thread while `is_ready()` returns True.

    `start` and `stop` are for the main thread; `is_ready` is called from the heartbeat thread.
    """

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        settings: Settings,
        is_ready: Callable[[], bool],
        interval_s: float = HEARTBEAT_INTERVAL_S,
    ) -> None:
        self.client = client
        self.name = name
        self.settings = settings
        self.is_ready = is_ready
        self.interval_s = interval_s
        self.started_at = time.time()
        self.announced = False
        self._stopped = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipfleet-heartbeat", daemon=True)

    @classmethod
    def for_settings(cls, name: str, settings: Settings, is_ready: Callable[[], bool]) -> Heartbeat:
        """Return a heartbeat of worker `name` on the Redis of CLIPFLEET_REDIS_URL."""
        return cls(make_redis(settings.redis_url or "", retry_max_s=REDIS_RETRY_S), name, settings, is_ready)

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """Make the thread check readiness now instead of at its next beat, such as when shutdown starts.

        Safe to call from a signal handler: it only sets an event.
        """
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread and remove the worker from the registry. Idempotent; never raises for Redis errors."""
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(STOP_JOIN_S)
        self._withdraw()

    def beat(self) -> None:
        """Announce the worker when it is ready, withdraw it when it no longer is. Logs Redis errors instead of raising."""
        if self.is_ready():
            self._announce()
        elif self.announced:
            self._withdraw()

    def info(self) -> WorkerInfo:
        """Return the registry entry of this worker, with the current time as its heartbeat."""
        return WorkerInfo(
            name=self.name,
            model=self.settings.model,
            revision=self.settings.model_revision or "",
            queue="" if self.settings.realtime_only else self.settings.queue,
            realtime_queue=self.settings.realtime_queue,
            started_at=self.started_at,
            heartbeat_at=time.time(),
        )

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.clear()
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a failed beat must not end the heartbeat thread
                logger.exception("Worker %s: the registry heartbeat failed unexpectedly; retrying in %g s", self.name, self.interval_s)
            self._wake.wait(self.interval_s if self.announced else READY_POLL_S)

    def _announce(self) -> None:
        try:
            announce(self.client, self.info())
        except redis.RedisError as e:
            logger.warning("Worker %s could not refresh its registry entry, retrying in %g s: %s", self.name, self.interval_s, e)
            return
        if not self.announced:
            logger.info(
                "Worker %s announced in the registry: model %s, queue %s, realtime queue %s",
                self.name, self.settings.model, self.info().queue or "(none)", self.settings.realtime_queue or "(none)",
            )
        self.announced = True

    def _withdraw(self) -> None:
        if not self.announced:
            return
        try:
            withdraw(self.client, self.name)
        except redis.RedisError as e:
            logger.warning("Worker %s could not remove its registry entry, which expires by itself: %s", self.name, e)
            return
        self.announced = False
        logger.info("Worker %s withdrawn from the registry", self.name)
