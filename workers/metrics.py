"""Prometheus metrics of the worker: images, batches, stage durations, model loads, the prompt cache, device memory.

Every process records into the `WorkerMetrics` that `worker_metrics` returns. With CLIPFLEET_METRICS_PORT set,
`workers.health` switches prometheus_client to multiprocess mode in the main process before the pool forks, so
each pool process writes its values to files in a private folder, and the main process sums them when scraped.
Without it the values stay in each process's memory and nothing serves them.

This module imports no torch: the main process that forks the pool must not load it.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from producer.constants import ERROR_CODES

if TYPE_CHECKING:
    from workers.pipeline import BatchOutcome

logger = logging.getLogger(__name__)

P = ParamSpec("P")

STAGES = ("fetch", "decode", "preprocess", "wait_images", "model", "write")
PROMPT_CACHE_LEVELS = ("process", "redis")
IMAGE_OUTCOMES = ("succeeded", "failed")
# Outcomes of realtime requests taken from a queue: a reply with embeddings, a reply with an error, or no reply
# because the request was past its deadline, or withdrawn or expired before a worker read it.
REALTIME_OUTCOMES = ("succeeded", "failed", "expired", "withdrawn")
# Requests per embed call, up to CLIPFLEET_REALTIME_MAX_REQUESTS (at most 4096).
REALTIME_REQUESTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# Status of a batch delivery that raised, so the task retries it (see `workers.tasks.classify_batch`).
BATCH_ERROR_STATUS = "error"
BATCH_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800)
STAGE_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MODEL_LOAD_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
PROMPT_ENCODING_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Producers keep about CLIPFLEET_QUEUE_AHEAD_S (180 s) of the fleet's work queued, so waits of minutes are normal.
QUEUE_WAIT_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600)


class WorkerMetrics:
    """The worker's metrics, registered in `registry`, or in no registry when it is None.

    In multiprocess mode the main process collects the values from files, so the metrics need no registry.
    Thread-safe, as prometheus_client's metrics are.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.images = Counter(
            "clipfleet_images", "Images with a result row, by outcome: succeeded or failed", ["outcome"], registry=registry
        )
        self.images_failed = Counter(
            "clipfleet_images_failed", "Failed images, by error code (see ERROR_CODES)", ["code"], registry=registry
        )

        self.batches = Counter(
            "clipfleet_batches", "Batch deliveries by outcome status, or `error` for a delivery that raised", ["status"], registry=registry
        )
        self.batch_duration = Histogram(
            "clipfleet_batch_duration_seconds",
            "Seconds per batch delivery that classified, wrote or abandoned images, or raised",
            buckets=BATCH_BUCKETS_S, registry=registry,
        )

        self.stage_duration = Histogram(
            "clipfleet_stage_duration_seconds",
            "Seconds per batch spent in each stage; fetch, decode and preprocess are summed over the fetch threads",
            ["stage"], buckets=STAGE_BUCKETS_S, registry=registry,
        )

        self.queue_wait = Histogram(
            "clipfleet_batch_queue_wait_seconds",
            "Seconds from a producer publishing a batch to a worker starting it, first deliveries only",
            buckets=QUEUE_WAIT_BUCKETS_S, registry=registry,
        )
        self.model_load_duration = Histogram(
            "clipfleet_model_load_duration_seconds", "Seconds to load a model, tokenizer and image processor",
            buckets=MODEL_LOAD_BUCKETS_S, registry=registry,
        )

        self.prompt_cache_hits = Counter(
            "clipfleet_prompt_cache_hits", "Label-embedding lookups found, by cache level", ["level"], registry=registry
        )
        self.prompt_cache_misses = Counter(
            "clipfleet_prompt_cache_misses", "Label-embedding lookups not found, by cache level", ["level"], registry=registry
        )
        self.prompt_encoding_duration = Histogram(
            "clipfleet_prompt_encoding_duration_seconds", "Seconds the text tower took to encode a job's prompts",
            buckets=PROMPT_ENCODING_BUCKETS_S, registry=registry,
        )
        self.prompt_cache_evictions = Counter(
            "clipfleet_prompt_cache_evictions", "Redis prompt cache entries this worker evicted to stay under the size bound",
            registry=registry,
        )
        self.prompt_cache_invalid = Counter(
            "clipfleet_prompt_cache_invalid_entries",
            "Redis prompt cache entries that failed verification (fields, dtype, shape or checksum) and were deleted",
            registry=registry,
        )
        # mostrecent: the value is the fleet-wide total in Redis, so the latest report of any pool process is right.
        self.prompt_cache_bytes = Gauge(
            "clipfleet_prompt_cache_bytes", "Bytes of label embeddings in the Redis prompt cache, over all workers, as last seen",
            multiprocess_mode="mostrecent", registry=registry,
        )

        self.realtime_requests = Counter(
            "clipfleet_realtime_requests", "Realtime embedding requests taken from the queue, by outcome", ["outcome"],
            registry=registry,
        )
        self.realtime_requests_per_call = Histogram(
            "clipfleet_realtime_requests_per_call", "Realtime requests that one embed task replied to together",
            buckets=REALTIME_REQUESTS_BUCKETS, registry=registry,
        )

        # livesum: the sum over the pool processes that are alive, on CUDA only.
        self.device_memory = Gauge(
            "clipfleet_device_memory_allocated_bytes", "CUDA memory held by tensors (torch.cuda.memory_allocated)",
            ["device"], multiprocess_mode="livesum", registry=registry,
        )
        self._initialize_labels()

    def _initialize_labels(self) -> None:
        """Create the known label values at 0, so their series exist before the first event."""
        for outcome in IMAGE_OUTCOMES:
            self.images.labels(outcome=outcome)
        for code in ERROR_CODES:
            self.images_failed.labels(code=code)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
        for level in PROMPT_CACHE_LEVELS:
            self.prompt_cache_hits.labels(level=level)
            self.prompt_cache_misses.labels(level=level)
        for outcome in REALTIME_OUTCOMES:
            self.realtime_requests.labels(outcome=outcome)

    def record_batch(self, outcome: BatchOutcome, duration_s: float) -> None:
        """Count one batch delivery's outcome, its images by outcome and error code, and its durations."""
        self.batches.labels(status=outcome.status).inc()
        if not outcome.status.startswith("skipped_"):
            self.batch_duration.observe(duration_s)
        self.images.labels(outcome="succeeded").inc(outcome.succeeded)
        self.images.labels(outcome="failed").inc(outcome.failed)
        for code, count in outcome.errors.items():
            self.images_failed.labels(code=code).inc(count)
        for stage, seconds in outcome.durations_s.items():
            self.stage_duration.labels(stage=stage).observe(seconds)
        self.update_device_memory()

    def record_realtime_call(self, outcomes: dict[str, int]) -> None:
        """Count one embed call's requests by outcome (keys of REALTIME_OUTCOMES), and observe how many got a reply."""
        for outcome, count in outcomes.items():
            self.realtime_requests.labels(outcome=outcome).inc(count)
        answered = outcomes.get("succeeded", 0) + outcomes.get("failed", 0)
        if answered:
            self.realtime_requests_per_call.observe(answered)

    def record_queue_wait(self, wait_s: float) -> None:
        """Observe how long a batch waited in the queue; a negative wait (clocks of two hosts apart) counts as 0."""
        self.queue_wait.observe(max(0.0, wait_s))

    def record_batch_error(self, duration_s: float) -> None:
        """Count a batch delivery that raised."""
        self.batches.labels(status=BATCH_ERROR_STATUS).inc()
        self.batch_duration.observe(duration_s)

    def record_prompt_lookup(self, level: str, found: bool) -> None:
        """Count one label-embedding lookup at cache `level` ("process" or "redis"). Raises ValueError for another level."""
        if level not in PROMPT_CACHE_LEVELS:
            raise ValueError(f"prompt cache level {level!r} is invalid; use one of {', '.join(PROMPT_CACHE_LEVELS)}")
        counter = self.prompt_cache_hits if found else self.prompt_cache_misses
        counter.labels(level=level).inc()

    def record_model_load(self, load_s: float) -> None:
        """Observe one model load's seconds and the device memory it took."""
        self.model_load_duration.observe(load_s)
        self.update_device_memory()

    def update_device_memory(self) -> None:
        """Set the device memory gauge from torch, once this process has used CUDA; on CPU it stays absent."""
        allocated = cuda_memory_allocated()
        if allocated is not None:
            device, allocated_bytes = allocated
            self.device_memory.labels(device=device).set(allocated_bytes)


