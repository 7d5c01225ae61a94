"""The label-embedding cache: in process first, then Redis, then the text tower.

Entries are keyed by a digest of the model, its revision, every prompt and the checkpoint's files, so a
changed label, template or checkpoint is a new entry. The Redis copy lets a second worker skip the text tower for a job another worker started.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict

import numpy as np
import redis
import torch

from producer.constants import PROMPT_CACHE_KEY
from producer.spec import JobSpec
from workers.classify import label_embeddings
from workers.metrics import record_safely
from workers.model import LoadedModel

logger = logging.getLogger(__name__)

REDIS_TTL_S = 7 * 24 * 3600
PROCESS_ENTRIES = 8


def cache_digest(spec: JobSpec, loaded: LoadedModel) -> str:
    """Return the cache key digest: the job's model id, revision and prompts, and the loaded checkpoint's files."""
    return hashlib.sha256(f"{spec.prompts_digest()}:{loaded.fingerprint}".encode()).hexdigest()


class PromptCache:
    """Label embeddings per job spec. Not thread-safe: call it from the task thread only."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, spec: JobSpec, loaded: LoadedModel) -> torch.Tensor:
        """Return the job's label embeddings, `[labels, dim]` float32, running the text tower only when neither this process nor Redis has them."""
        digest = cache_digest(spec, loaded)
        cached = self._entries.get(digest)
        record_safely(lambda metrics: metrics.record_prompt_lookup("process", cached is not None))
        if cached is not None:
            self._entries.move_to_end(digest)
            return cached
        embeddings = self._read_redis(digest, len(spec.prompts))
        record_safely(lambda metrics: metrics.record_prompt_lookup("redis", embeddings is not None))
        if embeddings is None:
            self.misses += 1
            started = time.perf_counter()
            embeddings = label_embeddings(loaded, spec.prompts)
            encoding_s = time.perf_counter() - started
            record_safely(lambda metrics: metrics.prompt_encoding_duration.observe(encoding_s))
            self._write_redis(digest, embeddings)
            logger.info("Encoded %d labels for prompt set %s", embeddings.shape[0], digest[:12])
        else:
            self.hits += 1
            logger.info("Reused %d label embeddings for prompt set %s from Redis", embeddings.shape[0], digest[:12])
        self._remember(digest, embeddings)
        return embeddings

    def _remember(self, digest: str, embeddings: torch.Tensor) -> None:
        self._entries[digest] = embeddings
        while len(self._entries) > PROCESS_ENTRIES:
            self._entries.popitem(last=False)

    def _read_redis(self, digest: str, expected_rows: int) -> torch.Tensor | None:
        raw = self.redis.hgetall(PROMPT_CACHE_KEY.format(digest=digest))
        if not raw:
            return None
        data = raw[b"data"]
        if hashlib.sha256(data).hexdigest() != raw[b"sha256"].decode():
            logger.warning("Prompt cache entry %s failed its checksum; recomputing it", digest[:12])
            return None
        rows, dim = (int(part) for part in raw[b"shape"].decode().split(","))
        if rows != expected_rows or len(data) != rows * dim * 4:
            logger.warning("Prompt cache entry %s does not match its shape %dx%d; recomputing it", digest[:12], rows, dim)
            return None
        return torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(rows, dim).copy())

    def _write_redis(self, digest: str, embeddings: torch.Tensor) -> None:
        data = embeddings.numpy().astype(np.float32).tobytes()
        key = PROMPT_CACHE_KEY.format(digest=digest)
        shape = f"{embeddings.shape[0]},{embeddings.shape[1]}"
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping={"data": data, "shape": shape, "sha256": hashlib.sha256(data).hexdigest()})
            pipe.expire(key, REDIS_TTL_S)
            pipe.execute()
