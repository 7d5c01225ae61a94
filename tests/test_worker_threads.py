"""Torch threads of the worker's pool processes: real Celery workers on a redis-server process."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from celery.concurrency.prefork import TaskPool
from celery.concurrency.solo import TaskPool as SoloPool
from pydantic import ValidationError

from producer.settings import MAX_TORCH_THREADS, Settings
from tests.support.worker import start_worker
from workers.app import _forks_pool_processes
from workers.model import usable_cpus

THREADS_LINE = re.compile(r"Pool process (\d+) runs the model with torch threads=(\d+) \(CLIPFLEET_TORCH_THREADS=(\S+), pool processes=(\d+),")
LOG_WAIT_S = 60.0


def pool_thread_lines(log_path: Path, processes: int) -> list[tuple[str, ...]]:
    """Wait until `processes` pool processes have logged their torch threads; return the parsed lines."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        found = THREADS_LINE.findall(log_path.read_text(errors="replace"))
        if len(found) >= processes or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("concurrency", [2, "auto"])
def test_auto_threads_divide_cpus(concurrency: int | str, tmp_path: Path, redis_server, tiny_clip_dir: Path) -> None:
    processes = usable_cpus() if concurrency == "auto" else concurrency
    worker = start_worker(tmp_path, redis_server.url, tiny_clip_dir, concurrency=concurrency)
    try:
        lines = pool_thread_lines(worker.log_path, processes)
    finally:
        worker.stop()
    assert len({pid for pid, *_ in lines}) == processes, lines
    expected = max(1, usable_cpus() // processes)
    assert [(threads, setting, count) for _, threads, setting, count in lines] == [(str(expected), "auto", str(processes))] * processes


def test_fixed_torch_threads(tmp_path: Path, redis_server, tiny_clip_dir: Path) -> None:
    threads = usable_cpus() + 1
    worker = start_worker(tmp_path, redis_server.url, tiny_clip_dir, extra_env={"CLIPFLEET_TORCH_THREADS": str(threads)})
    try:
        lines = pool_thread_lines(worker.log_path, 1)
        log = worker.log_path.read_text(errors="replace")
    finally:
        worker.stop()
    assert [(count, setting, processes) for _, count, setting, processes in lines] == [(str(threads), str(threads), "1")]
    assert f"CLIPFLEET_TORCH_THREADS={threads} in 1 pool processes is more threads than the {usable_cpus()} usable CPUs" in log


@pytest.mark.parametrize(("pool", "forks"), [("prefork", True), ("solo", False), ("threads", False), (TaskPool, True), (SoloPool, False)])
def test_pool_kind_detected(pool: object, forks: bool) -> None:
    assert _forks_pool_processes(pool) is forks


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", "", str(MAX_TORCH_THREADS + 1)])
def test_invalid_torch_threads_rejected(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFLEET_TORCH_THREADS", value)
    with pytest.raises(ValidationError, match=f"use a whole number of threads from 1 to {MAX_TORCH_THREADS}, or auto"):
        Settings()


@pytest.mark.parametrize(("value", "expected"), [(" auto ", "auto"), ("AUTO", "auto"), ("1", 1), (str(MAX_TORCH_THREADS), MAX_TORCH_THREADS)])
def test_valid_torch_threads_accepted(value: str, expected: int | str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFLEET_TORCH_THREADS", value)
    assert Settings().torch_threads == expected
