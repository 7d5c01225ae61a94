"""Processing of one batch: fetch, decode and preprocess in threads, encode and score, write the shard, count.

The fetch threads run ahead of the model: while the image tower encodes one micro-batch, the pool keeps
fetching and decoding the rest of the batch. Memory is bounded by the batch size.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from producer.constants import FINAL_STATES, STATE_SUCCEEDED
from producer.errors import StorageError
from producer.messages import BatchMessage
from producer.results import finalize_job, write_shard
from producer.spec import JobSpec, local_root
from workers.classify import encode_images, score, top_k_rows
from workers.fetch import fetch_bytes
from workers.images import ImageError, decode_image
from workers.model import LoadedModel, ModelLoadError
from workers.policy import LocationRejected, check_job_locations
from workers.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

MODEL_BATCH_SIZE = 32


@dataclass
class BatchOutcome:
    """The result of one delivery of a batch."""

    job_id: str
    batch: int
    attempt: int
    status: str  # "written", "skipped_done", "skipped_cancelled", "skipped_failed", "attempts_exceeded"
    succeeded: int = 0
    failed: int = 0
    durations_s: dict[str, float] = field(default_factory=dict)


def process_batch(runtime: WorkerRuntime, message: BatchMessage) -> BatchOutcome:
    """Classify one batch and write its shard. Idempotent: a redelivered batch rewrites the same shard and
    is counted once. Raises when the batch cannot finish (Redis, storage or model errors), so the task
    retries it, until the delivery cap records its images as failed."""
    job_id, batch = message.job_id, message.batch
    state = runtime.store.state(job_id)
    if state in FINAL_STATES:
        logger.info("Job %s batch %d dropped: job is %s", job_id, batch, state)
        return BatchOutcome(job_id, batch, 0, "skipped_done" if state == STATE_SUCCEEDED else f"skipped_{state}")
    if runtime.store.is_batch_done(job_id, batch):
        logger.info("Job %s batch %d already counted; delivery ignored", job_id, batch)
        return BatchOutcome(job_id, batch, 0, "skipped_done")

    attempt = runtime.store.count_delivery(job_id, batch)
    spec = runtime.spec(job_id)
    try:
        check_job_locations(spec, runtime.settings)
    except LocationRejected as e:
        # Every batch of the job names the same locations, so the job fails now and nothing is read.
        logger.error("Job %s rejected: %s", job_id, e)
        runtime.store.fail(job_id, str(e))
        return BatchOutcome(job_id, batch, attempt, "skipped_failed")
    if attempt > runtime.settings.max_delivery_attempts:
        rows = [_error_row(uri, "delivery_attempts_exceeded", f"batch {batch} was delivered {attempt - 1} times without finishing") for uri in message.uris]
        logger.warning("Job %s batch %d reached %d deliveries; its %d images are recorded as failed", job_id, batch, attempt - 1, len(rows))
        return _finish(runtime, spec, message, attempt, rows, "attempts_exceeded", {})

    logger.info("Job %s batch %d attempt %d started: %d images", job_id, batch, attempt, len(message.uris))
    runtime.store.mark_batch_started(job_id)
    try:
        loaded = runtime.model(spec.model, spec.model_revision)
    except ModelLoadError as e:
        # Every batch of the job would fail the same way, so the job fails now with the loader's message.
        logger.error("Job %s failed: %s", job_id, e)
        runtime.store.fail(job_id, str(e))
        return BatchOutcome(job_id, batch, attempt, "skipped_failed")
    runtime.store.set_field_once(job_id, "model_revision", loaded.revision or "")
    rows, durations = classify_uris(runtime, spec, loaded, message.uris)
    return _finish(runtime, spec, message, attempt, rows, "written", durations)


def _finish(
    runtime: WorkerRuntime,
    spec: JobSpec,
    message: BatchMessage,
    attempt: int,
    rows: list[dict[str, Any]],
    status: str,
    durations: dict[str, float],
) -> BatchOutcome:
    started = time.perf_counter()
    try:
        write_shard(runtime.storage, spec, message.job_id, message.batch, rows)
    except StorageError:
        if status != "attempts_exceeded":
            raise
        # The last delivery still counts the batch, so the job can finish even when its output is broken.
        logger.exception("Job %s batch %d: writing the failure rows failed too; counting the batch anyway", message.job_id, message.batch)
    durations["write"] = time.perf_counter() - started

    failed = sum(1 for row in rows if row["error"] is not None)
    counted, completed = runtime.store.record_batch(message.job_id, message.batch, len(rows) - failed, failed)
    if completed:
        finalize_job(runtime.store, runtime.storage, message.job_id)
    outcome = BatchOutcome(message.job_id, message.batch, attempt, status, len(rows) - failed, failed, durations)
    logger.info(
        "Job %s batch %d attempt %d finished: %d ok, %d failed, counted=%s, %s",
        message.job_id, message.batch, attempt, outcome.succeeded, failed, counted,
        " ".join(f"{stage}={seconds:.2f}s" for stage, seconds in durations.items()),
    )
    return outcome


def classify_uris(
    runtime: WorkerRuntime, spec: JobSpec, loaded: LoadedModel, uris: list[str]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Return one result row per URI, in order, and the seconds spent waiting for images and in the model."""
    label_embeddings = runtime.prompts.get(spec, loaded)  # [labels, dim]
    root = local_root(spec)
    futures = [runtime.pool.submit(load_pixels, runtime, loaded, uri, root) for uri in uris]
    rows: list[dict[str, Any] | None] = [None] * len(uris)
    pending: list[tuple[int, np.ndarray]] = []
    durations = {"wait_images": 0.0, "model": 0.0}
    for index, future in enumerate(futures):
        started = time.perf_counter()
        pixels = _result_or_error(future, uris[index], rows, index)
        durations["wait_images"] += time.perf_counter() - started
        if pixels is not None:
            pending.append((index, pixels))
        if pending and (len(pending) == MODEL_BATCH_SIZE or index == len(futures) - 1):
            started = time.perf_counter()
            _score_pending(loaded, spec, label_embeddings, pending, uris, rows)
            durations["model"] += time.perf_counter() - started
            pending = []
    return [row for row in rows if row is not None], durations


