"""The Celery app of the workers: `celery -A workers.app worker` starts one.

The model is loaded in each pool process after the fork (`worker_process_init`), never in the parent that
forks. The parent only checks, at start, that the model's files can be found, so a missing model stops the
worker at once with a message that explains how to provide it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from typing import Any

from celery import Celery, signals

from producer.queue import celery_config
from producer.settings import Settings

logger = logging.getLogger(__name__)

# botocore logs the headers of every request at DEBUG level, the session token (X-Amz-Security-Token) among
# them, so its loggers stay at INFO even when CLIPFLEET_LOG_LEVEL is DEBUG.
for _name in ("boto3", "botocore", "s3transfer"):
    logging.getLogger(_name).setLevel(logging.INFO)

settings = Settings()
app = Celery("clipfleet", include=["workers.tasks"])
app.conf.update(celery_config(settings))

# Set to 1 by a pool process that cannot load the model. Created before the pool forks, so the parent and
# its pool processes share it, and the parent exits with status 1 instead of 0.
_model_failed = multiprocessing.Value("i", 0)


@signals.worker_init.connect
def check_model_available(**_: Any) -> None:
    """Fail the worker at start when Redis is not configured or the model cannot be found."""
    from workers.model import ModelLoadError, resolve_checkpoint

    # Celery logs and ignores exceptions raised by signal handlers; SystemExit is not caught, so it stops the worker.
    if not settings.redis_url:
        raise SystemExit("error: CLIPFLEET_REDIS_URL is not set: workers need the Redis that producers enqueue into")
    try:
        path = resolve_checkpoint(settings.model, settings.model_revision)
    except ModelLoadError as e:
        raise SystemExit(f"error: {e}") from e
    logger.info("Model %s found at %s", settings.model, path)


@signals.worker_process_init.connect
def load_model_in_pool_process(**_: Any) -> None:
    """Load the default model in a freshly forked pool process, before it takes a task.

    A pool process that cannot load the model (for example CLIPFLEET_DEVICE=cuda without a GPU) sends the
    parent SIGTERM (a warm shutdown) and exits, because every batch it took would fail.
    """
    from workers.model import ModelLoadError
    from workers.runtime import get_runtime

    try:
        get_runtime().model(settings.model, settings.model_revision)
    except ModelLoadError as e:
        logger.critical("error: %s; stopping the worker", e)
        _model_failed.value = 1
        os.kill(os.getppid(), signal.SIGTERM)
        raise SystemExit(1) from e


@signals.worker_shutdown.connect
def exit_with_failure_if_model_failed(**_: Any) -> None:
    """Make the worker exit with status 1 after a pool process failed to load the model."""
    if _model_failed.value:
        raise SystemExit(1)
