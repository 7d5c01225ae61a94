"""A real Celery worker process loads the model once, in its pool process, and reuses it across jobs."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from producer import Client, Settings
from tests.support.worker import start_worker

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
