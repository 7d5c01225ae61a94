"""The worker's HTTP endpoints on CLIPFLEET_METRICS_PORT: `/metrics`, `/healthz` and `/readyz`.

Celery's prefork pool runs batches in child processes, so metrics use prometheus_client's multiprocess mode.
`start` runs in the main process before the pool forks. It creates a private, empty folder, points
PROMETHEUS_MULTIPROC_DIR at it, binds the port on all interfaces and serves from a thread of the main process.
Each pool process writes its metric values to files in that folder. The main process sums them per scrape and
removes the folder on exit, so no values outlive the worker.

- `/healthz`: 200 while the main process serves, which is as long as it is alive.
- `/readyz`: 200 once the worker consumes tasks (Celery's `worker_ready`) and a live pool process has loaded
  the default model, 503 with the reason before that and once shutdown has started. A pool process that loaded
  its model leaves a flag file in the folder, which the main process ignores once that process has exited.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import shutil
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric

from producer.settings import Settings
from workers.metrics import reset_worker_metrics

logger = logging.getLogger(__name__)

LISTEN_HOST = "0.0.0.0"  # all interfaces, so a Kubernetes scrape or probe reaches the pod
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
FOLDER_PREFIX = "clipfleet-metrics-"
MODEL_LOADED_FLAG_PREFIX = "model-loaded-"
MAX_PORT = 65535

StartResponse = Callable[..., Any]


@dataclass
class WorkerState:
    """Readiness state of the main process, written by Celery's signal handlers and read by the server threads."""

    folder: Path
    settings: Settings
    consuming: bool = False
    stopping: bool = False

    def readiness(self) -> tuple[bool, str]:
        """Return `(ready, reason)`, forgetting pool processes that exited (see `live_loaded_pool_processes`)."""
        if self.stopping:
            return False, "the worker is shutting down"
        if not self.consuming:
            return False, "the worker does not consume tasks yet"
        if not live_loaded_pool_processes(self.folder):
            return False, f"no pool process has loaded the model {self.settings.model} yet"
        return True, "ready"


def live_loaded_pool_processes(folder: Path) -> list[int]:
    """Return the pids of live pool processes that loaded the default model.

    For each flag whose process has exited, removes the flag and that process's live gauge files
    (`multiprocess.mark_process_dead`), which covers a pool process killed without running its exit handlers.
    """
    alive = []
    for flag in folder.glob(f"{MODEL_LOADED_FLAG_PREFIX}*"):
        try:
            pid = int(flag.name.removeprefix(MODEL_LOADED_FLAG_PREFIX))
        except ValueError:
            continue
        if process_alive(pid):
            alive.append(pid)
        else:
            forget_pool_process(folder, pid)
    return alive


def process_alive(pid: int) -> bool:
    """Return True when a process with this pid exists.

    NOTE: a pid reused by an unrelated process after a pool process exited reads as alive until that one ends.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_pool_process(folder: Path, pid: int) -> None:
    """Remove an exited pool process's model flag and live gauge values. Its counters and histograms stay."""
    (folder / f"{MODEL_LOADED_FLAG_PREFIX}{pid}").unlink(missing_ok=True)
    try:
        multiprocess.mark_process_dead(pid, str(folder))
    except FileNotFoundError:
        pass  # a concurrent scrape removed the same files first


