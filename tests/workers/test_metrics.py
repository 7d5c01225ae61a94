"""Metric updates of `workers.metrics` and the HTTP endpoints of `workers.health`, without a worker or servers."""

from __future__ import annotations

import io
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client import CollectorRegistry

from producer.settings import Settings
from workers import health, metrics
from workers.metrics import STAGES, WorkerMetrics, observe_batch, record_safely
from workers.pipeline import BatchOutcome

DURATIONS_S = {"fetch": 0.4, "decode": 0.2, "preprocess": 0.1, "wait_images": 0.05, "model": 0.3, "write": 0.02}


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[CollectorRegistry]:
    """A private registry whose WorkerMetrics is the process's `worker_metrics()` during the test."""
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", WorkerMetrics(registry))
    yield registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def written_outcome() -> BatchOutcome:
    return BatchOutcome("job", 0, 1, "written", 3, 2, dict(DURATIONS_S), {"not_found": 1, "decode_error": 1})


def test_written_batch_counts_images(registry: CollectorRegistry) -> None:
    metrics.worker_metrics().record_batch(written_outcome(), 1.5)

    assert sample(registry, "clipfleet_images_total", outcome="succeeded") == 3
    assert sample(registry, "clipfleet_images_total", outcome="failed") == 2
    assert sample(registry, "clipfleet_images_failed_total", code="not_found") == 1
    assert sample(registry, "clipfleet_images_failed_total", code="decode_error") == 1
    assert sample(registry, "clipfleet_images_failed_total", code="too_large") == 0
    assert sample(registry, "clipfleet_batches_total", status="written") == 1


def test_written_batch_observes_durations(registry: CollectorRegistry) -> None:
    metrics.worker_metrics().record_batch(written_outcome(), 1.5)

    assert sample(registry, "clipfleet_batch_duration_seconds_count") == 1
    assert sample(registry, "clipfleet_batch_duration_seconds_sum") == 1.5
    for stage in STAGES:
        assert sample(registry, "clipfleet_stage_duration_seconds_count", stage=stage) == 1, stage
        assert sample(registry, "clipfleet_stage_duration_seconds_sum", stage=stage) == DURATIONS_S[stage], stage
    # 0.4 s of fetching falls in the 0.5 s bucket and not in the 0.25 s one.
    assert sample(registry, "clipfleet_stage_duration_seconds_bucket", stage="fetch", le="0.25") == 0
    assert sample(registry, "clipfleet_stage_duration_seconds_bucket", stage="fetch", le="0.5") == 1


def test_skipped_batch_not_timed(registry: CollectorRegistry) -> None:
    metrics.worker_metrics().record_batch(BatchOutcome("job", 0, 0, "skipped_done"), 0.001)

    assert sample(registry, "clipfleet_batches_total", status="skipped_done") == 1
    assert sample(registry, "clipfleet_batch_duration_seconds_count") == 0
    assert sample(registry, "clipfleet_images_total", outcome="succeeded") == 0


def test_observe_batch_counts_outcome(registry: CollectorRegistry) -> None:
    process = observe_batch(lambda status: BatchOutcome("job", 1, 1, status, 4, 0, {"model": 0.1}))

    outcome = process("written")

    assert outcome.status == "written"
    assert sample(registry, "clipfleet_batches_total", status="written") == 1
    assert sample(registry, "clipfleet_images_total", outcome="succeeded") == 4
    assert sample(registry, "clipfleet_stage_duration_seconds_count", stage="model") == 1


def test_observe_batch_counts_error(registry: CollectorRegistry) -> None:
    def fail() -> BatchOutcome:
        raise ConnectionError("Redis went away")

    with pytest.raises(ConnectionError, match="Redis went away"):
        observe_batch(fail)()

    assert sample(registry, "clipfleet_batches_total", status="error") == 1
    assert sample(registry, "clipfleet_batch_duration_seconds_count") == 1
    assert sample(registry, "clipfleet_images_total", outcome="failed") == 0


def test_prompt_lookups_by_level(registry: CollectorRegistry) -> None:
    worker_metrics = metrics.worker_metrics()
    worker_metrics.record_prompt_lookup("process", False)
    worker_metrics.record_prompt_lookup("redis", False)
    worker_metrics.record_prompt_lookup("process", True)

    assert sample(registry, "clipfleet_prompt_cache_misses_total", level="process") == 1
    assert sample(registry, "clipfleet_prompt_cache_misses_total", level="redis") == 1
    assert sample(registry, "clipfleet_prompt_cache_hits_total", level="process") == 1
    assert sample(registry, "clipfleet_prompt_cache_hits_total", level="redis") == 0


def test_prompt_lookup_level_invalid(registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="'disk' is invalid"):
        metrics.worker_metrics().record_prompt_lookup("disk", True)


def test_model_load_observed(registry: CollectorRegistry) -> None:
    metrics.worker_metrics().record_model_load(3.0)

    assert sample(registry, "clipfleet_model_load_duration_seconds_count") == 1
    assert sample(registry, "clipfleet_model_load_duration_seconds_sum") == 3.0


