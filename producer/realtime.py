"""Realtime embedding requests: the messages that the HTTP API and the workers exchange through Redis.

A request travels like this:

1. The sender stores the request's JSON under REALTIME_REQUEST_KEY (with a TTL) and appends its id to the
   REALTIME_PENDING_KEY list of the realtime queue. Then it sets the queue's REALTIME_WAKE_KEY if it is absent,
   and sends one TASK_EMBED task to the queue only when it set the key. So the queue contains at most one wake-up
   task however many requests wait, and the length of the pending list measures the queue's load.
2. A worker that takes a TASK_EMBED task deletes the wake key and, in the same transaction, pops up to
   CLIPFLEET_REALTIME_MAX_REQUESTS ids from the pending list, so the requests of many clients go through the model
   together. When ids remain in the list, it sends one more wake-up (the same way a sender does) before it runs
   the model, so another pool process or worker takes them in parallel. A task that finds the list empty ends at
   once.
3. The worker pushes one RealtimeReply per request to REALTIME_REPLY_KEY, where the sender waits for it.

No request is left without a wake-up: a sender that finds the wake key set pushed its id before it looked, and
the worker that will run that key's task deletes the key before it pops, so that pop sees the id. A wake-up can
still be lost: its task expired, or its worker was killed after taking it. The wake key then expires after
WAKE_TTL_S, and each waiting sender re-arms the queue every WAIT_STEP_S (see `wait_reply`).

A request popped by a worker that dies before it replies is lost: its sender times out.
"""
from __future__ import annotations

import base64
import re
import time
from typing import Any, Literal

import numpy as np
import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from producer.constants import (
    REALTIME_PENDING_KEY,
    REALTIME_REPLY_KEY,
    REALTIME_REQUEST_KEY,
    REALTIME_WAKE_KEY,
    TASK_EMBED,
)

REALTIME_MESSAGE_VERSION = 1
# Request ids become parts of Redis keys: letters, digits, '_' and '-' only.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A stored request outlives its deadline by this much, so a worker that pops it late still finds it and skips it.
REQUEST_TTL_MARGIN_S = 30.0
# Replies wait this long for their sender, which normally reads them at once.
REPLY_TTL_S = 60
# The sender waits for its reply in blocking reads of at most this many seconds, below the Redis socket timeout.
WAIT_STEP_S = 2.0
# A wake key outlives its task by at most this long when the task is lost. Waiting senders then re-arm the queue.
WAKE_TTL_S = 5.0


class RealtimeInput(BaseModel):
    """One input to embed: a text, or an image given as an s3:// URI or as base64-encoded file bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    kind: Literal["text", "image"]
    text: str | None = None
    uri: str | None = None
    data: str | None = None  # base64 of the image file's bytes

    @model_validator(mode="after")
    def _check_fields(self) -> RealtimeInput:
        given = [name for name in ("text", "uri", "data") if getattr(self, name) is not None]
        expected = ["text"] if self.kind == "text" else None
        if expected is not None and given != expected:
            raise ValueError("a text input carries `text` only")
        if self.kind == "image" and given not in (["uri"], ["data"]):
            raise ValueError("an image input carries exactly one of `uri` and `data`")
        return self


class RealtimeRequest(BaseModel):
    """The inputs of one embeddings request, all for one model."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = REALTIME_MESSAGE_VERSION
    request_id: str
    model: str = Field(min_length=1)  # the CLIPFLEET_MODEL value of the workers that serve it
    inputs: list[RealtimeInput] = Field(min_length=1)
    deadline: float  # Unix time after which the sender no longer waits; workers skip the request after it

    @field_validator("request_id")
    @classmethod
    def _check_request_id(cls, value: str) -> str:
        return check_request_id(value)


class RealtimeError(BaseModel):
    """The reason a request failed. `status` is the HTTP status of the API's response."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int | None = None  # the failing input, or None for the whole request
    # an image error code of producer.constants.ERROR_CODES, or invalid_input, text_too_long, model_not_served, or
    # internal_error (status 500: the worker failed, or the stored request could not be read)
    code: str
    message: str
    status: int = 400


class RealtimeReply(BaseModel):
    """A worker's reply to one request: the embeddings of all its inputs, or the error that stopped it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    model: str
    worker: str = ""  # the worker's name, for logs
    dim: int = 0
    embeddings: str = ""  # base64 of little-endian float32 [inputs, dim], each row L2-normalised
    tokens: list[int] = Field(default_factory=list)  # per input: text tokens, or image patches plus one
    error: RealtimeError | None = None


