"""The Redis level of the prompt-embedding cache: verified entries under a fleet-wide size bound with LRU eviction.

Each entry is a hash at PROMPT_CACHE_KEY with the fields `data` (the embeddings' bytes), `shape` ("rows,dim"),
`dtype` (numpy's name, "float32") and `sha256` (hex digest of `data`). Next to the entries, these keys index
them for eviction:

- PROMPT_CACHE_LRU_KEY, a sorted set of digests scored by their last use on a logical clock (PROMPT_CACHE_CLOCK_KEY,
  incremented by every read and write, so the order does not depend on the clocks of the workers' hosts);
- PROMPT_CACHE_SIZES_KEY, a hash of digest -> bytes of `data`;
- PROMPT_CACHE_BYTES_KEY, the sum of those sizes.

Reads and writes are Lua scripts, so each one reads and leaves a consistent index while several workers race.
A write evicts least recently used entries until the new one fits, so the total stays within the bound after
every write. The bound counts the bytes of `data` only, and Redis adds its own overhead per entry (measured in
docs/benchmarks.md). Every entry and index key also expires REDIS_TTL_S after its last use, as a backstop.

The scripts delete entries whose keys they take from the index, which Redis Cluster forbids, so the cache needs
a standalone Redis (as the Celery broker does). This module imports no torch.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import redis

from producer.constants import (
    PROMPT_CACHE_BYTES_KEY,
    PROMPT_CACHE_CLOCK_KEY,
    PROMPT_CACHE_KEY,
    PROMPT_CACHE_LRU_KEY,
    PROMPT_CACHE_SIZES_KEY,
)
from workers.metrics import record_safely

logger = logging.getLogger(__name__)

REDIS_TTL_S = 7 * 24 * 3600
MIB = 1024 * 1024
STORED_DTYPE = np.dtype(np.float32)
ENTRY_FIELDS = (b"data", b"shape", b"dtype", b"sha256")

# The start of every script. KEYS are the entry, the LRU set, the sizes hash, the total bytes and the clock.
# ARGV[1] is the digest and ARGV[2] the entry key prefix, which `drop` adds to a victim's digest.
_LUA_HELPERS = """
local entry, lru, sizes, total_key, clock = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local digest, prefix = ARGV[1], ARGV[2]
local total = tonumber(redis.call('GET', total_key) or '0')
local function drop(victim)
  total = total - tonumber(redis.call('HGET', sizes, victim) or '0')
  redis.call('DEL', prefix .. victim)
  redis.call('ZREM', lru, victim)
  redis.call('HDEL', sizes, victim)
end
local function touch(size, ttl)
  redis.call('ZADD', lru, redis.call('INCR', clock), digest)
  redis.call('HSET', sizes, digest, size)
  total = total + size
  redis.call('SET', total_key, total)
  redis.call('EXPIRE', entry, ttl)
  for i = 2, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
end
"""

# ARGV[3] to ARGV[8] are the data, shape, dtype, sha256, max bytes and TTL in seconds. Returns {total bytes, evicted
# digests}, or {-1, {}} when the entry alone is larger than the bound and was not stored.
_WRITE_SCRIPT = _LUA_HELPERS + """
local data, max_bytes, ttl = ARGV[3], tonumber(ARGV[7]), tonumber(ARGV[8])
local size = string.len(data)
if size > max_bytes then return {-1, {}} end
if redis.call('HEXISTS', sizes, digest) == 1 then drop(digest) end
local evicted = {}
while total + size > max_bytes do
  local oldest = redis.call('ZRANGE', lru, 0, 0)
  if #oldest == 0 then
    total = 0  -- the index is empty, so nothing is stored: a total left above 0 is stale
    break
  end
  drop(oldest[1])
  table.insert(evicted, oldest[1])
end
redis.call('DEL', entry)
redis.call('HSET', entry, 'data', data, 'shape', ARGV[4], 'dtype', ARGV[5], 'sha256', ARGV[6])
touch(size, ttl)
return {total, evicted}
"""

# ARGV[3] is the TTL in seconds. Marks the entry as used and returns {total bytes, fields}. Fields are empty when
# the entry is missing, and then a digest left in the index without its entry (expired) is dropped from the index.
# An entry missing from the index (written around the scripts) is indexed with its size, evicting nothing.
_READ_SCRIPT = _LUA_HELPERS + """
local fields = redis.call('HGETALL', entry)
local indexed = redis.call('HEXISTS', sizes, digest) == 1
if #fields == 0 then
  if indexed then
    drop(digest)
    redis.call('SET', total_key, total)
  end
  return {total, {}}
end
if indexed then total = total - tonumber(redis.call('HGET', sizes, digest)) end
touch(redis.call('HSTRLEN', entry, 'data'), tonumber(ARGV[3]))
return {total, fields}
"""

# Deletes the entry and its index records. Returns the total bytes afterwards.
_DELETE_SCRIPT = _LUA_HELPERS + """
drop(digest)
redis.call('SET', total_key, total)
return total
"""


class InvalidEntry(ValueError):
    """Verification failure of a Redis entry. The message names the field and the values that disagree."""


@dataclass(frozen=True)
class WriteOutcome:
    """Result of a write: whether the entry was stored, the digests it evicted, and the cache's total bytes after it (-1 when not stored)."""

    stored: bool
    evicted: list[str]
    total_bytes: int


