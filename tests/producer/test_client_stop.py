"""What the job records when enqueueing stops, and when a submitter learns the job id."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.client import Client, _describe_stop, make_spec
from producer.constants import JOB_PRODUCER_KEY
from producer.settings import Settings
from producer.spec import JobSpec

DATA = Path(__file__).resolve().parents[1] / "data"


def test_interrupt_described() -> None:
    assert _describe_stop(KeyboardInterrupt()) == "interrupted"


def test_error_described_with_message() -> None:
    assert _describe_stop(ConnectionError("Redis went away")) == "ConnectionError: Redis went away"


def test_error_without_message_named() -> None:
    assert _describe_stop(RuntimeError()) == "RuntimeError"


def test_job_id_reported_before_enqueueing(redis_url: str, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_url))
    seen: list[tuple[str, int]] = []

    def on_created(job_id: str) -> None:
        seen.append((job_id, client.store.redis.llen(client.settings.queue)))

    job = client.submit_spec(client_spec(client, tmp_path), on_created=on_created)

    assert seen == [(job.id, 0)]


def test_interrupted_enqueue_recorded(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client(Settings(redis_url=redis_url))

    def interrupt(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("producer.client.enqueue_listing", interrupt)
    created: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        client.submit_spec(client_spec(client, tmp_path), on_created=created.append)

    status = client.job(created[0]).status()
    assert status.state == "queued"
    assert status.error == (
        f"enqueueing stopped (interrupted); the batches already enqueued still run. Continue with "
        f"`clipfleet resume {created[0]}`, or stop the job with `clipfleet cancel {created[0]}`"
    )
    assert not client.store.redis.exists(JOB_PRODUCER_KEY.format(job_id=created[0]))


def client_spec(client: Client, tmp_path: Path) -> JobSpec:
    return make_spec(client.settings, str(DATA), ["cat", "dog"], str(tmp_path / "out"), None, None, None, 5, None)
