"""The Redis level of the prompt cache against a real redis-server: size bound, LRU eviction, verification, races."""

from __future__ import annotations

import hashlib
import logging
import threading
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from producer.constants import (
    PROMPT_CACHE_BYTES_KEY,
    PROMPT_CACHE_KEY,
    PROMPT_CACHE_LRU_KEY,
    PROMPT_CACHE_SIZES_KEY,
)
from workers import metrics
from workers.metrics import WorkerMetrics
from workers.prompt_store import InvalidEntry, RedisEmbeddingStore, verify_entry

DIM = 16
ROWS = 4
ENTRY_BYTES = ROWS * DIM * 4  # float32


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url, socket_timeout=10.0)
    yield connection
    connection.close()


def embeddings(seed: int, rows: int = ROWS) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)


def entry_key(digest: str) -> str:
    return PROMPT_CACHE_KEY.format(digest=digest)


def stored_digests(client: redis.Redis) -> set[str]:
    return {key.decode().removeprefix(PROMPT_CACHE_KEY.format(digest="")) for key in client.keys(PROMPT_CACHE_KEY.format(digest="*"))}


def index_digests(client: redis.Redis) -> set[str]:
    return {member.decode() for member in client.zrange(PROMPT_CACHE_LRU_KEY, 0, -1)}


def data_bytes(client: redis.Redis) -> int:
    """Return the bytes of `data` over all entries, read from the entries themselves."""
    return sum(client.hstrlen(key, "data") for key in client.keys(PROMPT_CACHE_KEY.format(digest="*")))


def test_write_then_read_round_trip(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=10 * ENTRY_BYTES)
    original = embeddings(1)
    store.write("a", original)
    assert np.array_equal(store.read("a", ROWS), original)


def test_write_counts_bytes(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=10 * ENTRY_BYTES)
    outcome = store.write("a", embeddings(1))
    assert outcome.stored
    assert outcome.total_bytes == ENTRY_BYTES
    assert store.total_bytes() == ENTRY_BYTES
    assert int(client.hget(PROMPT_CACHE_SIZES_KEY, "a")) == ENTRY_BYTES


def test_rewrite_counts_once(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=10 * ENTRY_BYTES)
    store.write("a", embeddings(1))
    store.write("a", embeddings(2))
    assert store.total_bytes() == ENTRY_BYTES
    assert index_digests(client) == {"a"}


def test_eviction_drops_least_recent(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=3 * ENTRY_BYTES)
    for seed, digest in enumerate(["a", "b", "c"]):
        store.write(digest, embeddings(seed))

    outcome = store.write("d", embeddings(3))

    assert outcome.evicted == ["a"]
    assert stored_digests(client) == {"b", "c", "d"}
    assert store.total_bytes() == 3 * ENTRY_BYTES


def test_read_refreshes_recency(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=3 * ENTRY_BYTES)
    for seed, digest in enumerate(["a", "b", "c"]):
        store.write(digest, embeddings(seed))
    assert store.read("a", ROWS) is not None

    outcome = store.write("d", embeddings(3))

    assert outcome.evicted == ["b"]
    assert stored_digests(client) == {"a", "c", "d"}


def test_large_write_evicts_several(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=4 * ENTRY_BYTES)
    for seed, digest in enumerate(["a", "b", "c", "d"]):
        store.write(digest, embeddings(seed))

    outcome = store.write("big", embeddings(9, rows=3 * ROWS))

    assert outcome.evicted == ["a", "b", "c"]
    assert stored_digests(client) == {"d", "big"}
    assert store.total_bytes() == 4 * ENTRY_BYTES


