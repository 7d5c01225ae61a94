"""`clipfleet run` and `clipfleet worker` as a user runs them: real subprocesses, checked for leftovers."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from producer.embedded import free_port

DATA = Path(__file__).resolve().parent / "data"
RUN_TIMEOUT_S = 240


def clipfleet(*args: str, env: dict[str, str] | None = None, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True, timeout=timeout_s, env=env
    )


# Every process these tests start inherits this mark, so processes of other programs on the machine
# (another test run, a developer's own worker) are never mistaken for ones left behind. redis-server
# overwrites its environment when it sets its process title, so it is recognised by its working
# directory instead: the embedded stack's folder, made under TMPDIR.
PROCESS_MARK_VARIABLE = "CLIPFLEET_TEST_PROCESS_MARK"
PROCESS_MARK = uuid.uuid4().hex
PRIVATE_TMPDIR = tempfile.mkdtemp(prefix="clipfleet-cli-tests-")
atexit.register(shutil.rmtree, PRIVATE_TMPDIR, ignore_errors=True)


def private_environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLIPFLEET_")}
    env[PROCESS_MARK_VARIABLE] = PROCESS_MARK
    env["TMPDIR"] = PRIVATE_TMPDIR
    return env


def service_processes() -> set[int]:
    """Return the pids of live redis-server and clipfleet worker processes started by these tests."""
    found = set()
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["status"] != psutil.STATUS_ZOMBIE and ("redis-server" in cmdline or "workers.app" in cmdline):
            if _has_mark(process):
                found.add(process.info["pid"])
    return found


def _has_mark(process: psutil.Process) -> bool:
    try:
        return process.environ().get(PROCESS_MARK_VARIABLE) == PROCESS_MARK or process.cwd().startswith(PRIVATE_TMPDIR)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def processes_started_since(before: set[int], settle_s: float = 30.0) -> set[int]:
    """Return the service processes that appeared after `before` and are still alive once `settle_s` has passed
    or all of them are gone, whichever comes first."""
    deadline = time.monotonic() + settle_s
    while (left := service_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for photo in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(DATA / photo, folder / photo)
    shutil.copy(DATA / "astronaut.jpg", folder / "nested" / "space walk+1.JPG")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_run_classifies_local_folder(photos: Path, tmp_path: Path, tiny_clip_dir: Path) -> None:
    output = tmp_path / "results"
    result = clipfleet("run", str(photos), "--labels", "cat,rocket,coffee", "--output", str(output), "--model", str(tiny_clip_dir), env=private_environment())
    assert result.returncode == 0, result.stderr
    assert "5 total, 4 classified, 1 failed, 1 skipped" in result.stdout
    assert "error: decode_error" in result.stdout

    (job_folder,) = output.iterdir()
    summary = json.loads((job_folder / "_SUCCESS.json").read_text())
    rows = [json.loads(line) for line in (job_folder / "part-000000.jsonl").read_text().splitlines()]
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (5, 4, 1)
    assert sorted(row["uri"] for row in rows) == sorted(str(path) for path in photos.rglob("*") if path.suffix.lower() in (".jpg", ".png"))
    assert f"results: {job_folder}" in result.stdout


def test_run_leaves_no_process(photos: Path, tmp_path: Path, tiny_clip_dir: Path) -> None:
    before = service_processes()
    result = clipfleet("run", str(photos), "--labels", "cat,dog", "--output", str(tmp_path / "out"), "--model", str(tiny_clip_dir), env=private_environment())
    assert result.returncode == 0, result.stderr
    assert processes_started_since(before) == set()


@contextlib.contextmanager
def long_run(tmp_path: Path, tiny_clip_dir: Path, images: int) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Start `clipfleet run` on `images` copies of a photo in batches of 4 and yield once its first shard exists.

    Yields the process and the output folder; kills the process on exit if it is still running.
    """
    photos = tmp_path / "many"
    photos.mkdir()
    for index in range(images):
        shutil.copy(DATA / "coffee.jpg", photos / f"{index:04d}.jpg")
    output = tmp_path / "out"
    command = [sys.executable, "-m", "producer.cli", "run", str(photos), "--labels", "cat,dog", "--output", str(output), "--model", str(tiny_clip_dir), "--batch-size", "4"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=private_environment())
    try:
        _wait_for_first_shard(output, process)
        yield process, output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_running_stack_processes_are_found(tmp_path: Path, tiny_clip_dir: Path) -> None:
    before = service_processes()
    with long_run(tmp_path, tiny_clip_dir, 200) as (process, _):
        started = service_processes() - before
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    # The private Redis, the worker's main process and its pool process.
    assert len(started) == 3