def cuda_memory_allocated() -> tuple[str, int] | None:
    """Return `("cuda:N", bytes)` of the current CUDA device, or None when this process has not initialised CUDA.

    Reads torch only when it is already imported, so a process without torch does not load it.
    NOTE: only the CPU case (None) is covered by tests; the CUDA branch has not run on a GPU.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    index = torch.cuda.current_device()
    return f"cuda:{index}", int(torch.cuda.memory_allocated(index))


_metrics: WorkerMetrics | None = None
_metrics_lock = threading.Lock()
_failed_updates = 0


def worker_metrics() -> WorkerMetrics:
    """Return this process's metrics, creating them on first use. A forked pool process shares its parent's."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = WorkerMetrics()
        return _metrics


def reset_worker_metrics() -> WorkerMetrics:
    """Create the process's metrics again, after prometheus_client's value storage changed (multiprocess mode)."""
    global _metrics
    with _metrics_lock:
        _metrics = WorkerMetrics()
        return _metrics


def record_safely(update: Callable[[WorkerMetrics], None]) -> None:
    """Apply `update` to the process's metrics; log instead of raising, so metrics never fail a batch.

    Multiprocess mode writes to memory-mapped files, which can fail when the disk is full.
    """
    global _failed_updates
    try:
        update(worker_metrics())
    except Exception:  # noqa: BLE001 - a metric is never worth a failed batch
        _failed_updates += 1
        # The first failure is logged with its traceback, then every 1000th, so a full disk does not flood the log.
        if _failed_updates % 1000 == 1:
            logger.warning("Updating the worker metrics failed (%d failures so far)", _failed_updates, exc_info=True)


def observe_batch(function: Callable[P, BatchOutcome]) -> Callable[P, BatchOutcome]:
    """Decorate `process_batch` so each call records its outcome and duration, or an `error` batch when it raises."""

    @functools.wraps(function)
    def observed(*args: P.args, **kwargs: P.kwargs) -> BatchOutcome:
        started = time.perf_counter()
        try:
            outcome = function(*args, **kwargs)
        except BaseException:
            elapsed_s = time.perf_counter() - started
            record_safely(lambda metrics: metrics.record_batch_error(elapsed_s))
            raise
        elapsed_s = time.perf_counter() - started
        record_safely(lambda metrics: metrics.record_batch(outcome, elapsed_s))
        return outcome

    return observed
