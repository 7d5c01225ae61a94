"""Backfill jobs on a real worker: a detached submission, and a cancelled job resubmitted with `--resume`."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer import Client
from producer.constants import DEFAULT_QUEUE
from tests.support.worker import stack_client, worker_stack

DATA = Path(__file__).resolve().parent / "data"
WAIT_S = 180
# The worker consumes DEFAULT_QUEUE. Tasks sent to this queue wait until a test moves them over.
HELD_QUEUE = "clipfleet-held"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    with worker_stack(tmp_path_factory.mktemp("worker-logs"), tiny_clip_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: dict[str, Any], tiny_clip_dir: Path) -> Client:
    return stack_client(stack, tiny_clip_dir)


def image_folder(root: Path, count: int) -> list[str]:
    """Copy the test photographs into `root` as `count` files and return their paths in listing order."""
    photos = sorted(DATA.glob("*.jpg"))
    root.mkdir(parents=True)
    for index in range(count):
        shutil.copy(photos[index % len(photos)], root / f"img-{index:03d}.jpg")
    return [str(root / f"img-{index:03d}.jpg") for index in range(count)]


def wait_for(condition: Any, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(0.1)


def test_detached_submit_completes(client: Client, tmp_path: Path) -> None:
    uris = image_folder(tmp_path / "images", 12)

    job = client.submit(str(tmp_path / "images"), ["cat", "rocket"], str(tmp_path / "out"), batch_size=4, detach=True)
    status = job.wait(timeout_s=WAIT_S, progress=False)
    rows = list(job.results())

    assert status.state == "succeeded"
    assert [row["uri"] for row in rows] == uris
    assert all(row["error"] is None for row in rows)


def test_resume_reruns_only_unfinished_batches(client: Client, tmp_path: Path) -> None:
    uris = image_folder(tmp_path / "images", 20)
    output = tmp_path / "out"
    held = Client(client.settings.model_copy(update={"queue": HELD_QUEUE}))
    job = held.submit(str(tmp_path / "images"), ["cat", "rocket"], str(output), batch_size=2)
    redis = client.store.redis
    # Hand the first 4 batches to the worker, and cancel the job once they are done.
    for _ in range(4):
        redis.rpoplpush(HELD_QUEUE, DEFAULT_QUEUE)
    wait_for(lambda: int(client.store.fields(job.id)["batches_done"]) == 4)
    job.cancel()
    redis.delete(HELD_QUEUE)
    finished = {path: path.stat().st_mtime_ns for path in (output / job.id).glob("part-*.jsonl")}

    again = client.submit(str(tmp_path / "images"), ["cat", "rocket"], str(output), batch_size=2, resume=True)
    status = again.wait(timeout_s=WAIT_S, progress=False)
    rows = list(again.results())

    assert again.id == job.id
    assert status.state == "succeeded"
    assert len(finished) == 4
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    assert Counter(row["uri"] for row in rows) == Counter(uris)
    assert status.done == 20
    assert not (output / job.id / "_CANCELLED.json").exists()
    assert (output / job.id / "_SUCCESS.json").exists()


def test_skip_existing_after_real_job(client: Client, tmp_path: Path) -> None:
    images = tmp_path / "images"
    first_uris = image_folder(images, 8)
    output = tmp_path / "out"
    first = client.submit(str(images), ["cat", "rocket"], str(output), batch_size=4)
    first.wait(timeout_s=WAIT_S, progress=False)
    shutil.copy(images / "img-000.jpg", images / "new-1.jpg")
    shutil.copy(images / "img-001.jpg", images / "new-2.jpg")

    second = client.submit(str(images), ["cat", "rocket"], str(output), batch_size=4, skip_existing=str(output))
    status = second.wait(timeout_s=WAIT_S, progress=False)
    rows = list(second.results())

    assert len(first_uris) == 8
    assert status.state == "succeeded"
    assert status.skipped_existing == 8
    assert status.total == 2
    assert [row["uri"] for row in rows] == [str(images / "new-1.jpg"), str(images / "new-2.jpg")]


def test_detached_resume_after_cancel(client: Client, tmp_path: Path) -> None:
    uris = image_folder(tmp_path / "images", 8)
    output = tmp_path / "out"
    held = Client(client.settings.model_copy(update={"queue": HELD_QUEUE}))
    job = held.submit(str(tmp_path / "images"), ["cat", "rocket"], str(output), batch_size=2)
    job.cancel()
    client.store.redis.delete(HELD_QUEUE)

    again = client.submit(str(tmp_path / "images"), ["cat", "rocket"], str(output), batch_size=2, resume=True, detach=True)
    status = again.wait(timeout_s=WAIT_S, progress=False)

    assert again.id == job.id
    assert status.state == "succeeded"
    assert Counter(row["uri"] for row in again.results()) == Counter(uris)