class WorkerStateCollector:
    """Collector of `clipfleet_worker_ready` and `clipfleet_worker_info`, from the main process's state."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        ready, _ = self.state.readiness()
        yield GaugeMetricFamily("clipfleet_worker_ready", "1 when /readyz returns 200, else 0", value=1 if ready else 0)
        settings = self.state.settings
        info = GaugeMetricFamily(
            "clipfleet_worker_info", "Always 1; the labels describe the worker",
            labels=["version", "model", "device", "queue"],
        )
        info.add_metric([package_version(), settings.model, settings.device, settings.queue], 1)
        yield info


def package_version() -> str:
    """Return the installed clipfleet version, or `unknown` when it runs from a source tree that is not installed."""
    try:
        return metadata.version("clipfleet")
    except metadata.PackageNotFoundError:
        return "unknown"


class EndpointApp:
    """WSGI application of `/metrics`, `/healthz` and `/readyz`; other paths get 404."""

    def __init__(self, state: WorkerState, registry: CollectorRegistry) -> None:
        self.state = state
        self.metrics_app = make_wsgi_app(registry)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            # Drops the live gauges of exited pool processes before they are summed.
            live_loaded_pool_processes(self.state.folder)
            return self.metrics_app(environ, start_response)
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok")
        if path == "/readyz":
            ready, reason = self.state.readiness()
            return _text(start_response, "200 OK" if ready else "503 Service Unavailable", reason)
        return _text(start_response, "404 Not Found", f"{path} not found; use /metrics, /healthz or /readyz")


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = f"{body}\n".encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
    return [data]


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the name BaseHTTPRequestHandler uses
        logger.debug("%s " + format, self.address_string(), *args)


@dataclass
class Endpoint:
    """The running endpoint of this worker: its state, server and folder. Inherited by pool processes through fork."""

    state: WorkerState
    server: WSGIServer
    owner_pid: int


_endpoint: Endpoint | None = None


def start(settings: Settings) -> None:
    """Serve the endpoints on CLIPFLEET_METRICS_PORT in a thread; do nothing when it is unset. Main process only.

    Call before the pool forks, so pool processes inherit multiprocess mode. Raises SystemExit naming the port
    when it is out of range or cannot be bound.
    """
    global _endpoint
    port = settings.metrics_port
    if port is None:
        return
    if not 1 <= port <= MAX_PORT:
        raise SystemExit(f"error: CLIPFLEET_METRICS_PORT={port} is invalid; use a TCP port from 1 to {MAX_PORT}")
    server = bind_server(port)
    folder = create_multiprocess_folder()
    state = WorkerState(folder, settings)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    registry.register(WorkerStateCollector(state))
    server.set_app(EndpointApp(state, registry))
    _endpoint = Endpoint(state, server, os.getpid())
    atexit.register(stop)
    threading.Thread(target=server.serve_forever, name="clipfleet-metrics", daemon=True).start()


def bind_server(port: int) -> WSGIServer:
    """Return a server bound to `port` on all interfaces, without an application yet. Raises SystemExit naming the port."""
    try:
        return make_server(LISTEN_HOST, port, _no_application, _ThreadingServer, _QuietHandler)
    except OSError as e:
        hint = "another process listens on it; choose a free port" if e.errno == errno.EADDRINUSE else "choose another port"
        raise SystemExit(f"error: cannot serve metrics on CLIPFLEET_METRICS_PORT={port} ({LISTEN_HOST}:{port}): {e}; {hint}") from e


def _no_application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    return _text(start_response, "503 Service Unavailable", "the worker is starting")


def create_multiprocess_folder() -> Path:
    """Create an empty private folder, set PROMETHEUS_MULTIPROC_DIR to it and switch prometheus_client to files.

    A fresh folder has no values of an earlier run, which prometheus_client requires. An existing
    PROMETHEUS_MULTIPROC_DIR is replaced, because another process's files there would be summed too.
    """
    if os.environ.get(MULTIPROCESS_ENV):
        logger.warning("%s=%s is replaced by a private folder of this worker", MULTIPROCESS_ENV, os.environ[MULTIPROCESS_ENV])
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
    os.environ[MULTIPROCESS_ENV] = str(folder)
    # prometheus_client picks its value storage when it is first imported; metrics created from now on use files.
    values.ValueClass = values.get_value_class()
    reset_worker_metrics()
    return folder


def pool_process_started() -> None:
    """Close this pool process's copy of the listening socket, inherited through fork. Pool processes only."""
    if _endpoint is not None and _endpoint.owner_pid != os.getpid():
        _endpoint.server.socket.close()


def mark_model_loaded() -> None:
    """Record that this pool process loaded the default model, for `/readyz`. Pool processes only.

    NOTE: only the prefork pool calls this (from `worker_process_init`), so with `--pool=solo` or threads
    `/readyz` stays 503. `clipfleet worker` always uses prefork.
    """
    if _endpoint is not None:
        (_endpoint.state.folder / f"{MODEL_LOADED_FLAG_PREFIX}{os.getpid()}").touch()


def pool_process_exited(pid: int) -> None:
    """Drop an exiting pool process's readiness flag and live gauges (Celery's `worker_process_shutdown`)."""
    if _endpoint is not None:
        forget_pool_process(_endpoint.state.folder, pid)


def mark_consuming() -> None:
    """Record that the worker consumes tasks (Celery's `worker_ready`), and log where it serves. Main process only."""
    if _endpoint is None:
        return
    _endpoint.state.consuming = True
    # Logged here and not in `start`, because Celery sets up logging after `worker_init`, which drops earlier lines.
    host, port = _endpoint.server.server_address[:2]
    logger.info("Serving /metrics, /healthz and /readyz on %s:%d (metric files in %s)", host, port, _endpoint.state.folder)


def mark_stopping() -> None:
    """Make `/readyz` return 503 from now on, because the worker takes no new tasks. Main process only."""
    if _endpoint is not None:
        _endpoint.state.stopping = True


def stop() -> None:
    """Stop serving and remove the metric files. Calls after the first, and calls from pool processes, do nothing."""
    global _endpoint
    endpoint = _endpoint
    if endpoint is None or endpoint.owner_pid != os.getpid():
        return
    _endpoint = None
    endpoint.server.shutdown()
    endpoint.server.server_close()
    shutil.rmtree(endpoint.state.folder, ignore_errors=True)
    logger.info("Stopped serving metrics; removed %s", endpoint.state.folder)
