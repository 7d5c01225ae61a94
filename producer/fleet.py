"""The registry of live workers in Redis: which models the fleet serves right now, and on which queues.

Each ready worker calls `announce` every HEARTBEAT_INTERVAL_S; its entry expires HEARTBEAT_TTL_S after the last
call, so a worker that dies leaves the registry within that time. `withdraw` removes it at once on shutdown.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import redis

from producer.constants import WORKER_KEY, WORKERS_INDEX_KEY

HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 20.0


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker. Times are Unix seconds."""

    name: str  # Celery's node name and the main process id, for example celery@host/1234
    model: str  # CLIPFLEET_MODEL: a hub id or a local directory
    revision: str  # CLIPFLEET_MODEL_REVISION, or "" for the default
    queue: str  # the batch queue it reads
    realtime_queue: str  # the realtime queue it reads, or "" when it serves batch jobs only
    started_at: float
    heartbeat_at: float


def announce(client: redis.Redis, info: WorkerInfo, ttl_s: float = HEARTBEAT_TTL_S) -> None:
    """Write or refresh `info` with a TTL of `ttl_s`. Idempotent."""
    key = WORKER_KEY.format(name=info.name)
    with client.pipeline() as pipe:
        pipe.hset(key, mapping={name: str(value) for name, value in asdict(info).items()})
        pipe.pexpire(key, int(ttl_s * 1000))
        pipe.zadd(WORKERS_INDEX_KEY, {info.name: info.heartbeat_at + ttl_s})
        pipe.execute()


def withdraw(client: redis.Redis, name: str) -> None:
    """Remove worker `name` from the registry. Idempotent."""
    with client.pipeline() as pipe:
        pipe.delete(WORKER_KEY.format(name=name))
        pipe.zrem(WORKERS_INDEX_KEY, name)
        pipe.execute()


def live_workers(client: redis.Redis, now: float | None = None) -> list[WorkerInfo]:
    """Return the workers whose last heartbeat has not expired, sorted by name. Prunes expired names."""
    now = time.time() if now is None else now
    client.zremrangebyscore(WORKERS_INDEX_KEY, "-inf", now)
    names = sorted(name.decode() if isinstance(name, bytes) else name for name in client.zrange(WORKERS_INDEX_KEY, 0, -1))
    with client.pipeline() as pipe:
        for name in names:
            pipe.hgetall(WORKER_KEY.format(name=name))
        entries = pipe.execute()
    return [info for info in (_parse(entry) for entry in entries) if info is not None]


def serving(workers: Iterable[WorkerInfo], model: str) -> list[WorkerInfo]:
    """Return the workers that serve `model` on a realtime queue: matched by the exact CLIPFLEET_MODEL value, or by
    its last path component (`clip-vit-base-patch32` for `openai/clip-vit-base-patch32`)."""
    return [worker for worker in workers if worker.realtime_queue and model in (worker.model, short_model_name(worker.model))]


def short_model_name(model: str) -> str:
    """Return the last path component of a hub id or directory: `openai/clip-vit-base-patch32` -> `clip-vit-base-patch32`."""
    return model.rstrip("/").rsplit("/", 1)[-1]


def _parse(entry: dict[bytes, bytes]) -> WorkerInfo | None:
    """Return the WorkerInfo of a registry hash, or None for an expired (empty) or foreign one."""
    values = {key.decode(): value.decode() for key, value in entry.items()}
    try:
        return WorkerInfo(**{
            field.name: float(values[field.name]) if field.type == "float" else values[field.name]
            for field in fields(WorkerInfo)
        })
    except (KeyError, ValueError):
        return None