def test_run_interrupted_stops_everything(tmp_path: Path, tiny_clip_dir: Path) -> None:
    before = service_processes()
    with long_run(tmp_path, tiny_clip_dir, 400) as (process, output):
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert processes_started_since(before) == set()
    assert len(list(output.glob("*/part-*.jsonl"))) < 100


def _wait_for_first_shard(output: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if list(output.glob("*/part-*.jsonl")):
            return
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.1)
    raise TimeoutError("no shard written")


def test_run_missing_model_explains_fix(photos: Path, tmp_path: Path) -> None:
    env = private_environment() | {"HF_HUB_OFFLINE": "1"}
    before = service_processes()
    result = clipfleet("run", str(photos), "--labels", "cat", "--output", str(tmp_path / "out"), "--model", "no-such-org/no-such-clip", env=env)
    assert result.returncode == 1
    assert "'no-such-org/no-such-clip'" in result.stderr
    assert "CLIPFLEET_MODEL" in result.stderr
    assert processes_started_since(before) == set()


def test_worker_fails_at_start_without_model(redis_url: str) -> None:
    env = private_environment() | {"HF_HUB_OFFLINE": "1", "CLIPFLEET_REDIS_URL": redis_url, "CLIPFLEET_MODEL": "openai/clip-vit-base-patch32"}
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool=prefork", "--concurrency=1"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode != 0
    assert "model 'openai/clip-vit-base-patch32' could not be loaded" in result.stderr
    assert "hf download openai/clip-vit-base-patch32" in result.stderr


def test_run_invalid_labels_exit_2(photos: Path, tmp_path: Path) -> None:
    result = clipfleet("run", str(photos), "--labels", "cat,,dog", "--output", str(tmp_path / "out"), env=private_environment())
    assert result.returncode == 2
    assert "labels" in result.stderr
    assert "empty" in result.stderr


def test_invalid_setting_named(photos: Path, tmp_path: Path) -> None:
    env = private_environment() | {"CLIPFLEET_BATCH_SIZE": "abc"}
    result = clipfleet("run", str(photos), "--labels", "cat", "--output", str(tmp_path / "out"), env=env)
    assert result.returncode == 2
    assert "CLIPFLEET_BATCH_SIZE='abc' is invalid" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_redis_named(photos: Path, tmp_path: Path) -> None:
    env = private_environment() | {"CLIPFLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = clipfleet("submit", str(photos), "--labels", "cat", "--output", str(tmp_path / "out"), env=env, timeout_s=60)
    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr
    assert "Traceback" not in result.stderr


def test_submit_wait_cancelled_exits_1(redis_url: str, photos: Path, tmp_path: Path, tiny_clip_dir: Path) -> None:
    """With no worker, the job stays queued until another client cancels it; `submit --wait` then exits 1."""
    env = private_environment() | {"CLIPFLEET_REDIS_URL": redis_url}
    command = [sys.executable, "-m", "producer.cli", "submit", str(photos), "--labels", "cat", "--output", str(tmp_path / "out"), "--model", str(tiny_clip_dir), "--wait"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        job_id = process.stdout.readline().strip()
        assert clipfleet("cancel", job_id, env=env, timeout_s=60).returncode == 0
        stdout, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1
    assert f"job {job_id}: cancelled" in stdout


def test_run_double_interrupt_stops_everything(tmp_path: Path, tiny_clip_dir: Path) -> None:
    before = service_processes()
    with long_run(tmp_path, tiny_clip_dir, 200) as (process, _):
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert process.returncode == 130
    assert processes_started_since(before) == set()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no CUDA device exists")
def test_worker_without_cuda_exits_1(redis_url: str, tiny_clip_dir: Path) -> None:
    env = private_environment() | {"CLIPFLEET_REDIS_URL": redis_url, "CLIPFLEET_MODEL": str(tiny_clip_dir), "CLIPFLEET_DEVICE": "cuda"}
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool=prefork", "--concurrency=1"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 1
    assert "CLIPFLEET_DEVICE=cuda but torch finds no CUDA device" in result.stderr


def test_killed_run_stops_children(tmp_path: Path, tiny_clip_dir: Path) -> None:
    before = service_processes()
    with long_run(tmp_path, tiny_clip_dir, 200) as (process, _):
        process.kill()
        process.communicate(timeout=30)
    assert processes_started_since(before) == set()
