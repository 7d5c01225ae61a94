"""Realtime embeddings: the worker's side of `producer.realtime`.

`embed_pending` takes up to CLIPFLEET_REALTIME_MAX_REQUESTS waiting requests off a realtime queue at once and
runs the inputs of all of them through the model together. All texts go through the text tower in one
`encode_prompts` call. All images are fetched, decoded and preprocessed in the runtime's fetch threads and go
through `encode_images` in micro-batches of CLIPFLEET_MODEL_BATCH_SIZE. The embeddings are the ones batch jobs
use: L2-normalised float32.

A task that leaves requests in the pending list (more than CLIPFLEET_REALTIME_MAX_REQUESTS waited) sends one more
wake-up before it runs the model, so another pool process or worker takes the rest in parallel (see
`producer.realtime`).

Each request gets one reply. An input that cannot be embedded fails its whole request with a RealtimeError
naming the input, and never the other requests taken with it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from pydantic import ValidationError

from producer.constants import REALTIME_REQUEST_KEY
from producer.realtime import (
    EmbedTaskMessage,
    RealtimeError,
    RealtimeInput,
    RealtimeReply,
    RealtimeRequest,
    arm_wake,
    encode_vectors,
    push_reply,
    take_pending,
)
from producer.uris import is_s3_uri, shorten
from workers.classify import encode_images, encode_prompts, max_prompt_tokens
from workers.images import ImageError
from workers.metrics import record_safely
from workers.model import LoadedModel
from workers.pipeline import (
    StageTimes,
    decode_pixels,
    load_pixels,
    prefetch_in_order,
    prefetch_window,
)
from workers.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

# HTTP statuses of RealtimeError. Every input error is 400, access_denied included, because the client chose
# the object. A request for another model is 503, because the fleet may serve that model later.
INPUT_ERROR_STATUS = 400
MODEL_NOT_SERVED_STATUS = 503
INTERNAL_ERROR_STATUS = 500


class InvalidInput(Exception):
    """An input that is no image error of ERROR_CODES but still cannot be embedded, such as invalid base64."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "invalid_input"
        self.message = message


@dataclass
class PendingRequest:
    """One request taken from the queue, with its embeddings filled in as the towers run. Model thread only."""

    request: RealtimeRequest
    embeddings: list[np.ndarray | None]  # per input, float32 [dim]
    tokens: list[int]
    error: RealtimeError | None = None
    replied: bool = False

    @classmethod
    def start(cls, request: RealtimeRequest) -> PendingRequest:
        inputs = len(request.inputs)
        return cls(request, [None] * inputs, [0] * inputs)

    def fail(self, index: int | None, code: str, message: str, status: int = INPUT_ERROR_STATUS) -> None:
        """Record the request's error, keeping the first one."""
        if self.error is None:
            self.error = RealtimeError(index=index, code=code, message=message, status=status)


@dataclass
class TakenRequests:
    """The requests that `take_requests` popped, and how many of the popped ids it left out and why."""

    requests: list[RealtimeRequest] = field(default_factory=list)
    missing: int = 0  # withdrawn by their sender, or expired
    expired: int = 0  # stored, but past their deadline
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (request id, why its JSON is invalid)
    remaining: int = 0  # ids left in the pending list after the pop


