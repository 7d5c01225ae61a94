"""A real Celery worker process for integration tests, started through the product's own command."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from producer.client import Client
from producer.embedded import ManagedProcess
from producer.settings import Settings

READY_TIMEOUT_S = 120.0


def start_worker(
    log_dir: Path,
    redis_url: str,
    model_dir: Path,
    s3_endpoint_url: str | None = None,
    extra_env: dict[str, str] | None = None,
    app_module: str = "workers.app",
    concurrency: int | str = 1,
) -> ManagedProcess:
    """Start `celery -A APP_MODULE worker` with `concurrency` pool processes (a number or "auto") and wait until it is ready for tasks.

    `app_module` names the module of the Celery app, `workers.app` unless a test starts a variant of it.
    Raises RuntimeError, with the end of the worker's log, when the worker exits before it is ready.
    """
    env = dict(os.environ)
    env.update(
        CLIPFLEET_REDIS_URL=redis_url,
        CLIPFLEET_MODEL=str(model_dir),
        CLIPFLEET_FETCH_THREADS="4",
        # Test jobs read and write local folders under the temporary directory (pytest's tmp_path).
        CLIPFLEET_LOCAL_ROOTS=tempfile.gettempdir(),
    )
    if s3_endpoint_url:
        env["CLIPFLEET_S3_ENDPOINT_URL"] = s3_endpoint_url
    env.update(extra_env or {})
    name = f"test-{uuid.uuid4().hex[:8]}"
    argv = [
        sys.executable, "-m", "celery", "-A", app_module, "worker", "--pool=prefork", f"--concurrency={concurrency}",
        "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat", "--hostname", f"{name}@%h",
    ]
    worker = ManagedProcess(name, argv, log_dir / f"{name}.log", env)
    _wait_until_ready(worker)
    return worker


def _wait_until_ready(worker: ManagedProcess) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        log = worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
        if "ready." in log and "Loaded model" in log:
            return
        if not worker.running():
            raise RuntimeError(f"worker exited with code {worker.process.returncode}:\n{worker.log_tail(40)}")
        time.sleep(0.2)
    worker.stop()
    raise TimeoutError(f"worker not ready within {READY_TIMEOUT_S} s:\n{worker.log_tail(40)}")


@contextlib.contextmanager
def worker_stack(log_dir: Path, model_dir: Path, extra_env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Run a private Redis, moto's S3 server and one worker process; yield their `redis_url`, `s3` and `worker`.

    `extra_env` adds environment variables, such as CLIPFLEET_* settings, to the worker's."""
    from tests.support.servers import RedisServer, S3Server

    with RedisServer() as server, S3Server() as s3:
        worker = start_worker(log_dir, server.url, model_dir, s3.endpoint_url, extra_env)
        try:
            yield {"redis_url": server.url, "s3": s3, "worker": worker}
        finally:
            worker.stop()


def stack_client(stack: dict[str, Any], model_dir: Path) -> Client:
    """Return a client of the Redis and S3 server of a `worker_stack`."""
    return Client(Settings(redis_url=stack["redis_url"], s3_endpoint_url=stack["s3"].endpoint_url, model=str(model_dir)))
