"""Per-process worker state: settings, storage and Redis clients, the fetch thread pool and loaded models.

Each worker process builds its own runtime on first use, after the pool has forked, so no boto3 client,
Redis connection, thread or model crosses a fork.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from producer.retry import RetryPolicy
from producer.settings import Settings
from producer.spec import JobSpec
from producer.state import JobStore
from producer.storage import Storage
from workers.images import PixelBudget
from workers.memory import tune_malloc
from workers.metrics import record_safely
from workers.model import LoadedModel, load_model
from workers.prompt_store import MIB
from workers.prompts import PromptCache

logger = logging.getLogger(__name__)

MAX_LOADED_MODELS = 2
MAX_CACHED_SPECS = 64


class WorkerRuntime:
    """Everything one worker process reuses across batches. Use from the task thread only."""

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise RuntimeError("CLIPFLEET_REDIS_URL is not set: workers need the Redis that producers enqueue into")
        self.settings = settings
        tune_malloc()
        # Pillow's own decompression-bomb check follows the same limit as decode_image's.
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        self.store = JobStore.from_url(settings.redis_url)
        # One connection per fetch thread, plus room for shard writes. S3 retries are counted in the job's hash.
        self.storage = Storage(
            settings.s3_endpoint_url,
            settings.fetch_threads + 4,
            settings.fetch_timeout_s,
            retry_policy=RetryPolicy(settings.s3_max_attempts, settings.retry_base_s, settings.retry_max_s),
            count_event=self.store.count_event,
        )
        self.prompts = PromptCache(self.store.redis, settings.prompt_cache_max_mb * MIB)
        self.pool = ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="clipfleet-fetch")
        self.decode_budget = PixelBudget(settings.decode_budget_pixels)
        self._models: OrderedDict[tuple[str, str | None], LoadedModel] = OrderedDict()
        self._specs: OrderedDict[str, JobSpec] = OrderedDict()

    def model(self, name: str, revision: str | None) -> LoadedModel:
        """Return the loaded model, loading it on first use and keeping the last two models used."""
        key = (name, revision)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        loaded = load_model(name, revision, self.settings.device, self.settings.dtype)
        record_safely(lambda metrics: metrics.record_model_load(loaded.load_s))
        self._models[key] = loaded
        while len(self._models) > MAX_LOADED_MODELS:
            evicted, _ = self._models.popitem(last=False)
            logger.info("Unloaded model %s to make room", evicted[0])
        return loaded

    def spec(self, job_id: str) -> JobSpec:
        """Return a job's spec, read from Redis once per process. Specs never change after submission."""
        if job_id not in self._specs:
            self._specs[job_id] = self.store.spec(job_id)
            while len(self._specs) > MAX_CACHED_SPECS:
                self._specs.popitem(last=False)
        return self._specs[job_id]


_runtime: WorkerRuntime | None = None
_runtime_pid: int | None = None


def get_runtime() -> WorkerRuntime:
    """Return this process's runtime, building it on first use (and again in a forked child)."""
    global _runtime, _runtime_pid
    if _runtime is None or _runtime_pid != os.getpid():
        _runtime = WorkerRuntime(Settings())
        _runtime_pid = os.getpid()
    return _runtime