def test_queue_wait_observed_and_clamped(registry: CollectorRegistry) -> None:
    metrics.worker_metrics().record_queue_wait(100.0)
    metrics.worker_metrics().record_queue_wait(-3.0)  # a worker clock behind the producer's

    assert sample(registry, "clipfleet_batch_queue_wait_seconds_count") == 2
    assert sample(registry, "clipfleet_batch_queue_wait_seconds_sum") == 100.0
    assert sample(registry, "clipfleet_batch_queue_wait_seconds_bucket", le="60.0") == 1
    assert sample(registry, "clipfleet_batch_queue_wait_seconds_bucket", le="120.0") == 2


def test_device_memory_absent_on_cpu(registry: CollectorRegistry) -> None:
    import torch

    if torch.cuda.is_initialized():
        pytest.fail("this test process initialised CUDA; the CPU case cannot be checked")
    metrics.worker_metrics().record_model_load(1.0)

    assert sample(registry, "clipfleet_device_memory_allocated_bytes", device="cuda:0") is None
    assert metrics.cuda_memory_allocated() is None


def test_record_safely_logs_failure(registry: CollectorRegistry, caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: WorkerMetrics) -> None:
        raise OSError("No space left on device")

    with caplog.at_level(logging.WARNING, logger="workers.metrics"):
        record_safely(broken)

    assert "Updating the worker metrics failed" in caplog.text
    assert "No space left on device" in caplog.text


# The HTTP endpoints, called as a WSGI application.


def call(app: health.EndpointApp, path: str) -> tuple[str, str]:
    """Return the status line and body of a GET of `path`."""
    environ: dict[str, Any] = {"PATH_INFO": path, "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    statuses: list[str] = []
    body = b"".join(app(environ, lambda status, headers: statuses.append(status)))
    return statuses[0], body.decode()


@pytest.fixture
def state(tmp_path: Path) -> health.WorkerState:
    return health.WorkerState(tmp_path, Settings(model="tiny-model", queue="jobs"))


@pytest.fixture
def app(state: health.WorkerState) -> health.EndpointApp:
    registry = CollectorRegistry()
    registry.register(health.WorkerStateCollector(state))
    return health.EndpointApp(state, registry)


def dead_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_healthz_ok(app: health.EndpointApp) -> None:
    assert call(app, "/healthz") == ("200 OK", "ok\n")


def test_readyz_before_consuming(app: health.EndpointApp, state: health.WorkerState) -> None:
    (state.folder / f"model-loaded-{os.getpid()}").touch()

    assert call(app, "/readyz") == ("503 Service Unavailable", "the worker does not consume tasks yet\n")


def test_readyz_before_model_loaded(app: health.EndpointApp, state: health.WorkerState) -> None:
    state.consuming = True

    assert call(app, "/readyz") == ("503 Service Unavailable", "no pool process has loaded the model tiny-model yet\n")


def test_readyz_ready(app: health.EndpointApp, state: health.WorkerState) -> None:
    state.consuming = True
    (state.folder / f"model-loaded-{os.getpid()}").touch()

    assert call(app, "/readyz") == ("200 OK", "ready\n")


def test_readyz_ignores_exited_process(app: health.EndpointApp, state: health.WorkerState) -> None:
    state.consuming = True
    pid = dead_pid()
    flag = state.folder / f"model-loaded-{pid}"
    flag.touch()
    live_gauge = state.folder / f"gauge_livesum_{pid}.db"
    live_gauge.touch()

    status, _ = call(app, "/readyz")

    assert status == "503 Service Unavailable"
    assert not flag.exists()
    assert not live_gauge.exists()


def test_readyz_while_stopping(app: health.EndpointApp, state: health.WorkerState) -> None:
    state.consuming = True
    (state.folder / f"model-loaded-{os.getpid()}").touch()
    state.stopping = True

    assert call(app, "/readyz") == ("503 Service Unavailable", "the worker is shutting down\n")


def test_metrics_ready_and_info(app: health.EndpointApp, state: health.WorkerState) -> None:
    status, body = call(app, "/metrics")

    assert status == "200 OK"
    assert "clipfleet_worker_ready 0.0" in body
    assert 'clipfleet_worker_info{device="auto",model="tiny-model",queue="jobs",version=' in body


def test_unknown_path_not_found(app: health.EndpointApp) -> None:
    assert call(app, "/metric")[0] == "404 Not Found"


def test_port_in_use_exits(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"CLIPFLEET_METRICS_PORT={port} .*choose a free port"):
            health.start(Settings(metrics_port=port))
    assert health._endpoint is None
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_port_out_of_range_exits() -> None:
    with pytest.raises(SystemExit, match="CLIPFLEET_METRICS_PORT=70000 is invalid"):
        health.start(Settings(metrics_port=70000))


def test_port_unset_serves_nothing() -> None:
    health.start(Settings(metrics_port=None))

    assert health._endpoint is None
