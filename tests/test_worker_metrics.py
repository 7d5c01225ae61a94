"""A real Celery worker serving Prometheus metrics and health checks on CLIPFLEET_METRICS_PORT.

Two local-folder jobs with the same labels run through one worker process with one pool process. Each job's
manifest lists two photos and one missing file, and fits in one batch. The test scrapes /metrics over HTTP.
"""

from __future__ import annotations

import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer import Client, Settings
from producer.embedded import ManagedProcess
from tests.support.servers import RedisServer
from tests.support.worker import start_worker
from workers.metrics import STAGES

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = ["astronaut.jpg", "coffee.jpg"]
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
WAIT_S = 60
SCRAPE_WAIT_S = 15.0
HTTP_TIMEOUT_S = 5.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    """Return the HTTP status and body of GET http://127.0.0.1:PORT/PATH."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> Samples:
    status, body = get(port, "/metrics")
    if status != 200:
        raise AssertionError(f"/metrics returned {status}: {body[:500]}")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_when(port: int, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until sample `name` equals `expected`, for at most SCRAPE_WAIT_S. A job becomes succeeded inside its
    last batch, just before the pool process records that batch's metrics, so the first scrape can miss them."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        samples = scrape(port)
        if value(samples, name, **labels) == expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def wait_ready(port: int, worker: ManagedProcess) -> tuple[int, str]:
    deadline = time.monotonic() + WAIT_S
    while True:
        status, body = get(port, "/readyz")
        if status == 200 or time.monotonic() > deadline or not worker.running():
            return status, body
        time.sleep(0.1)


@dataclass
class MetricsRun:
    port: int
    ready: tuple[int, str]
    healthz: tuple[int, str]
    after_first: Samples
    after_second: Samples
    states: list[str]
    metrics_folder: Path
    metrics_folder_existed: bool
    log: str


def manifest(folder: Path) -> Path:
    """Write two photos and a manifest naming them and one missing file; return the manifest."""
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(DATA / name, folder / name)
    listed = [str(folder / name) for name in PHOTOS] + [str(folder / "missing.jpg")]
    path = folder / "images.txt"
    path.write_text("\n".join(listed) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Iterator[MetricsRun]:
    """Run both jobs through a worker with a private Redis, scrape after each, stop the worker."""
    tmp_path = tmp_path_factory.mktemp("metrics")
    port = free_port()
    images = manifest(tmp_path / "photos")
    with RedisServer() as redis_server:
        yield run_jobs(tmp_path, redis_server.url, tiny_clip_dir, images, port)


def run_jobs(tmp_path: Path, redis_url: str, tiny_clip_dir: Path, images: Path, port: int) -> MetricsRun:
    worker = start_worker(tmp_path, redis_url, tiny_clip_dir, extra_env={"CLIPFLEET_METRICS_PORT": str(port)})
    try:
        ready = wait_ready(port, worker)
        healthz = get(port, "/healthz")
        client = Client(Settings(redis_url=redis_url, model=str(tiny_clip_dir)))
        states = []
        job = client.submit(source=str(images), labels=LABELS, output=str(tmp_path / "out-1"))
        states.append(job.wait(timeout_s=WAIT_S, progress=False).state)
        after_first = scrape_when(port, "clipfleet_batches_total", 1, status="written")
        job = client.submit(source=str(images), labels=LABELS, output=str(tmp_path / "out-2"))
        states.append(job.wait(timeout_s=WAIT_S, progress=False).state)
        after_second = scrape_when(port, "clipfleet_batches_total", 2, status="written")
        log = worker.log_path.read_text(errors="replace")
        found = re.search(r"metric files in (\S+)\)", log)
        assert found, "the worker should log its metric folder"
        folder = Path(found.group(1))
        existed = folder.is_dir()
    finally:
        worker.stop()
    return MetricsRun(port, ready, healthz, after_first, after_second, states, folder, existed, log)


def test_jobs_succeed(run: MetricsRun) -> None:
    assert run.states == ["succeeded", "succeeded"], run.log[-3000:]


def test_readyz_and_healthz(run: MetricsRun) -> None:
    assert run.ready == (200, "ready\n")
    assert run.healthz == (200, "ok\n")


def test_image_counters(run: MetricsRun) -> None:
    first, second = run.after_first, run.after_second

    assert value(first, "clipfleet_images_total", outcome="succeeded") == 2
    assert value(first, "clipfleet_images_total", outcome="failed") == 1
    assert value(first, "clipfleet_images_failed_total", code="not_found") == 1
    assert value(first, "clipfleet_images_failed_total", code="decode_error") == 0
    assert value(second, "clipfleet_images_total", outcome="succeeded") == 4
    assert value(second, "clipfleet_images_failed_total", code="not_found") == 2


def test_batch_counters(run: MetricsRun) -> None:
    assert value(run.after_first, "clipfleet_batches_total", status="written") == 1
    assert value(run.after_first, "clipfleet_batch_duration_seconds_count") == 1
    assert value(run.after_second, "clipfleet_batches_total", status="written") == 2
    assert value(run.after_second, "clipfleet_batches_total", status="error") is None


def test_queue_wait_histogram(run: MetricsRun) -> None:
    # One first delivery per job; the worker was idle, so each batch waited well under a second in the queue.
    assert value(run.after_first, "clipfleet_batch_queue_wait_seconds_count") == 1
    assert value(run.after_second, "clipfleet_batch_queue_wait_seconds_count") == 2
    assert 0 <= value(run.after_second, "clipfleet_batch_queue_wait_seconds_sum") < 5
    assert value(run.after_second, "clipfleet_batch_queue_wait_seconds_bucket", le="1.0") == 2


def test_stage_histograms(run: MetricsRun) -> None:
    for stage in STAGES:
        assert value(run.after_first, "clipfleet_stage_duration_seconds_count", stage=stage) == 1, stage
        assert value(run.after_second, "clipfleet_stage_duration_seconds_count", stage=stage) == 2, stage
        assert value(run.after_second, "clipfleet_stage_duration_seconds_sum", stage=stage) > 0, stage


def test_prompt_cache_miss_then_hit(run: MetricsRun) -> None:
    first, second = run.after_first, run.after_second

    assert value(first, "clipfleet_prompt_cache_misses_total", level="process") == 1
    assert value(first, "clipfleet_prompt_cache_misses_total", level="redis") == 1
    assert value(first, "clipfleet_prompt_cache_hits_total", level="process") == 0
    assert value(first, "clipfleet_prompt_encoding_duration_seconds_count") == 1
    assert value(second, "clipfleet_prompt_cache_hits_total", level="process") == 1
    assert value(second, "clipfleet_prompt_cache_misses_total", level="process") == 1
    assert value(second, "clipfleet_prompt_encoding_duration_seconds_count") == 1


def test_model_load_and_worker_gauges(run: MetricsRun) -> None:
    samples = run.after_second

    assert value(samples, "clipfleet_model_load_duration_seconds_count") == 1
    assert value(samples, "clipfleet_worker_ready") == 1
    # The worker runs on CPU, where no device memory is reported.
    assert not [key for key in samples if key[0] == "clipfleet_device_memory_allocated_bytes"]


def test_metric_folder_removed_on_exit(run: MetricsRun) -> None:
    assert run.metrics_folder.name.startswith("clipfleet-metrics-")
    assert run.metrics_folder_existed is True
    assert not run.metrics_folder.exists()


def test_port_in_use_stops_worker(tmp_path: Path, redis_url: str, tiny_clip_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as raised:
            start_worker(tmp_path, redis_url, tiny_clip_dir, extra_env={"CLIPFLEET_METRICS_PORT": str(port)})

    assert "worker exited with code 1" in str(raised.value)
    assert f"CLIPFLEET_METRICS_PORT={port}" in str(raised.value)
