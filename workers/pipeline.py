"""Processing of one batch: fetch, decode and preprocess in threads, encode and score, write the shard, count.

The fetch threads run ahead of the model: while the image tower encodes one micro-batch
(CLIPFLEET_MODEL_BATCH_SIZE images), the pool fetches, decodes and preprocesses the next ones, at most
`prefetch_window` images ahead, so memory does not grow with the images per task.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from producer.constants import FINAL_STATES, REDELIVERIES_FIELD, STATE_SUCCEEDED
from producer.errors import JobNotFound, StorageError
from producer.jobs import refresh_cancel_summary
from producer.messages import BatchMessage
from producer.results import (
    count_rows,
    finalize_job,
    read_shard,
    replace_rows,
    write_shard,
)
from producer.settings import Settings
from producer.spec import JobSpec
from workers.classify import encode_images
from workers.fetch import fetch_bytes
from workers.images import ImageError, decode_image, image_pixels
from workers.metrics import observe_batch
from workers.model import LoadedModel, ModelLoadError
from workers.policy import JobRejected, allowed_local_root, check_job
from workers.relabel import RelabelRejected, relabel_uris
from workers.rows import build_result_rows
from workers.runtime import WorkerRuntime
from workers.stored_embeddings import EmbeddingCollector, write_batch_embeddings

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchOutcome:
    """The result of one delivery of a batch."""

    job_id: str
    batch: int
    attempt: int
    # "written", "skipped_done", "skipped_cancelled", "skipped_failed", "skipped_stale", "attempts_exceeded",
    # or "abandoned_<state>" for a batch stopped mid-way because its job ended (see BatchAbandoned)
    status: str
    succeeded: int = 0
    failed: int = 0
    durations_s: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # failed images by error code


@observe_batch
def process_batch(runtime: WorkerRuntime, message: BatchMessage) -> BatchOutcome:
    """Classify one batch and write its shard. Idempotent: a redelivered batch rewrites the same shard and
    is counted once. Raises when the batch cannot finish (Redis, storage or model errors), so the task
    retries it, until the delivery cap records its images as failed.

    A message of a retry round replaces the rows of its URIs in the batch's existing shard instead (see
    `_merge_and_record`). A message of a round other than the job's current one is dropped."""
    job_id, batch, retry_round = message.job_id, message.batch, message.retry_round
    try:
        state = runtime.store.state(job_id)
    except JobNotFound:
        # Retrying cannot help: the job was deleted, or lost in a restart of a Redis without persistence.
        logger.warning("Job %s batch %d dropped: the job is not in Redis", job_id, batch)
        return BatchOutcome(job_id, batch, 0, "skipped_unknown")
    if state in FINAL_STATES:
        logger.info("Job %s batch %d dropped: job is %s", job_id, batch, state)
        return BatchOutcome(job_id, batch, 0, "skipped_done" if state == STATE_SUCCEEDED else f"skipped_{state}")
    if retry_round and retry_round != runtime.store.retry_round(job_id):
        logger.info("Job %s batch %d of retry round %d dropped: the job is in another round", job_id, batch, retry_round)
        return BatchOutcome(job_id, batch, 0, "skipped_stale")
    if runtime.store.is_batch_done(job_id, batch, retry_round):
        logger.info("Job %s batch %d already counted; delivery ignored", job_id, batch)
        return BatchOutcome(job_id, batch, 0, "skipped_done")

    attempt = runtime.store.count_delivery(job_id, batch, retry_round)
    if attempt > 1:
        runtime.store.count_event(job_id, REDELIVERIES_FIELD)
    spec = _checked_spec(runtime, job_id)
    if spec is None:
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
    collector = EmbeddingCollector.for_model(loaded) if spec.store_embeddings else None
    try:
        if spec.relabel is not None:
            rows, durations = relabel_uris(runtime, spec, loaded, message.uris, job_id, batch)
        else:
            rows, durations = classify_uris(runtime, spec, loaded, message.uris, job_id=job_id, batch=batch, embeddings=collector)
    except RelabelRejected as e:
        # Every batch reads the same source job's embeddings, so the job fails now.
        logger.error("Job %s failed: %s", job_id, e)
        runtime.store.fail(job_id, str(e))
        return BatchOutcome(job_id, batch, attempt, "skipped_failed")
    except BatchAbandoned as e:
        logger.info(
            "Job %s batch %d attempt %d abandoned after %d of %d images: the job is %s; no shard written, batch not counted",
            job_id, batch, attempt, e.images_read, len(message.uris), e.state,
        )
        return BatchOutcome(job_id, batch, attempt, f"abandoned_{e.state}")
    return _finish(runtime, spec, message, attempt, rows, "written", durations, collector)


