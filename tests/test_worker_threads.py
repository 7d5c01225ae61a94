"""Torch threads of the worker's pool processes: real Celery workers on a redis-server process."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.support.worker import start_worker
from workers.model import usable_cpus

THREADS_LINE = re.compile(r"Pool process (\d+) runs the model on (\d+) torch threads \(CLIPFLEET_TORCH_THREADS=(\S+), (\d+) pool processes")
LOG_WAIT_S = 60.0


def pool_thread_lines(log_path: Path, processes: int) -> list[tuple[str, ...]]:
    """Wait until `processes` pool processes have logged their torch threads; return the parsed lines."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        found = THREADS_LINE.findall(log_path.read_text(errors="replace"))
        if len(found) >= processes or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_auto_threads_divide_cpus(tmp_path: Path, redis_server, tiny_clip_dir: Path) -> None:
    worker = start_worker(tmp_path, redis_server.url, tiny_clip_dir, concurrency=2)
    try:
        lines = pool_thread_lines(worker.log_path, 2)
    finally:
        worker.stop()
    assert len({pid for pid, *_ in lines}) == 2, lines
    expected = max(1, usable_cpus() // 2)
    assert [(threads, setting, processes) for _, threads, setting, processes in lines] == [(str(expected), "auto", "2")] * 2


def test_fixed_torch_threads(tmp_path: Path, redis_server, tiny_clip_dir: Path) -> None:
    worker = start_worker(tmp_path, redis_server.url, tiny_clip_dir, extra_env={"CLIPFLEET_TORCH_THREADS": "3"})
    try:
        lines = pool_thread_lines(worker.log_path, 1)
    finally:
        worker.stop()
    assert [(threads, setting, processes) for _, threads, setting, processes in lines] == [("3", "3", "1")]


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_invalid_torch_threads_rejected(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from producer.settings import Settings

    monkeypatch.setenv("CLIPFLEET_TORCH_THREADS", value)
    with pytest.raises(ValidationError, match="use a whole number of threads of at least 1, or auto"):
        Settings()