class EmbedTaskMessage(BaseModel):
    """The argument of a TASK_EMBED task: which realtime queue's pending list to take requests from."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = REALTIME_MESSAGE_VERSION
    queue: str = Field(min_length=1, max_length=200)


def check_request_id(value: str) -> str:
    """Return `value` when it is a valid request id; raise ValueError quoting it otherwise."""
    if not REQUEST_ID_RE.fullmatch(value):
        raise ValueError(f"request id {value[:80]!r} must be 1 to 64 letters, digits, '_' or '-'")
    return value


def encode_vectors(vectors: np.ndarray) -> str:
    """Return base64 of `vectors` ([rows, dim]) as little-endian float32, the form of RealtimeReply.embeddings."""
    return base64.b64encode(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).decode("ascii")


def decode_vectors(data: str, rows: int, dim: int) -> np.ndarray:
    """Return the float32 [rows, dim] array that `encode_vectors` encoded. Raises ValueError on a size mismatch."""
    raw = base64.b64decode(data.encode("ascii"), validate=True)
    if len(raw) != rows * dim * 4:
        raise ValueError(f"expected {rows} x {dim} float32 values, got {len(raw)} bytes")
    return np.frombuffer(raw, dtype="<f4").reshape(rows, dim).astype(np.float32)


def send_request(client: redis.Redis, celery: Any, queue: str, request: RealtimeRequest) -> None:
    """Store `request`, append it to `queue`'s pending list and wake the queue's workers (see `arm_wake`).

    Sends a TASK_EMBED task only when no wake-up is queued already. The task expires at the request's deadline,
    so a worker does not run it once the sender has stopped waiting.
    """
    ttl_ms = int((max(request.deadline - time.time(), 0.0) + REQUEST_TTL_MARGIN_S) * 1000)
    with client.pipeline() as pipe:
        pipe.set(REALTIME_REQUEST_KEY.format(request_id=request.request_id), request.model_dump_json(), px=ttl_ms)
        pipe.rpush(REALTIME_PENDING_KEY.format(queue=queue), request.request_id)
        pipe.execute()
    # The id is in the list before the wake key is read: the order that `take_pending` relies on.
    arm_wake(client, celery, queue, expires_s=request.deadline - time.time())


def arm_wake(client: redis.Redis, celery: Any, queue: str, expires_s: float) -> bool:
    """Send one TASK_EMBED task to `queue` unless a wake-up is queued already; return whether it sent one.

    The wake key (REALTIME_WAKE_KEY, WAKE_TTL_S) marks the queued wake-up. `celery` is any Celery app whose broker is
    the workers' Redis. The task expires after `expires_s` seconds (at least 1).
    """
    if not client.set(REALTIME_WAKE_KEY.format(queue=queue), 1, nx=True, px=int(WAKE_TTL_S * 1000)):
        return False
    task = EmbedTaskMessage(queue=queue).model_dump()
    celery.send_task(TASK_EMBED, args=[task], queue=queue, expires=max(expires_s, 1.0))
    return True


def take_pending(client: redis.Redis, queue: str, max_requests: int) -> tuple[list[str], int]:
    """Pop up to `max_requests` request ids off `queue`'s pending list; return them and the number of ids left.

    One transaction deletes the wake key, then pops. A sender pushes its id before it tries to set the wake key, so
    a sender that found the key set has its id in the list when the worker holding that key's task pops here. The
    caller must call `arm_wake` when ids are left, because their senders may have relied on this pop.
    """
    with client.pipeline() as pipe:
        pipe.delete(REALTIME_WAKE_KEY.format(queue=queue))
        pipe.lpop(REALTIME_PENDING_KEY.format(queue=queue), max_requests)
        pipe.llen(REALTIME_PENDING_KEY.format(queue=queue))
        _, ids, remaining = pipe.execute()
    return [value.decode() if isinstance(value, bytes) else value for value in ids or []], int(remaining)


def wait_reply(
    client: redis.Redis, request_id: str, deadline: float, *, celery: Any = None, queue: str | None = None
) -> RealtimeReply | None:
    """Return the reply to request `request_id`, or None when Unix time `deadline` passes first.

    With `celery` and `queue` (the request's realtime queue), each WAIT_STEP_S without a reply re-arms the queue
    when requests wait in it and no wake-up is queued, so a lost wake-up task delays the request by at most
    WAKE_TTL_S + WAIT_STEP_S. That costs one or two Redis commands per step.
    """
    key = REALTIME_REPLY_KEY.format(request_id=request_id)
    while (remaining_s := deadline - time.time()) > 0:
        popped = client.blpop([key], timeout=max(0.01, min(WAIT_STEP_S, remaining_s)))
        if popped is not None:
            return RealtimeReply.model_validate_json(popped[1])
        if celery is not None and queue is not None and client.llen(REALTIME_PENDING_KEY.format(queue=queue)):
            arm_wake(client, celery, queue, expires_s=deadline - time.time())
    return None


def withdraw_request(client: redis.Redis, queue: str, request_id: str) -> None:
    """Remove a request whose sender stopped waiting, so no worker spends time on it. Idempotent."""
    with client.pipeline() as pipe:
        pipe.lrem(REALTIME_PENDING_KEY.format(queue=queue), 1, request_id)
        pipe.delete(REALTIME_REQUEST_KEY.format(request_id=request_id))
        pipe.execute()


def push_reply(client: redis.Redis, reply: RealtimeReply) -> None:
    """Deliver `reply` to its waiting sender (used by the workers)."""
    key = REALTIME_REPLY_KEY.format(request_id=reply.request_id)
    with client.pipeline() as pipe:
        pipe.rpush(key, reply.model_dump_json())
        pipe.expire(key, REPLY_TTL_S)
        pipe.execute()