class BatchAbandoned(Exception):
    """The batch's job ended (such as cancelled) while the batch ran, so it stops without a shard or a count."""

    def __init__(self, state: str, images_read: int) -> None:
        super().__init__(f"job is {state} after {images_read} images of the batch")
        self.state = state
        self.images_read = images_read


def _checked_spec(runtime: WorkerRuntime, job_id: str) -> JobSpec | None:
    """Return the job's spec, or fail the job and return None when the spec is unreadable or not allowed here.

    Every batch of a job has the same spec, so the job fails at its first batch and nothing is read.
    """
    try:
        spec = runtime.spec(job_id)
        check_job(spec, runtime.settings)
    except (ValidationError, KeyError) as e:
        error = f"the job's spec in Redis is invalid ({_first_line(e)}); submit the job again"
    except JobRejected as e:
        error = str(e)
    else:
        return spec
    logger.error("Job %s rejected: %s", job_id, error)
    runtime.store.fail(job_id, error)
    return None


def _first_line(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _finish(
    runtime: WorkerRuntime,
    spec: JobSpec,
    message: BatchMessage,
    attempt: int,
    rows: list[dict[str, Any]],
    status: str,
    durations: dict[str, float],
    embeddings: EmbeddingCollector | None = None,
) -> BatchOutcome:
    started = time.perf_counter()
    if message.retry_round:
        counted, completed = _merge_and_record(runtime, spec, message, rows, status, embeddings)
    else:
        counted, completed = _write_and_record(runtime, spec, message, rows, status, embeddings)
    durations["write"] = time.perf_counter() - started
    if completed:
        finalize_job(runtime.store, runtime.storage, message.job_id)
    elif counted:
        # A batch past its last cancel check may be counted after a cancel; its summary must include it.
        refresh_cancel_summary(runtime.store, runtime.storage, message.job_id)
    succeeded, failed, errors = count_rows(rows)
    outcome = BatchOutcome(message.job_id, message.batch, attempt, status, succeeded, failed, durations, errors)
    logger.info(
        "Job %s batch %d attempt %d finished: %d ok, %d failed, counted=%s, %s",
        message.job_id, message.batch, attempt, outcome.succeeded, failed, counted,
        " ".join(f"{stage}={seconds:.2f}s" for stage, seconds in durations.items()),
    )
    return outcome


def _write_and_record(
    runtime: WorkerRuntime,
    spec: JobSpec,
    message: BatchMessage,
    rows: list[dict[str, Any]],
    status: str,
    embeddings: EmbeddingCollector | None = None,
) -> tuple[bool, bool]:
    """Write a first-run batch's shard and count it. Returns `JobStore.record_batch`'s `(counted, completed)`."""
    try:
        if spec.store_embeddings:
            # Before the shard, whose existence marks the batch done for `resume`.
            write_batch_embeddings(runtime.storage, spec, message.job_id, message.batch, rows, embeddings)
        write_shard(runtime.storage, spec, message.job_id, message.batch, rows)
    except StorageError:
        if status != "attempts_exceeded":
            raise
        # The last delivery still counts the batch, so the job can finish even when its output is broken.
        logger.exception("Job %s batch %d: writing the failure rows failed too; counting the batch anyway", message.job_id, message.batch)
    succeeded, failed, errors = count_rows(rows)
    return runtime.store.record_batch(message.job_id, message.batch, succeeded, failed, errors)


def _merge_and_record(
    runtime: WorkerRuntime,
    spec: JobSpec,
    message: BatchMessage,
    rows: list[dict[str, Any]],
    status: str,
    embeddings: EmbeddingCollector | None = None,
) -> tuple[bool, bool]:
    """Replace the rows of a retry batch's URIs in its shard, rewrite the shard and count the batch.

    The shard keeps its name and row order, so the job still has one row per input. Counting uses the
    whole rewritten shard, so a delivery that repeats an earlier, uncounted rewrite still counts right.
    Returns `JobStore.record_retry_batch`'s `(counted, completed_round)`.
    """
    job_id, batch = message.job_id, message.batch
    try:
        merged, unknown = replace_rows(read_shard(runtime.storage, spec, job_id, batch), rows)
        if unknown:
            logger.warning("Job %s batch %d: %d retried URIs are not in its shard and were dropped, such as %r", job_id, batch, len(unknown), unknown[0])
        if spec.store_embeddings:
            write_batch_embeddings(runtime.storage, spec, job_id, batch, merged, embeddings, merge=True)
        write_shard(runtime.storage, spec, job_id, batch, merged)
    except StorageError:
        if status != "attempts_exceeded":
            raise
        # The last delivery ends the batch's round with its earlier rows and counts unchanged.
        logger.exception("Job %s batch %d: rewriting the shard failed; its earlier rows stay", job_id, batch)
        return runtime.store.record_retry_batch(job_id, batch, message.retry_round, None, images=len(rows))
    return runtime.store.record_retry_batch(job_id, batch, message.retry_round, count_rows(merged), images=len(rows))


def classify_uris(
    runtime: WorkerRuntime,
    spec: JobSpec,
    loaded: LoadedModel,
    uris: list[str],
    *,
    job_id: str | None = None,
    batch: int | None = None,
    embeddings: EmbeddingCollector | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Return one result row per URI, in order, and the seconds spent per stage.

    The fetch threads work at most `prefetch_window` images ahead of the model, so memory does not grow
    with the number of images per task. `fetch`, `decode` and `preprocess` are summed over the fetch
    threads; `wait_images` and `model` are seconds of this thread.

    With a `job_id`, the job's state is read from Redis before each model micro-batch, and BatchAbandoned
    is raised once the job has ended (cancelled, failed, or finalized by another delivery).
    """
    label_embeddings = runtime.prompts.get(spec, loaded)  # [labels, dim]
    root = allowed_local_root(spec, runtime.settings)
    model_batch_size = runtime.settings.model_batch_size
    stages = StageTimes()
    load = functools.partial(load_pixels, runtime, loaded, root=root, job_id=job_id, batch=batch, stages=stages)
    futures = prefetch_in_order(runtime.pool, load, uris, prefetch_window(runtime.settings))
    rows: list[dict[str, Any] | None] = [None] * len(uris)
    pending: list[tuple[int, np.ndarray]] = []
    for index, future in enumerate(futures):
        with stages.timed("wait_images"):
            pixels = _result_or_error(future, uris[index], rows, index)
        if pixels is not None:
            pending.append((index, pixels))
        if pending and (len(pending) == model_batch_size or index == len(uris) - 1):
            if job_id is not None:
                _stop_if_job_ended(runtime, job_id, futures, index + 1)
            with stages.timed("model"):
                _score_pending(loaded, spec, label_embeddings, pending, uris, rows, embeddings)
            pending = []
    return [row for row in rows if row is not None], stages.seconds


def _stop_if_job_ended(runtime: WorkerRuntime, job_id: str, futures: Generator[Any, None, None], images_read: int) -> None:
    """Raise BatchAbandoned, after closing `futures`, when the job ended or is gone. One Redis read."""
    try:
        state = runtime.store.state(job_id)
    except JobNotFound:
        state = "gone"
    if state == "gone" or state in FINAL_STATES:
        futures.close()
        raise BatchAbandoned(state, images_read)


def prefetch_in_order(
    pool: Executor, function: Callable[[T], R], items: Iterable[T], window: int
) -> Generator[Future[R], None, None]:
    """Yield one future of `function(item)` per item, in order, keeping at most `window` items submitted to
    `pool` and not yet taken by the caller. The next item is submitted when the caller asks for the next future.

    Closing the generator cancels the submitted futures that have not started; running ones finish unread."""
    remaining = iter(items)
    futures = deque(pool.submit(function, item) for item in itertools.islice(remaining, window))
    try:
        while futures:
            yield futures.popleft()
            futures.extend(pool.submit(function, item) for item in itertools.islice(remaining, 1))
    finally:
        for future in futures:
            future.cancel()


def prefetch_window(settings: Settings) -> int:
    """Return how many images a task keeps in flight in the fetch threads: two model batches, and at least one per thread."""
    return max(2 * settings.model_batch_size, settings.fetch_threads)


class StageTimes:
    """Seconds spent per processing stage, summed over threads. Thread-safe."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"fetch": 0.0, "decode": 0.0, "preprocess": 0.0, "wait_images": 0.0, "model": 0.0}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed


def _result_or_error(future: "Future[np.ndarray]", uri: str, rows: list[Any], index: int) -> np.ndarray | None:
    try:
        return future.result()
    except ImageError as e:
        logger.warning("Image %s failed: %s (%s)", uri, e.code, e.message)
        rows[index] = _error_row(uri, e.code, e.message)
        return None
    except SoftTimeLimitExceeded:
        raise  # the batch's time limit, raised while waiting here: the task retries the whole batch
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
    embeddings: EmbeddingCollector | None = None,
) -> None:
    pixels = np.stack([item for _, item in pending])  # [micro_batch, 3, H, W]
    image_embeddings = encode_images(loaded, pixels)  # [micro_batch, dim]
    if embeddings is not None:
        embeddings.add([uris[index] for index, _ in pending], image_embeddings)
    scored = build_result_rows([uris[index] for index, _ in pending], image_embeddings, label_embeddings, spec, loaded.logit_scale)
    for (index, _), row in zip(pending, scored):
        rows[index] = row


def load_pixels(
    runtime: WorkerRuntime,
    loaded: LoadedModel,
    uri: str,
    root: Path | None = None,
    job_id: str | None = None,
    batch: int | None = None,
    stages: StageTimes | None = None,
) -> np.ndarray:
    """Fetch, decode and preprocess one image. Runs in a fetch thread.

    Returns uint8 `[3, H, W]` resized and cropped by `loaded.preprocessor`, or, for a model whose processor
    it cannot reproduce, float32 pixels normalised by the processor itself.
    """
    settings = runtime.settings
    stages = stages or StageTimes()
    with stages.timed("fetch"):
        data = fetch_bytes(runtime.storage, uri, settings.max_image_bytes, settings.allowed_buckets, root, job_id=job_id, batch=batch)
    return decode_pixels(runtime, loaded, data, stages)


def decode_pixels(runtime: WorkerRuntime, loaded: LoadedModel, data: bytes, stages: StageTimes | None = None) -> np.ndarray:
    """Decode and preprocess the bytes of one image file, as `load_pixels` does after the fetch. Thread-safe.

    Raises ImageError for bytes that are not a readable image within CLIPFLEET_MAX_IMAGE_PIXELS. The caller
    checks CLIPFLEET_MAX_IMAGE_BYTES.
    """
    settings = runtime.settings
    stages = stages or StageTimes()
    preprocessor = loaded.preprocessor
    draft_size = preprocessor.draft_size if preprocessor is not None and settings.jpeg_draft else None
    # The image's pixels stay reserved until preprocessing has scaled it down to the model's input size.
    with runtime.decode_budget.reserve(image_pixels(data)):
        with stages.timed("decode"):
            image = decode_image(data, max_pixels=settings.max_image_pixels, draft_size=draft_size)
        with stages.timed("preprocess"):
            if preprocessor is None:
                return loaded.processor(images=image, return_tensors="np")["pixel_values"][0]
            return preprocessor.resize_and_crop(image)


def _error_row(uri: str, code: str, message: str) -> dict[str, Any]:
    return {"uri": uri, "label": None, "score": None, "top_k": [], "error": {"code": code, "message": message}}