def _result_or_error(future: "Future[np.ndarray]", uri: str, rows: list[Any], index: int) -> np.ndarray | None:
    try:
        return future.result()
    except ImageError as e:
        logger.warning("Image %s failed: %s (%s)", uri, e.code, e.message)
        rows[index] = _error_row(uri, e.code, e.message)
        return None
    except Exception as e:  # an image that breaks the decoder or processor in an unforeseen way
        logger.exception("Image %s failed with an unexpected error", uri)
        rows[index] = _error_row(uri, "decode_error", f"unexpected {type(e).__name__}: {e}")
        return None


def _score_pending(
    loaded: LoadedModel,
    spec: JobSpec,
    label_embeddings: Any,
    pending: list[tuple[int, np.ndarray]],
    uris: list[str],
    rows: list[Any],
) -> None:
    pixels = np.stack([item for _, item in pending])  # [micro_batch, 3, H, W]
    image_embeddings = encode_images(loaded, pixels)  # [micro_batch, dim]
    probabilities = score(image_embeddings, label_embeddings, loaded.logit_scale)  # [micro_batch, labels]
    for (index, _), top in zip(pending, top_k_rows(probabilities, spec.label_names, spec.top_k)):
        rows[index] = {"uri": uris[index], "label": top[0]["label"], "score": top[0]["score"], "top_k": top, "error": None}


def load_pixels(runtime: WorkerRuntime, loaded: LoadedModel, uri: str, root: Path | None) -> np.ndarray:
    """Fetch, decode and preprocess one image into `[3, H, W]` float32. Runs in a fetch thread."""
    settings = runtime.settings
    data = fetch_bytes(runtime.storage, uri, settings.max_image_bytes, settings.allowed_buckets, root)
    image = decode_image(data, max_pixels=settings.max_image_pixels)
    return loaded.processor(images=image, return_tensors="np")["pixel_values"][0]


def _error_row(uri: str, code: str, message: str) -> dict[str, Any]:
    return {"uri": uri, "label": None, "score": None, "top_k": [], "error": {"code": code, "message": message}}