def embed_pending(runtime: WorkerRuntime, message: EmbedTaskMessage, worker: str = "", celery: Any = None) -> int:
    """Embed the waiting requests of realtime queue `message.queue` and push one reply per request.

    Returns the number of requests replied to, 0 when another worker took them first. A message for another
    queue than this worker's CLIPFLEET_REALTIME_QUEUE is dropped, because that queue's requests may be for
    another model. `worker` names this worker in the replies. When requests are left in the queue, sends one
    more TASK_EMBED wake-up with the Celery app `celery` before running the model. Without `celery`, the waiting
    senders re-arm the queue themselves within a few seconds. Raises redis-py's errors when Redis fails while
    the requests are taken, which loses them; their senders time out. Not thread-safe (uses the model).
    """
    settings = runtime.settings
    if message.queue != settings.realtime_queue:
        logger.warning(
            "Dropped an embed task for realtime queue %r: this worker serves %r (CLIPFLEET_REALTIME_QUEUE)",
            message.queue, settings.realtime_queue,
        )
        return 0
    started = time.perf_counter()
    client = runtime.store.redis
    taken = take_requests(client, message.queue, settings.realtime_max_requests)
    if taken.remaining and celery is not None:
        # The task's expiry: the longest that an API sender waits by default.
        sent = arm_wake(client, celery, message.queue, expires_s=settings.api_timeout_s)
        logger.debug("Realtime queue %s: %d requests left waiting; another wake-up %s", message.queue, taken.remaining, "sent" if sent else "was queued already")
    for request_id, reason in taken.invalid:
        _push_internal_error(client, request_id, settings.model, worker, f"the stored request is invalid: {reason}")
    if not taken.requests:
        _record_metrics(taken, [])
        logger.debug("Realtime queue %s: no request to embed (%d withdrawn or expired)", message.queue, taken.missing + taken.expired)
        return len(taken.invalid)

    stages = StageTimes()
    pending = embed_requests(runtime, taken.requests, client, worker, stages)
    _log_call(message.queue, taken, pending, stages, time.perf_counter() - started)
    _record_metrics(taken, pending)
    return len(pending) + len(taken.invalid)


def take_requests(client: redis.Redis, queue: str, max_requests: int) -> TakenRequests:
    """Pop up to `max_requests` request ids off `queue`'s pending list and read and delete their requests.

    The pop (`producer.realtime.take_pending`) deletes the queue's wake key first and is atomic, so two workers
    never take the same id. Requests that are missing (withdrawn or expired), past their deadline, or invalid are
    left out and counted. The caller must wake the queue again when `remaining` is not 0.
    """
    request_ids, remaining = take_pending(client, queue, max_requests)
    with client.pipeline(transaction=False) as pipe:
        for request_id in request_ids:
            pipe.getdel(REALTIME_REQUEST_KEY.format(request_id=request_id))
        bodies = pipe.execute()
    taken = TakenRequests(remaining=remaining)
    now = time.time()
    for request_id, body in zip(request_ids, bodies):
        if body is None:
            taken.missing += 1
            continue
        try:
            request = RealtimeRequest.model_validate_json(body)
        except ValidationError as e:
            logger.error("Realtime request %s is invalid and gets an error reply: %s", request_id, e)
            taken.invalid.append((request_id, str(e).splitlines()[0]))
            continue
        if request.deadline <= now:
            taken.expired += 1
            continue
        taken.requests.append(request)
    return taken


def embed_requests(
    runtime: WorkerRuntime, requests: list[RealtimeRequest], client: redis.Redis, worker: str, stages: StageTimes
) -> list[PendingRequest]:
    """Embed `requests` together and push their replies; return them with their outcomes.

    Requests rejected before the model runs (another model, a text that is too long) get their replies first.
    After an unexpected failure of the model, every request without a reply yet gets an internal_error.
    """
    settings = runtime.settings
    pending = [PendingRequest.start(request) for request in requests]
    try:
        loaded = runtime.model(settings.model, settings.model_revision)
        reject_other_models(pending, settings.model)
        count_text_tokens(loaded, pending)
        push_replies(client, pending, worker, errors_only=True)
        with stages.timed("text"):
            embed_texts(loaded, pending)
        embed_images(runtime, loaded, pending, stages)
    except Exception as e:  # noqa: BLE001 - every sender still gets a reply, and the cause is logged
        logger.exception("Embedding %d realtime requests failed", len(pending))
        for item in pending:
            item.fail(None, "internal_error", f"the worker failed to embed the request: {type(e).__name__}: {e}", INTERNAL_ERROR_STATUS)
    with stages.timed("reply"):
        push_replies(client, pending, worker)
    return pending