class RedisEmbeddingStore:
    """Prompt embeddings in Redis under a size bound, shared by every worker of the fleet.

    Thread-safe, as redis-py clients are. Redis errors propagate (redis.RedisError), so the batch is retried.
    """

    def __init__(self, client: redis.Redis, max_bytes: int, ttl_s: int = REDIS_TTL_S) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} is invalid; the prompt cache bound must be at least 1 byte")
        self.redis = client
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._write = client.register_script(_WRITE_SCRIPT)
        self._read = client.register_script(_READ_SCRIPT)
        self._delete = client.register_script(_DELETE_SCRIPT)

    def read(self, digest: str, expected_rows: int) -> np.ndarray | None:
        """Return the stored embeddings, `[expected_rows, dim]` float32, or None when the entry is missing or invalid.

        A read marks the entry as most recently used. An invalid entry (fields missing, another dtype, a shape
        that does not match `expected_rows` or the data's length, a wrong checksum) is deleted and logged.
        """
        total, fields = self._read(keys=self._keys(digest), args=[digest, self._prefix(), self.ttl_s])
        self._record_total(total)
        if not fields:
            return None
        entry = dict(zip(fields[::2], fields[1::2]))
        try:
            return verify_entry(entry, expected_rows)
        except InvalidEntry as e:
            self.delete(digest)
            logger.warning("Deleted invalid prompt cache entry %s (%s), so it is recomputed", digest[:12], e)
            record_safely(lambda metrics: metrics.prompt_cache_invalid.inc())
            return None

    def write(self, digest: str, embeddings: np.ndarray) -> WriteOutcome:
        """Store `embeddings` `[rows, dim]` (converted to float32), evicting least recently used entries to fit.

        An entry larger than `max_bytes` is not stored, which is logged as a warning.
        """
        array = np.ascontiguousarray(embeddings, dtype=STORED_DTYPE)
        if array.ndim != 2:
            raise ValueError(f"embeddings must be 2-dimensional [rows, dim], got shape {array.shape}")
        data = array.tobytes()
        if len(data) > self.max_bytes:
            logger.warning(
                "Prompt embeddings %s take %d bytes, more than the cache's bound of %d bytes, so they are not shared "
                "through Redis; raise CLIPFLEET_PROMPT_CACHE_MAX_MB to share them", digest[:12], len(data), self.max_bytes,
            )
            return WriteOutcome(False, [], -1)
        shape = f"{array.shape[0]},{array.shape[1]}"
        args = [digest, self._prefix(), data, shape, STORED_DTYPE.name, hashlib.sha256(data).hexdigest(), self.max_bytes, self.ttl_s]
        total, evicted = self._write(keys=self._keys(digest), args=args)
        outcome = WriteOutcome(int(total) >= 0, [item.decode() for item in evicted], int(total))
        self._record_write(digest, outcome)
        return outcome

    def delete(self, digest: str) -> None:
        """Delete an entry and its index records. A missing entry is no error."""
        self._record_total(self._delete(keys=self._keys(digest), args=[digest, self._prefix()]))

    def total_bytes(self) -> int:
        """Return the bytes of data that the index counts, over all workers."""
        return int(self.redis.get(PROMPT_CACHE_BYTES_KEY) or 0)

    def _record_write(self, digest: str, outcome: WriteOutcome) -> None:
        if outcome.evicted:
            logger.info(
                "Evicted %d prompt cache entries (%s) to store %s under %d bytes",
                len(outcome.evicted), ", ".join(item[:12] for item in outcome.evicted), digest[:12], self.max_bytes,
            )
            record_safely(lambda metrics: metrics.prompt_cache_evictions.inc(len(outcome.evicted)))
        self._record_total(outcome.total_bytes)

    def _record_total(self, total: int) -> None:
        if int(total) >= 0:
            record_safely(lambda metrics: metrics.prompt_cache_bytes.set(int(total)))

    @staticmethod
    def _keys(digest: str) -> list[str]:
        entry = PROMPT_CACHE_KEY.format(digest=digest)
        return [entry, PROMPT_CACHE_LRU_KEY, PROMPT_CACHE_SIZES_KEY, PROMPT_CACHE_BYTES_KEY, PROMPT_CACHE_CLOCK_KEY]

    @staticmethod
    def _prefix() -> str:
        return PROMPT_CACHE_KEY.format(digest="")


def verify_entry(entry: dict[bytes, bytes], expected_rows: int) -> np.ndarray:
    """Return the embeddings of a Redis entry, `[expected_rows, dim]` float32. Raises InvalidEntry naming the check that failed."""
    missing = [field.decode() for field in ENTRY_FIELDS if field not in entry]
    if missing:
        raise InvalidEntry(f"fields {', '.join(missing)} are missing")
    dtype = entry[b"dtype"].decode(errors="replace")
    if dtype != STORED_DTYPE.name:
        raise InvalidEntry(f"dtype {dtype!r} is not {STORED_DTYPE.name!r}")
    rows, dim = _parse_shape(entry[b"shape"])
    data = entry[b"data"]
    if rows != expected_rows:
        raise InvalidEntry(f"shape {rows}x{dim} has {rows} rows, the job has {expected_rows} labels")
    if len(data) != rows * dim * STORED_DTYPE.itemsize:
        raise InvalidEntry(f"shape {rows}x{dim} needs {rows * dim * STORED_DTYPE.itemsize} bytes, the data has {len(data)}")
    if hashlib.sha256(data).hexdigest() != entry[b"sha256"].decode(errors="replace"):
        raise InvalidEntry("the data does not match its sha256 checksum")
    return np.frombuffer(data, dtype=STORED_DTYPE).reshape(rows, dim).copy()


def _parse_shape(raw: bytes) -> tuple[int, int]:
    text = raw.decode(errors="replace")
    try:
        rows, dim = (int(part) for part in text.split(","))
    except ValueError as e:
        raise InvalidEntry(f"shape {text!r} is not 'rows,dim'") from e
    if rows < 1 or dim < 1:
        raise InvalidEntry(f"shape {text!r} has a dimension below 1")
    return rows, dim
