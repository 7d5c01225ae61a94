"""A real Celery worker process loads the model once, in its pool process, and reuses it across jobs.

The worker's Celery settings derived from the visibility timeout and the shutdown grace period are checked here too.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from producer import Client, Settings
from tests.support.worker import start_worker
from workers.app import check_visibility_timeout, delivery_limits, worker_config

DATA = Path(__file__).resolve().parents[1] / "data"
PHOTOS = ["astronaut.jpg", "coffee.jpg"]
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
WAIT_S = 120
TORCH_LIBRARY = "libtorch_cpu"  # torch's core shared library, in CPU and CUDA builds alike


@dataclass
class WorkerRun:
    log_lines: list[str]
    parent_maps_torch: bool
    children_map_torch: list[bool]


def maps_torch(pid: int) -> bool:
    """Return True when process `pid` has torch's shared library mapped, read from /proc/PID/maps."""
    return TORCH_LIBRARY in Path(f"/proc/{pid}/maps").read_text(errors="replace")


def run_two_jobs(tmp_path: Path, redis_url: str, tiny_clip_dir: Path) -> WorkerRun:
    """Run two local-folder jobs through one worker, inspect its processes, stop it and read its log."""
    source = tmp_path / "photos"
    source.mkdir()
    for name in PHOTOS:
        shutil.copy(DATA / name, source / name)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()

    worker = start_worker(log_dir, redis_url, tiny_clip_dir)
    try:
        client = Client(Settings(redis_url=redis_url, model=str(tiny_clip_dir)))
        jobs = [client.submit(source=str(source), labels=LABELS, output=str(tmp_path / f"out-{n}")) for n in range(2)]
        states = [job.wait(timeout_s=WAIT_S, progress=False).state for job in jobs]
        parent_pid = worker.process.pid
        children = [child.pid for child in psutil.Process(parent_pid).children()]
        run = WorkerRun([], maps_torch(parent_pid), [maps_torch(pid) for pid in children])
    finally:
        worker.stop()
    assert states == ["succeeded", "succeeded"], worker.log_tail(40)
    run.log_lines = worker.log_path.read_text(errors="replace").splitlines()
    return run


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_model_loaded_once_in_pool_process(tmp_path: Path, redis_url: str, tiny_clip_dir: Path) -> None:
    # The checks share one test, so the worker starts once, because the redis_url fixture empties Redis per test.
    run = run_two_jobs(tmp_path, redis_url, tiny_clip_dir)
    loads = [line for line in run.log_lines if "Loaded model" in line]

    assert len(loads) == 1, loads
    assert "ForkPoolWorker" in loads[0]
    assert "MainProcess" not in loads[0]
    # Log lines that the parent writes before Celery configures logging are lost. A parent that loaded the
    # model would have torch mapped, so its memory map is checked too.
    assert run.children_map_torch == [True], "the pool process should have torch loaded"
    assert run.parent_maps_torch is False, "the parent that forks must not import torch or load the model"


@pytest.mark.parametrize(
    ("visibility_s", "soft_s", "hard_s", "slow_s", "backoff_s", "restore_s"),
    [(900, 720.0, 810.0, 450.0, 90, 10.0), (10, 8.0, 9.0, 5.0, 1, 2.0), (3600, 2880.0, 3240.0, 1800.0, 120, 10.0)],
    ids=["default", "minimum", "one-hour"],
)
def test_delivery_limits_from_visibility(
    visibility_s: int, soft_s: float, hard_s: float, slow_s: float, backoff_s: int, restore_s: float
) -> None:
    limits = delivery_limits(Settings(visibility_timeout_s=visibility_s))
    assert limits.soft_time_limit_s == soft_s
    assert limits.hard_time_limit_s == hard_s
    assert limits.slow_batch_s == slow_s
    assert limits.retry_backoff_max_s == backoff_s
    assert limits.restore_interval_s == restore_s


@pytest.mark.parametrize("visibility_s", [10, 11, 59, 100, 900, 1199, 3600, 86400])
def test_retry_wait_and_hard_limit_fit_visibility(visibility_s: int) -> None:
    limits = delivery_limits(Settings(visibility_timeout_s=visibility_s))
    assert limits.soft_time_limit_s < limits.hard_time_limit_s
    assert limits.retry_backoff_max_s + limits.hard_time_limit_s <= visibility_s


def test_visibility_check_rejects_short_timeout() -> None:
    with pytest.raises(ValueError) as raised:
        check_visibility_timeout(Settings(visibility_timeout_s=59, fetch_timeout_s=30))
    message = str(raised.value)
    assert "CLIPFLEET_VISIBILITY_TIMEOUT_S=59 is below 2 x CLIPFLEET_FETCH_TIMEOUT_S=30" in message
    assert "time limit of 47.2 s" in message
    assert "at least 60" in message


def test_visibility_check_accepts_twice_fetch_timeout() -> None:
    check_visibility_timeout(Settings(visibility_timeout_s=60, fetch_timeout_s=30))
    check_visibility_timeout(Settings(visibility_timeout_s=900, fetch_timeout_s=30))


def test_worker_config_time_limits() -> None:
    config = worker_config(Settings(redis_url="redis://127.0.0.1:6379/0", visibility_timeout_s=100))
    assert config["task_soft_time_limit"] == 80.0
    assert config["task_time_limit"] == 90.0
    assert config["task_acks_on_timeout"] is False
    assert config["worker_soft_shutdown_timeout"] == 0.0
    assert config["worker_enable_soft_shutdown_on_idle"] is False


def test_worker_config_restores_unacked_every_interval() -> None:
    options = worker_config(Settings(redis_url="redis://127.0.0.1:6379/0", visibility_timeout_s=30))["broker_transport_options"]
    assert options["visibility_timeout"] == 30
    assert options["unacked_restore_interval"] == 6.0
    assert options["unacked_restore_throttle"] == 1


def test_shutdown_grace_rejects_negative() -> None:
    with pytest.raises(ValueError):
        Settings(shutdown_grace_s=-1)