def image_tokens(loaded: LoadedModel) -> int:
    """Return the tokens the image tower reads per image: one per patch plus the class token."""
    vision = loaded.model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def reject_other_models(pending: Iterable[PendingRequest], model: str) -> None:
    """Fail the requests for a model other than `model`, this worker's CLIPFLEET_MODEL, with model_not_served."""
    for item in pending:
        if item.request.model != model:
            item.fail(
                None, "model_not_served",
                f"model {item.request.model!r} is not served on this realtime queue, whose workers run {model!r}",
                MODEL_NOT_SERVED_STATUS,
            )


def count_text_tokens(loaded: LoadedModel, pending: list[PendingRequest]) -> None:
    """Record each text's token count, start and end tokens included, and fail requests with a text longer
    than the model's context with text_too_long. Texts are never truncated."""
    texts = [(item, index, text) for item, index, text in _texts(pending)]
    if not texts:
        return
    counts = [len(ids) for ids in loaded.tokenizer([text for _, _, text in texts], truncation=False, verbose=False)["input_ids"]]
    max_tokens = max_prompt_tokens(loaded)
    for (item, index, _), count in zip(texts, counts):
        item.tokens[index] = count
        if max_tokens is not None and count > max_tokens:
            item.fail(index, "text_too_long", f"input[{index}] has {count} tokens, above the model's limit of {max_tokens}; shorten the text")


def embed_texts(loaded: LoadedModel, pending: list[PendingRequest]) -> None:
    """Encode the texts of all requests without an error in one `encode_prompts` call (chunked inside it)."""
    texts = list(_texts(pending))
    if not texts:
        return
    embeddings = encode_prompts(loaded, [text for _, _, text in texts]).numpy()  # [texts, dim]
    for (item, index, _), row in zip(texts, embeddings):
        item.embeddings[index] = row


def _texts(pending: Iterable[PendingRequest]) -> Iterable[tuple[PendingRequest, int, str]]:
    for item in pending:
        if item.error is None:
            for index, value in enumerate(item.request.inputs):
                if value.kind == "text" and value.text is not None:
                    yield item, index, value.text


def embed_images(runtime: WorkerRuntime, loaded: LoadedModel, pending: list[PendingRequest], stages: StageTimes) -> None:
    """Encode the images of all requests without an error, in micro-batches of CLIPFLEET_MODEL_BATCH_SIZE.

    The fetch threads load images at most `prefetch_window` ahead of the model, and skip the images of a
    request that has already failed. An image that fails fails its request.
    """
    images = [(item, index, value) for item in pending if item.error is None for index, value in enumerate(item.request.inputs) if value.kind == "image"]
    if not images:
        return
    tokens = image_tokens(loaded)
    load = functools.partial(_load_image, runtime, loaded, stages)
    futures = prefetch_in_order(runtime.pool, load, images, prefetch_window(runtime.settings))
    batch: list[tuple[PendingRequest, int, np.ndarray]] = []
    for position, future in enumerate(futures):
        item, index, _ = images[position]
        item.tokens[index] = tokens
        with stages.timed("wait_images"):
            pixels = _pixels_or_fail(future, item, index)
        if pixels is not None:
            batch.append((item, index, pixels))
        if batch and (len(batch) == runtime.settings.model_batch_size or position == len(images) - 1):
            with stages.timed("model"):
                _encode_batch(loaded, batch)
            batch = []


def _load_image(
    runtime: WorkerRuntime, loaded: LoadedModel, stages: StageTimes, image: tuple[PendingRequest, int, RealtimeInput]
) -> np.ndarray | None:
    """Return the preprocessed pixels of one image input, or None when its request has failed. Runs in a fetch thread."""
    item, index, value = image
    if item.error is not None:
        return None
    if value.uri is not None:
        if not is_s3_uri(value.uri):
            raise ImageError("access_denied", f"{shorten(value.uri)} was not read: image URIs must be s3://bucket/key")
        return load_pixels(runtime, loaded, value.uri, stages=stages)
    data = decode_base64(value.data or "", runtime.settings.max_image_bytes)
    return decode_pixels(runtime, loaded, data, stages)