def test_entry_above_bound_not_stored(client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisEmbeddingStore(client, max_bytes=2 * ENTRY_BYTES)
    store.write("a", embeddings(1))

    with caplog.at_level(logging.WARNING, logger="workers.prompt_store"):
        outcome = store.write("huge", embeddings(2, rows=3 * ROWS))

    assert not outcome.stored
    assert stored_digests(client) == {"a"}
    assert store.total_bytes() == ENTRY_BYTES
    assert "CLIPFLEET_PROMPT_CACHE_MAX_MB" in caplog.text


def test_bound_holds_after_every_write(client: redis.Redis) -> None:
    max_bytes = 5 * ENTRY_BYTES
    store = RedisEmbeddingStore(client, max_bytes=max_bytes)
    rng = np.random.default_rng(0)
    for index in range(40):
        rows = int(rng.integers(1, 3 * ROWS))
        store.write(f"entry-{index % 13}", embeddings(index, rows=rows))
        assert store.total_bytes() <= max_bytes, index
        assert data_bytes(client) == store.total_bytes(), index
    assert stored_digests(client) == index_digests(client)


def test_expired_entry_leaves_index(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=10 * ENTRY_BYTES)
    store.write("a", embeddings(1))
    client.delete(entry_key("a"))  # as its TTL would

    assert store.read("a", ROWS) is None
    assert index_digests(client) == set()
    assert store.total_bytes() == 0


def test_unindexed_entry_indexed_on_read(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=10 * ENTRY_BYTES)
    store.write("a", embeddings(1))
    client.zrem(PROMPT_CACHE_LRU_KEY, "a")
    client.hdel(PROMPT_CACHE_SIZES_KEY, "a")
    client.set(PROMPT_CACHE_BYTES_KEY, 0)

    assert store.read("a", ROWS) is not None
    assert index_digests(client) == {"a"}
    assert store.total_bytes() == ENTRY_BYTES


def test_read_refreshes_ttl(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=10 * ENTRY_BYTES, ttl_s=1000)
    store.write("a", embeddings(1))
    client.expire(entry_key("a"), 5)

    store.read("a", ROWS)

    assert client.ttl(entry_key("a")) > 5
    assert client.ttl(PROMPT_CACHE_LRU_KEY) > 5


def test_index_keys_expire(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=10 * ENTRY_BYTES, ttl_s=1000)
    store.write("a", embeddings(1))
    for key in (entry_key("a"), PROMPT_CACHE_LRU_KEY, PROMPT_CACHE_SIZES_KEY, PROMPT_CACHE_BYTES_KEY):
        assert 0 < client.ttl(key) <= 1000, key


def test_zero_bound_rejected(client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="max_bytes=0"):
        RedisEmbeddingStore(client, max_bytes=0)


def corrupt(client: redis.Redis, digest: str, field: str, value: bytes | None) -> None:
    if value is None:
        client.hdel(entry_key(digest), field)
    else:
        client.hset(entry_key(digest), field, value)


def flipped_data(client: redis.Redis, digest: str) -> bytes:
    data = bytearray(client.hget(entry_key(digest), "data"))
    data[0] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dtype", b"float16"),
        ("shape", f"{ROWS + 1},{DIM}".encode()),
        ("shape", f"{ROWS},{DIM * 2}".encode()),
        ("shape", b"four,sixteen"),
        ("sha256", hashlib.sha256(b"other").hexdigest().encode()),
        ("data", None),
        ("dtype", None),
    ],
)
def test_invalid_entry_deleted(client: redis.Redis, field: str, value: bytes | None) -> None:
    store = RedisEmbeddingStore(client, max_bytes=10 * ENTRY_BYTES)
    store.write("a", embeddings(1))
    corrupt(client, "a", field, value)

    assert store.read("a", ROWS) is None
    assert client.exists(entry_key("a")) == 0
    assert index_digests(client) == set()
    assert store.total_bytes() == 0


def test_flipped_byte_deleted(client: redis.Redis) -> None:
    store = RedisEmbeddingStore(client, max_bytes=10 * ENTRY_BYTES)
    store.write("a", embeddings(1))
    corrupt(client, "a", "data", flipped_data(client, "a"))

    assert store.read("a", ROWS) is None
    assert client.exists(entry_key("a")) == 0


