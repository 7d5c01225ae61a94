"""The sender's side of `producer.realtime` against a real Redis: one queued wake-up task per realtime queue."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from producer.constants import REALTIME_PENDING_KEY, REALTIME_WAKE_KEY
from producer.queue import make_celery
from producer.realtime import (
    WAIT_STEP_S,
    WAKE_TTL_S,
    RealtimeInput,
    RealtimeRequest,
    arm_wake,
    send_request,
    take_pending,
    wait_reply,
)
from producer.settings import Settings

QUEUE = "realtime-sender-test"
PENDING_KEY = REALTIME_PENDING_KEY.format(queue=QUEUE)
WAKE_KEY = REALTIME_WAKE_KEY.format(queue=QUEUE)
# One WAIT_STEP_S passes without a reply, and the deadline comes before a second one ends.
SHORT_WAIT_S = WAIT_STEP_S * 1.25


@pytest.fixture
def celery_app(redis_url: str) -> Iterator[Celery]:
    app = make_celery(Settings(redis_url=redis_url))
    yield app
    app.close()


def make_request(deadline_s: float = 60.0) -> RealtimeRequest:
    return RealtimeRequest(
        request_id=uuid.uuid4().hex, model="tiny", inputs=[RealtimeInput(kind="text", text="a cat")],
        deadline=time.time() + deadline_s,
    )


def queued_tasks(client: redis.Redis) -> int:
    """Return the TASK_EMBED tasks in the Celery list of QUEUE, which no worker reads here."""
    return int(client.llen(QUEUE))


def test_requests_share_one_wake_up(redis_client: redis.Redis, celery_app: Celery) -> None:
    requests = [make_request() for _ in range(20)]
    for request in requests:
        send_request(redis_client, celery_app, QUEUE, request)

    assert queued_tasks(redis_client) == 1
    assert [value.decode() for value in redis_client.lrange(PENDING_KEY, 0, -1)] == [request.request_id for request in requests]
    assert 0 < redis_client.pttl(WAKE_KEY) <= WAKE_TTL_S * 1000


def test_take_pending_clears_wake_key(redis_client: redis.Redis, celery_app: Celery) -> None:
    requests = [make_request() for _ in range(3)]
    for request in requests:
        send_request(redis_client, celery_app, QUEUE, request)

    ids, remaining = take_pending(redis_client, QUEUE, 2)

    assert ids == [request.request_id for request in requests[:2]]
    assert remaining == 1
    assert redis_client.exists(WAKE_KEY) == 0
    # The next request, or the worker that left one behind, queues a new wake-up.
    send_request(redis_client, celery_app, QUEUE, make_request())
    assert queued_tasks(redis_client) == 2


def test_take_pending_of_empty_queue(redis_client: redis.Redis) -> None:
    redis_client.set(WAKE_KEY, 1)

    assert take_pending(redis_client, QUEUE, 10) == ([], 0)
    assert redis_client.exists(WAKE_KEY) == 0


def test_arm_wake_sends_once_until_taken(redis_client: redis.Redis, celery_app: Celery) -> None:
    assert arm_wake(redis_client, celery_app, QUEUE, expires_s=30.0) is True
    assert arm_wake(redis_client, celery_app, QUEUE, expires_s=30.0) is False
    assert queued_tasks(redis_client) == 1

    take_pending(redis_client, QUEUE, 10)

    assert arm_wake(redis_client, celery_app, QUEUE, expires_s=30.0) is True
    assert queued_tasks(redis_client) == 2


def test_wait_reply_rearms_lost_wake_up(redis_client: redis.Redis, celery_app: Celery) -> None:
    request = make_request()
    send_request(redis_client, celery_app, QUEUE, request)
    redis_client.delete(QUEUE, WAKE_KEY)  # the task was lost and its wake key expired

    started = time.monotonic()
    reply = wait_reply(redis_client, request.request_id, time.time() + SHORT_WAIT_S, celery=celery_app, queue=QUEUE)

    assert reply is None  # no worker reads the queue here
    assert SHORT_WAIT_S - 0.1 <= time.monotonic() - started < SHORT_WAIT_S + 2
    assert queued_tasks(redis_client) == 1
    assert redis_client.exists(WAKE_KEY) == 1


def test_wait_reply_keeps_queued_wake_up(redis_client: redis.Redis, celery_app: Celery) -> None:
    request = make_request()
    send_request(redis_client, celery_app, QUEUE, request)

    assert wait_reply(redis_client, request.request_id, time.time() + SHORT_WAIT_S, celery=celery_app, queue=QUEUE) is None

    assert queued_tasks(redis_client) == 1


def test_wait_reply_arms_nothing_for_empty_queue(redis_client: redis.Redis, celery_app: Celery) -> None:
    # A worker took the request and embeds it: nothing waits, so no wake-up is needed.
    request = make_request()
    send_request(redis_client, celery_app, QUEUE, request)
    take_pending(redis_client, QUEUE, 10)
    redis_client.delete(QUEUE)

    assert wait_reply(redis_client, request.request_id, time.time() + SHORT_WAIT_S, celery=celery_app, queue=QUEUE) is None

    assert queued_tasks(redis_client) == 0
    assert redis_client.exists(WAKE_KEY) == 0


def test_wait_reply_without_queue_arms_nothing(redis_client: redis.Redis, celery_app: Celery) -> None:
    request = make_request()
    send_request(redis_client, celery_app, QUEUE, request)
    redis_client.delete(QUEUE, WAKE_KEY)

    assert wait_reply(redis_client, request.request_id, time.time() + SHORT_WAIT_S) is None

    assert queued_tasks(redis_client) == 0