def decode_base64(data: str, max_bytes: int) -> bytes:
    """Return the bytes that base64 `data` encodes. Raises InvalidInput, or ImageError("too_large") above `max_bytes`."""
    # Every 4 base64 characters encode 3 bytes, less at most 2 of padding: reject before decoding.
    if len(data) // 4 * 3 - 2 > max_bytes:
        raise ImageError("too_large", f"the image data has about {len(data) // 4 * 3} bytes, above CLIPFLEET_MAX_IMAGE_BYTES={max_bytes}")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"`data` is not valid base64: {e}") from e
    if len(decoded) > max_bytes:
        raise ImageError("too_large", f"the image data has {len(decoded)} bytes, above CLIPFLEET_MAX_IMAGE_BYTES={max_bytes}")
    return decoded


def _pixels_or_fail(future: Future[np.ndarray | None], item: PendingRequest, index: int) -> np.ndarray | None:
    """Return the future's pixels, or None after failing `item` with the image's error."""
    try:
        return future.result()
    except (ImageError, InvalidInput) as e:
        logger.warning("Realtime request %s input %d failed: %s (%s)", item.request.request_id, index, e.code, e.message)
        item.fail(index, e.code, f"input[{index}]: {e.message}")
    except Exception as e:  # noqa: BLE001 - an image that breaks the decoder or processor in an unforeseen way
        logger.exception("Realtime request %s input %d failed with an unexpected error", item.request.request_id, index)
        item.fail(index, "decode_error", f"input[{index}]: unexpected {type(e).__name__}: {e}")
    return None


def _encode_batch(loaded: LoadedModel, batch: list[tuple[PendingRequest, int, np.ndarray]]) -> None:
    pixels = np.stack([item_pixels for _, _, item_pixels in batch])  # [micro_batch, 3, H, W]
    embeddings = encode_images(loaded, pixels).numpy()  # [micro_batch, dim]
    for (item, index, _), row in zip(batch, embeddings):
        item.embeddings[index] = row


def push_replies(client: redis.Redis, pending: list[PendingRequest], worker: str, errors_only: bool = False) -> None:
    """Push the reply of each request without one yet; with `errors_only`, of the failed ones only."""
    for item in pending:
        if item.replied or (errors_only and item.error is None):
            continue
        push_reply(client, build_reply(item, worker))
        item.replied = True


def build_reply(item: PendingRequest, worker: str) -> RealtimeReply:
    """Return the reply of one request: its error, or its embeddings and token counts."""
    request = item.request
    if item.error is not None:
        return RealtimeReply(request_id=request.request_id, model=request.model, worker=worker, error=item.error)
    vectors = np.stack(item.embeddings)  # [inputs, dim]
    return RealtimeReply(
        request_id=request.request_id, model=request.model, worker=worker, dim=vectors.shape[1],
        embeddings=encode_vectors(vectors), tokens=item.tokens,
    )


def _push_internal_error(client: redis.Redis, request_id: str, model: str, worker: str, message: str) -> None:
    error = RealtimeError(code="internal_error", message=message, status=INTERNAL_ERROR_STATUS)
    push_reply(client, RealtimeReply(request_id=request_id, model=model, worker=worker, error=error))


def _record_metrics(taken: TakenRequests, pending: list[PendingRequest]) -> None:
    failed = sum(1 for item in pending if item.error is not None) + len(taken.invalid)
    outcomes = {"succeeded": len(pending) + len(taken.invalid) - failed, "failed": failed, "expired": taken.expired, "withdrawn": taken.missing}
    record_safely(lambda metrics: metrics.record_realtime_call(outcomes))


def _log_call(queue: str, taken: TakenRequests, pending: list[PendingRequest], stages: StageTimes, elapsed_s: float) -> None:
    inputs = [value.kind for item in pending for value in item.request.inputs]
    failed = sum(1 for item in pending if item.error is not None)
    logger.info(
        "Realtime queue %s: replied to %d requests (%d texts, %d images; %d failed, %d expired, %d withdrawn) in %.3f s: %s",
        queue, len(pending), inputs.count("text"), inputs.count("image"), failed, taken.expired, taken.missing, elapsed_s,
        " ".join(f"{stage}={seconds:.3f}s" for stage, seconds in stages.seconds.items()),
    )
