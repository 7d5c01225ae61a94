"""The Celery app of the workers: `celery -A workers.app worker` starts one.

The model is loaded in each pool process after the fork (`worker_process_init`), never in the parent that
forks. The parent only checks, at start, that the model's files can be found, so a missing model stops the
worker at once with a message that explains how to provide it.

Every batch gets soft and hard time limits below CLIPFLEET_VISIBILITY_TIMEOUT_S (see `delivery_limits`), so
Redis does not deliver a batch to a second worker while the first still runs it. SIGTERM starts a warm shutdown
bounded by CLIPFLEET_SHUTDOWN_GRACE_S (see `begin_bounded_shutdown`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import platform
import signal
import threading
from dataclasses import dataclass
from typing import Any

import psutil
from celery import Celery, signals
from kombu import Exchange, Queue

from producer.queue import celery_config
from producer.settings import Settings
from workers import health
from workers.heartbeat import Heartbeat
from workers.transport import install as install_entry_checking_transport

logger = logging.getLogger(__name__)

# botocore logs the headers of every request at DEBUG level, the session token (X-Amz-Security-Token) among
# them, so its loggers stay at INFO even when CLIPFLEET_LOG_LEVEL is DEBUG.
for _name in ("boto3", "botocore", "s3transfer"):
    logging.getLogger(_name).setLevel(logging.INFO)

# Shares of CLIPFLEET_VISIBILITY_TIMEOUT_S. The retry backoff plus the hard limit stay within the visibility
# timeout, so a retried batch is not redelivered while it runs either.
# NOTE: Redis times a message from its delivery to the worker. A retried batch whose countdown ends while
# another batch runs in the pool process waits longer, so it can pass the visibility timeout and run twice. Its
# shard is rewritten and counted once, but the extra delivery counts toward CLIPFLEET_MAX_DELIVERY_ATTEMPTS.
SOFT_TIME_LIMIT_SHARE = 0.8
HARD_TIME_LIMIT_SHARE = 0.9
SLOW_BATCH_SHARE = 0.5
RETRY_BACKOFF_SHARE = 0.1
RETRY_BACKOFF_MAX_S = 120
# Redis redelivers only when a worker sweeps its unacknowledged messages. kombu 5.7 scans on every 10th 10 s
# tick by default, up to 100 s after the visibility timeout, so workers here scan on every tick instead.
MAX_RESTORE_INTERVAL_S = 10.0
RESTORE_INTERVALS_PER_VISIBILITY_TIMEOUT = 5
# The startup check: a batch whose S3 read waits out one whole CLIPFLEET_FETCH_TIMEOUT_S must still end before
# its soft time limit, 0.8 x the visibility timeout.
MIN_VISIBILITY_PER_FETCH_TIMEOUT = 2
# Seconds a cold shutdown (after CLIPFLEET_SHUTDOWN_GRACE_S) may take before the worker kills its pool processes
# and exits with status 1. Orchestrators' kill deadlines must leave room for the grace plus this.
COLD_SHUTDOWN_LIMIT_S = 5.0


@dataclass(frozen=True)
class DeliveryLimits:
    """Time limits of one batch delivery, in seconds, derived from CLIPFLEET_VISIBILITY_TIMEOUT_S."""

    visibility_timeout_s: int
    soft_time_limit_s: float  # the task gets SoftTimeLimitExceeded and retries the batch
    hard_time_limit_s: float  # the pool process is killed and the message goes back to the queue
    slow_batch_s: float  # a batch that runs longer is logged with a warning
    retry_backoff_max_s: int  # maximum wait before a retried batch runs again
    restore_interval_s: float  # how often a worker returns overdue unacknowledged messages to the queue


def delivery_limits(settings: Settings) -> DeliveryLimits:
    """Return the batch time limits for `settings.visibility_timeout_s`."""
    visibility_s = settings.visibility_timeout_s
    return DeliveryLimits(
        visibility_timeout_s=visibility_s,
        soft_time_limit_s=round(SOFT_TIME_LIMIT_SHARE * visibility_s, 1),
        hard_time_limit_s=round(HARD_TIME_LIMIT_SHARE * visibility_s, 1),
        slow_batch_s=SLOW_BATCH_SHARE * visibility_s,
        retry_backoff_max_s=max(1, min(RETRY_BACKOFF_MAX_S, int(RETRY_BACKOFF_SHARE * visibility_s))),
        restore_interval_s=min(MAX_RESTORE_INTERVAL_S, visibility_s / RESTORE_INTERVALS_PER_VISIBILITY_TIMEOUT),
    )


def check_visibility_timeout(settings: Settings) -> None:
    """Raise ValueError when CLIPFLEET_VISIBILITY_TIMEOUT_S is below 2 x CLIPFLEET_FETCH_TIMEOUT_S."""
    minimum_s = MIN_VISIBILITY_PER_FETCH_TIMEOUT * settings.fetch_timeout_s
    if settings.visibility_timeout_s < minimum_s:
        soft_limit_s = delivery_limits(settings).soft_time_limit_s
        raise ValueError(
            f"CLIPFLEET_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} is below "
            f"{MIN_VISIBILITY_PER_FETCH_TIMEOUT} x CLIPFLEET_FETCH_TIMEOUT_S={settings.fetch_timeout_s:g}, so a batch "
            f"whose S3 read waits out one timeout would reach its time limit of {soft_limit_s:g} s; set "
            f"CLIPFLEET_VISIBILITY_TIMEOUT_S to at least {math.ceil(minimum_s)} or lower CLIPFLEET_FETCH_TIMEOUT_S"
        )


# Seconds a new pool process may take to import torch and load the model before the main process gives up on it.
POOL_PROCESS_START_TIMEOUT_S = 300.0


def worker_config(settings: Settings) -> dict[str, Any]:
    """Return the worker-only Celery settings that add to `producer.queue.celery_config`.

    - `task_soft_time_limit`, `task_time_limit`: see `delivery_limits`.
    - `task_acks_on_timeout = False`: a batch killed at its hard time limit goes back to the queue instead of
      being acknowledged and lost. The delivery cap ends a batch that times out on every delivery.
    - `worker_soft_shutdown_timeout = 0`: the cold shutdown that ends the grace period after SIGTERM (see
      `begin_bounded_shutdown`) terminates running batches at once instead of sleeping first.
    - `worker_proc_alive_timeout`: a pool process reports to the main process only after it has loaded the
      model. For a pool process that replaces a lost one, the main process waits 4 s by default and then kills
      it with SIGKILL and starts another. A busy host or a large model takes longer, so every replacement was
      killed in turn. POOL_PROCESS_START_TIMEOUT_S waits longer.
    - `broker_transport_options`: the visibility timeout of `celery_config`, plus a sweep for overdue
      unacknowledged messages every `restore_interval_s`, and `queue_order_strategy = "priority"`: kombu 5.7's
      Redis transport then always polls the consumed queues in their given order (`consumed_queues`), instead of
      moving the queue it last took a task from to the end (its default, `round_robin`).
    """
    limits = delivery_limits(settings)
    transport_options = dict(celery_config(settings).get("broker_transport_options", {}))
    transport_options.update(
        unacked_restore_interval=limits.restore_interval_s, unacked_restore_throttle=1, queue_order_strategy="priority"
    )
    return {
        "task_soft_time_limit": limits.soft_time_limit_s,
        "task_time_limit": limits.hard_time_limit_s,
        "task_acks_on_timeout": False,
        "worker_soft_shutdown_timeout": 0.0,
        "worker_enable_soft_shutdown_on_idle": False,
        "worker_proc_alive_timeout": POOL_PROCESS_START_TIMEOUT_S,
        "broker_transport_options": transport_options,
    }


def consumed_queues(settings: Settings) -> list[str]:
    """Return the queues a worker reads, first first: CLIPFLEET_REALTIME_QUEUE unless it is empty, then CLIPFLEET_QUEUE
    unless CLIPFLEET_REALTIME_ONLY is set."""
    names = [settings.realtime_queue] if settings.realtime_only else [settings.realtime_queue, settings.queue]
    return list(dict.fromkeys(name for name in names if name))


def task_queues(settings: Settings) -> list[Queue]:
    """Return `consumed_queues` as kombu queues, each bound like the queue Celery creates for a bare name."""
    return [Queue(name, Exchange(name), routing_key=name) for name in consumed_queues(settings)]


settings = Settings()
app = Celery("clipfleet", include=["workers.tasks"])
app.conf.update(celery_config(settings))
app.conf.update(worker_config(settings))
# The queues of a worker started without -Q, in the order it reads them (see `worker_config`).
app.conf.task_queues = task_queues(settings)
# kombu's Redis transport, changed to drop a malformed queue entry instead of stopping the worker.
install_entry_checking_transport()

EXIT_OK = 0
# Set by the first SIGTERM, so a second one starts no second timer.
_shutdown_started = threading.Event()
# Set when Celery's own shutdown starts (SIGINT, SIGQUIT).
_stopping = threading.Event()
_grace_timers: list[threading.Timer] = []

# Set to 1 by a pool process that cannot load the model. Created before the pool forks, so the parent and
# its pool processes share it, and the parent exits with status 1 instead of 0.
_model_failed = multiprocessing.Value("i", 0)
# Pool processes that loaded the default model, shared the same way; the registry lists the worker from the first.
_models_loaded = multiprocessing.Value("i", 0)
# The worker's registry entry, kept from the main process once the worker consumes tasks.
_heartbeats: list[Heartbeat] = []
# The worker's pool processes, read at start before the pool forks. `auto` torch threads divide the CPUs among them.
_pool_processes = 1


@signals.worker_init.connect
def record_pool_processes(sender: Any = None, **_: Any) -> None:
    """Record how many pool processes the worker starts, before the pool forks, for `auto` torch threads."""
    from workers.model import usable_cpus

    global _pool_processes
    concurrency = getattr(sender, "concurrency", None)
    if not _forks_pool_processes(getattr(sender, "pool_cls", "prefork")):
        _pool_processes = 1  # solo and thread pools run every task in this one process
    elif isinstance(concurrency, int) and concurrency >= 1:
        _pool_processes = concurrency
    else:
        # Celery resolves `--concurrency auto` after this signal, to the CPUs that usable_cpus() counts.
        _pool_processes = usable_cpus()


@signals.worker_init.connect
def check_model_available(**_: Any) -> None:
    """Fail the worker at start when Redis is not configured, the visibility timeout is too short for the fetch
    timeout, or the model cannot be found."""
    from workers.model import ModelLoadError, resolve_checkpoint

    # Celery logs and ignores exceptions raised by signal handlers; SystemExit is not caught, so it stops the worker.
    if not settings.redis_url:
        raise SystemExit("error: CLIPFLEET_REDIS_URL is not set: workers need the Redis that producers enqueue into")
    try:
        check_visibility_timeout(settings)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    limits = delivery_limits(settings)
    logger.info(
        "Batch time limits: soft %g s, hard %g s (CLIPFLEET_VISIBILITY_TIMEOUT_S=%d); shutdown grace %g s",
        limits.soft_time_limit_s, limits.hard_time_limit_s, limits.visibility_timeout_s, settings.shutdown_grace_s,
    )
    try:
        path = resolve_checkpoint(settings.model, settings.model_revision)
    except ModelLoadError as e:
        raise SystemExit(f"error: {e}") from e
    logger.info("Model %s found at %s", settings.model, path)


def _forks_pool_processes(pool_cls: Any) -> bool:
    """Return whether the Celery pool `pool_cls` (an alias such as "solo", or a class) runs tasks in forked processes."""
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool

    try:
        implementation = get_implementation(pool_cls)
    except (ImportError, AttributeError, KeyError, ValueError):
        return True  # Celery rejects an unknown pool itself, after this signal
    return isinstance(implementation, type) and issubclass(implementation, TaskPool)


@signals.worker_process_init.connect
def load_model_in_pool_process(**_: Any) -> None:
    """Load the default model in a freshly forked pool process, before it takes a task.

    A pool process that cannot load the model (for example CLIPFLEET_DEVICE=cuda without a GPU) sends the
    parent SIGTERM (a warm shutdown) and exits, because every batch it took would fail.
    """
    import torch

    from workers.model import ModelLoadError, choose_torch_threads, usable_cpus
    from workers.runtime import get_runtime

    health.pool_process_started()
    cpus = usable_cpus()
    torch.set_num_threads(choose_torch_threads(settings.torch_threads, _pool_processes, cpus))
    if isinstance(settings.torch_threads, int) and settings.torch_threads * _pool_processes > cpus:
        logger.warning(
            "CLIPFLEET_TORCH_THREADS=%d in %d pool processes is more threads than the %d usable CPUs, so they compete "
            "for them; use auto or at most %d",
            settings.torch_threads, _pool_processes, cpus, max(1, cpus // _pool_processes),
        )
    logger.info(
        "Pool process %d runs the model with torch threads=%d (CLIPFLEET_TORCH_THREADS=%s, pool processes=%d, usable CPUs=%d)",
        os.getpid(), torch.get_num_threads(), settings.torch_threads, _pool_processes, cpus,
    )
    try:
        get_runtime().model(settings.model, settings.model_revision)
    except ModelLoadError as e:
        logger.critical("error: %s; stopping the worker", e)
        _model_failed.value = 1
        os.kill(os.getppid(), signal.SIGTERM)
        raise SystemExit(1) from e
    health.mark_model_loaded()
    with _models_loaded.get_lock():
        _models_loaded.value += 1


@signals.worker_shutdown.connect
def exit_with_failure_if_model_failed(**_: Any) -> None:
    """Make the worker exit with status 1 after a pool process failed to load the model."""
    if _model_failed.value:
        raise SystemExit(1)


@signals.worker_ready.connect
def install_sigterm_handler(**_: Any) -> None:
    """Make SIGTERM a warm shutdown bounded by CLIPFLEET_SHUTDOWN_GRACE_S (see `begin_bounded_shutdown`).

    Celery's own SIGTERM handler waits for running batches without a bound. Celery 5.7's soft shutdown
    (`worker_soft_shutdown_timeout` with REMAP_SIGTERM=SIGQUIT) bounds the wait, but it sleeps the whole
    timeout inside the signal handler, so the worker cannot acknowledge a batch that ends sooner and always
    exits after the full period. A timer thread gives the same bound without that wait.
    """
    from celery import platforms

    platforms.signals["SIGTERM"] = _handle_sigterm


def _handle_sigterm(*_: Any) -> None:
    if multiprocessing.current_process().name == "MainProcess":
        begin_bounded_shutdown(settings.shutdown_grace_s)


def begin_bounded_shutdown(grace_s: float) -> None:
    """Start Celery's warm shutdown, and its cold shutdown if a batch still runs `grace_s` seconds later.

    The warm shutdown takes no new batch and exits with status 0 once the running batch is acknowledged. The
    cold shutdown (SIGQUIT to this process) terminates the pool process, which returns the batch's message to
    the queue at once, and exits. Calls after the first do nothing. Call from the main thread of the main
    process, as the signal handler does. Send SIGTERM to the main process only: a pool process that gets
    SIGTERM dies at once, and its batch goes back to the queue unfinished.
    """
    from celery.worker import state as worker_state

    if _shutdown_started.is_set():
        return
    _shutdown_started.set()
    health.mark_stopping()
    for heartbeat in _heartbeats:
        heartbeat.notify()
    logger.warning(
        "SIGTERM received: the running batch gets %g s (CLIPFLEET_SHUTDOWN_GRACE_S) to finish, then goes back to "
        "the queue", grace_s,
    )
    timer = threading.Timer(grace_s, _return_running_batches, args=(grace_s,))
    timer.daemon = True
    timer.start()
    _grace_timers.append(timer)
    worker_state.should_stop = EXIT_OK


@signals.worker_shutdown.connect
def cancel_grace_timer(**_: Any) -> None:
    """Stop the grace-period timer of a shutdown that ended in time, so it sends no SIGQUIT to an exiting worker."""
    for timer in _grace_timers:
        timer.cancel()


def _return_running_batches(grace_s: float) -> None:
    logger.warning(
        "Shutdown grace period of %g s (CLIPFLEET_SHUTDOWN_GRACE_S) is over, so running batches go back to the "
        "queue", grace_s,
    )
    # Not in _grace_timers: the worker_shutdown signal can come before a stuck pool process lets the worker exit.
    backstop = threading.Timer(COLD_SHUTDOWN_LIMIT_S, _kill_pool_processes)
    backstop.daemon = True
    backstop.start()
    os.kill(os.getpid(), signal.SIGQUIT)


def _kill_pool_processes() -> None:
    """End a cold shutdown that did not finish in COLD_SHUTDOWN_LIMIT_S: kill the pool processes and exit with status 1.

    Celery's cold shutdown does not always end when Redis stops together with the worker, as when `clipfleet
    run` is killed with its private Redis. The pool process then retried Redis for 30 s, and after it was
    killed the main process still waited for its result. A batch cut short here stays unacknowledged
    in Redis and is delivered again after the visibility timeout.
    """
    children = psutil.Process().children()
    logger.error(
        "Cold shutdown still running %g s after it began; killing pool processes %s and exiting with status 1",
        COLD_SHUTDOWN_LIMIT_S, ", ".join(str(child.pid) for child in children) or "(none left)",
    )
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=COLD_SHUTDOWN_LIMIT_S)
    logging.shutdown()
    os._exit(1)


@signals.worker_init.connect
def start_metrics_server(**_: Any) -> None:
    """Serve /metrics, /healthz and /readyz on CLIPFLEET_METRICS_PORT, before the pool forks (see `workers.health`).

    Runs after `check_model_available`. A port that cannot be bound raises SystemExit, so the worker exits with status 1.
    """
    health.start(settings)


@signals.worker_process_shutdown.connect
def forget_exiting_pool_process(pid: int, **_: Any) -> None:
    """Drop an exiting pool process's readiness flag and live gauges. Runs in that pool process."""
    health.pool_process_exited(pid)


@signals.worker_ready.connect
def mark_worker_consuming(**_: Any) -> None:
    """Let /readyz return 200 once a pool process has loaded the model too."""
    health.mark_consuming()


@signals.worker_shutting_down.connect
def mark_worker_stopping(**_: Any) -> None:
    """Make /readyz return 503 once Celery's own shutdown starts (SIGINT, SIGQUIT)."""
    health.mark_stopping()


@signals.worker_shutdown.connect
def stop_metrics_server(**_: Any) -> None:
    """Stop serving metrics and remove their files; `health.stop` also runs at exit, when an earlier handler raised."""
    health.stop()


@signals.worker_ready.connect
def start_heartbeat(sender: Any = None, **_: Any) -> None:
    """Announce the worker in the registry of live workers once a pool process has loaded the model (see
    `workers.heartbeat`), under Celery's node name and the main process id, such as celery@host/1234.

    The process id keeps two workers started on one host with Celery's default node name apart in the registry.
    """
    name = f"{getattr(sender, 'hostname', None) or f'celery@{platform.node()}'}/{os.getpid()}"
    heartbeat = Heartbeat.for_settings(name, settings, _ready_for_registry)
    _heartbeats.append(heartbeat)
    heartbeat.start()


def _ready_for_registry() -> bool:
    return bool(_models_loaded.value) and not _model_failed.value and not _shutdown_started.is_set() and not _stopping.is_set()


@signals.worker_shutting_down.connect
def withdraw_from_registry_soon(**_: Any) -> None:
    """Let the heartbeat thread withdraw the worker now that Celery's shutdown has started (SIGINT, SIGQUIT)."""
    _stopping.set()
    for heartbeat in _heartbeats:
        heartbeat.notify()


@signals.worker_shutdown.connect
def stop_heartbeat(**_: Any) -> None:
    """Stop the heartbeat thread and withdraw the worker from the registry."""
    for heartbeat in _heartbeats:
        heartbeat.stop()