def test_invalid_entry_logged_once(client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisEmbeddingStore(client, max_bytes=10 * ENTRY_BYTES)
    store.write("a", embeddings(1))
    corrupt(client, "a", "dtype", b"float16")

    with caplog.at_level(logging.WARNING, logger="workers.prompt_store"):
        store.read("a", ROWS)
        store.read("a", ROWS)

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'float16'" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("fields", "expected_rows", "message"),
    [
        ({b"dtype": b"float32", b"shape": b"1,1", b"sha256": b""}, 1, "fields data are missing"),
        ({b"dtype": b"float64"}, 1, "dtype 'float64'"),
        ({b"shape": b"2,2"}, 1, "has 2 rows"),
        ({b"shape": b"1,3"}, 1, "needs 12 bytes"),
        ({b"shape": b"0,4"}, 0, "dimension below 1"),
        ({b"shape": b"1"}, 1, "is not 'rows,dim'"),
        ({b"sha256": b"0" * 64}, 1, "checksum"),
    ],
)
def test_verify_entry_rejects(fields: dict[bytes, bytes], expected_rows: int, message: str) -> None:
    data = np.ones((1, 4), dtype=np.float32).tobytes()
    entry = {b"data": data, b"shape": b"1,4", b"dtype": b"float32", b"sha256": hashlib.sha256(data).hexdigest().encode()}
    entry.update(fields)
    if message.startswith("fields data"):
        del entry[b"data"]
    with pytest.raises(InvalidEntry, match=message):
        verify_entry(entry, expected_rows)


def rows_of(digest: str) -> int:
    """Return 1 to 2 * ROWS - 1 rows, fixed per digest, so both writers store a shared digest with one shape."""
    return 1 + zlib.crc32(digest.encode()) % (2 * ROWS - 1)


def write_many(url: str, worker: int, max_bytes: int, errors: list[BaseException]) -> None:
    """Write and read 60 entries of varying sizes from this thread's own client; some digests are shared with the other writer."""
    connection = redis.Redis.from_url(url, socket_timeout=10.0)
    try:
        store = RedisEmbeddingStore(connection, max_bytes=max_bytes)
        for index in range(60):
            digest = f"shared-{index % 5}" if index % 3 == 0 else f"worker{worker}-{index}"
            store.write(digest, embeddings(index, rows=rows_of(digest)))
            other = f"worker{1 - worker}-{index - 1}"
            store.read(other, rows_of(other))
    except BaseException as e:  # noqa: BLE001 - reported by the test thread
        errors.append(e)
    finally:
        connection.close()


def sample_totals(client: redis.Redis, stop: threading.Event, totals: list[int]) -> None:
    while not stop.is_set():
        totals.append(int(client.get(PROMPT_CACHE_BYTES_KEY) or 0))


def test_concurrent_writers_keep_bound(redis_url: str, client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="workers.prompt_store")
    max_bytes = 6 * ENTRY_BYTES
    errors: list[BaseException] = []
    totals: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_totals, args=(client, stop, totals))
    writers = [threading.Thread(target=write_many, args=(redis_url, worker, max_bytes, errors)) for worker in (0, 1)]

    sampler.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    stop.set()
    sampler.join(timeout=10)

    assert errors == []
    assert not any(writer.is_alive() for writer in writers)
    assert len(totals) > 0
    assert max(totals) <= max_bytes
    assert data_bytes(client) == int(client.get(PROMPT_CACHE_BYTES_KEY))
    assert sum(int(size) for size in client.hvals(PROMPT_CACHE_SIZES_KEY)) == data_bytes(client)
    assert stored_digests(client) == index_digests(client)
    assert [record.getMessage() for record in caplog.records if "invalid" in record.getMessage()] == []


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> CollectorRegistry:
    """A private registry whose WorkerMetrics is the process's `worker_metrics()` during the test."""
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", WorkerMetrics(registry))
    return registry


def test_eviction_metrics(client: redis.Redis, registry: CollectorRegistry) -> None:
    store = RedisEmbeddingStore(client, max_bytes=2 * ENTRY_BYTES)
    for seed, digest in enumerate(["a", "b", "c", "d"]):
        store.write(digest, embeddings(seed))
    assert registry.get_sample_value("clipfleet_prompt_cache_evictions_total") == 2
    assert registry.get_sample_value("clipfleet_prompt_cache_bytes") == 2 * ENTRY_BYTES


def test_invalid_entry_metric(client: redis.Redis, registry: CollectorRegistry) -> None:
    store = RedisEmbeddingStore(client, max_bytes=2 * ENTRY_BYTES)
    store.write("a", embeddings(1))
    corrupt(client, "a", "dtype", b"float16")
    store.read("a", ROWS)
    assert registry.get_sample_value("clipfleet_prompt_cache_invalid_entries_total") == 1
    assert registry.get_sample_value("clipfleet_prompt_cache_bytes") == 0
