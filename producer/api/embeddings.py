"""`POST /v1/embeddings`: texts and images embedded by a live worker, in OpenAI's request and response shapes.

The plain functions `parse_inputs`, `route` and `embed` carry the work, so other routes (batches) reuse them:
parse and check the inputs, choose a worker's realtime queue, send the request through Redis and wait for the reply.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
import uuid
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from producer.api.errors import ApiError
from producer.api.models import served_list
from producer.api.schemas import (
    EMBEDDINGS_DESCRIPTION,
    EmbeddingsRequest,
    EmbeddingsResponse,
    error_responses,
)
from producer.api.state import ApiState, get_state
from producer.constants import REALTIME_PENDING_KEY
from producer.fleet import WorkerInfo, live_workers, serving
from producer.realtime import (
    RealtimeError,
    RealtimeInput,
    RealtimeReply,
    RealtimeRequest,
    decode_vectors,
    send_request,
    wait_reply,
    withdraw_request,
)
from producer.settings import Settings
from producer.uris import S3_SCHEME, check_bucket_allowed, parse_s3_uri, shorten

logger = logging.getLogger(__name__)

router = APIRouter()

DATA_URI_PREFIX = "data:image/"
DATA_SCHEME = "data:"
# The Retry-After of a 429, in seconds.
# NOTE: a fixed value, not derived from how fast the workers drain the queue.
RETRY_AFTER_S = 1


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    responses=error_responses(400, 401, 413, 429, 500, 503, 504),
    summary="Embed texts and images",
    description=EMBEDDINGS_DESCRIPTION,
)
def create_embeddings(body: EmbeddingsRequest, state: ApiState = Depends(get_state)) -> Response:
    inputs = parse_inputs(body.input, state.settings)
    vectors, tokens = embed(state, body.model, inputs)  # [inputs, dim]
    check_dimensions(body.dimensions, vectors.shape[1], body.model)
    return JSONResponse(embeddings_body(vectors, tokens, body.model, body.encoding_format))


def parse_inputs(raw: object, settings: Settings) -> list[RealtimeInput]:
    """Return the RealtimeInputs of an OpenAI `input` value: a string, or a list of 1 to CLIPFLEET_API_MAX_INPUTS strings.

    Each string becomes an image (`s3://` URI or `data:image/` base64 data URI) or a text; see EMBEDDINGS_DESCRIPTION.
    Raises ApiError 400 (`param="input"`) for token arrays, empty strings, other types, too many inputs, invalid
    URIs (an s3:// URI without a key, a data URI of a type other than image/) and buckets outside CLIPFLEET_ALLOWED_BUCKETS, and 413 for a data URI image over CLIPFLEET_MAX_IMAGE_BYTES.
    """
    values = _input_strings(raw)
    if len(values) > settings.api_max_inputs:
        raise _invalid(
            f"input has {len(values)} items, more than CLIPFLEET_API_MAX_INPUTS={settings.api_max_inputs}; "
            "split it into several requests"
        )
    return [parse_input(value, index, settings) for index, value in enumerate(values)]


def _input_strings(raw: object) -> list[str]:
    """Return `raw` as a list of strings; raise ApiError 400 for any other shape, with a message of its own for token arrays."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list):
        raise _invalid(f"input must be a string or a list of strings, not {_json_type(raw)}")
    if not raw:
        raise _invalid("input is an empty list; send at least one string")
    if all(_is_token(item) for item in raw) or any(isinstance(item, list) for item in raw):
        raise _invalid(
            "input is a token array or a list of token arrays, which are not supported: CLIP uses its own "
            "tokenizer, so send each text as a string"
        )
    for index, item in enumerate(raw):
        if not isinstance(item, str):
            raise _invalid(f"input[{index}] is {_json_type(item)}; every item of input must be a string")
    return raw


def parse_input(value: str, index: int, settings: Settings) -> RealtimeInput:
    """Return the RealtimeInput of the string `input[index]`; raise ApiError 400 or 413 as `parse_inputs` does."""
    if value.startswith(S3_SCHEME):
        return RealtimeInput(kind="image", uri=_checked_s3_uri(value, index, settings.allowed_buckets))
    if value[:len(DATA_URI_PREFIX)].lower() == DATA_URI_PREFIX:
        return RealtimeInput(kind="image", data=data_uri_payload(value, index, settings.max_image_bytes))
    if value[:len(DATA_SCHEME)].lower() == DATA_SCHEME:
        raise _invalid(
            f"input[{index}] {shorten(value.partition(',')[0])} is a data URI of another type: only data:image/ URIs "
            "are images; send text as plain strings"
        )
    if not value:
        raise _invalid(f"input[{index}] is an empty string; send a non-empty text, an s3:// URI or a data:image/ URI")
    return RealtimeInput(kind="text", text=value)


def _checked_s3_uri(value: str, index: int, allowed_buckets: list[str]) -> str:
    """Return the image URI `value` after checking its bucket; raise ApiError 400 for a URI of no object (an empty key)."""
    try:
        uri = parse_s3_uri(value)
        check_bucket_allowed(uri, allowed_buckets)
    except ValueError as e:
        raise _invalid(f"input[{index}]: {e}") from e
    # NOTE: checked here, not in parse_s3_uri, whose other callers (job sources) accept bucket and prefix URIs.
    if not uri.key:
        raise _invalid(f"input[{index}] {shorten(value)}: the URI names no object key; write it as s3://BUCKET/KEY")
    return value


def data_uri_payload(value: str, index: int, max_image_bytes: int) -> str:
    """Return the base64 payload of the data URI `input[index]` (`data:image/TYPE;base64,DATA`) after checking it.

    Raises ApiError 400 when the URI is not base64-encoded, the payload is not valid base64 (line breaks included)
    or it decodes to no bytes, and 413 when it decodes to more than `max_image_bytes` bytes.
    """
    header, comma, payload = value.partition(",")
    if not comma or "base64" not in header.split(";")[1:]:
        raise _invalid(f"input[{index}] {shorten(header)} is not a base64 data URI; write it as data:image/TYPE;base64,DATA")
    size_bytes = len(payload) // 4 * 3 - payload[-2:].count("=")  # the decoded size, known before decoding
    if size_bytes > max_image_bytes:
        raise ApiError(
            413, f"input[{index}] is an image of {size_bytes} bytes, over CLIPFLEET_MAX_IMAGE_BYTES={max_image_bytes}; "
            "send a smaller image", code="too_large", param="input",
        )
    try:
        decoded = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _invalid(f"input[{index}] has invalid base64 data ({e}); encode the image file with standard base64, without line breaks") from e
    if not decoded:
        raise _invalid(f"input[{index}] is a data URI without image data; put the base64 of an image file after the comma")
    return payload


def route(state: ApiState, model: str) -> WorkerInfo:
    """Return a live worker serving `model` on the realtime queue with the fewest waiting requests.

    Raises ApiError 503 when no live worker serves `model`, and 429 (with Retry-After) when that queue holds
    CLIPFLEET_API_QUEUE_HIGH_WATER waiting requests or more. Reads Redis, whose connection errors propagate.
    """
    workers = live_workers(state.redis)
    candidates = {worker.realtime_queue: worker for worker in serving(workers, model)}
    if not candidates:
        raise ApiError(503, f"model {model!r} is not served by any live worker; {served_list(workers)}", code="model_not_served", param="model")

    queues = sorted(candidates)
    with state.redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            # The requests not yet taken by a worker; the Celery list holds at most about one wake-up task.
            pipe.llen(REALTIME_PENDING_KEY.format(queue=queue))
        lengths = dict(zip(queues, pipe.execute()))
    queue = min(queues, key=lengths.__getitem__)
    high_water = state.settings.api_queue_high_water
    if lengths[queue] >= high_water:
        raise ApiError(
            429, f"realtime queue {queue!r} of model {model!r} holds {lengths[queue]} waiting requests, at or over "
            f"CLIPFLEET_API_QUEUE_HIGH_WATER={high_water}; retry in {RETRY_AFTER_S} s or add workers",
            code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return candidates[queue]


def embed(state: ApiState, model: str, inputs: list[RealtimeInput], timeout_s: float | None = None) -> tuple[np.ndarray, list[int]]:
    """Embed `inputs` with a worker of `model` and return the L2-normalised float32 `[inputs, dim]` vectors and the
    tokens of each input (text tokens, or image patches plus one).

    Blocks its thread for up to `timeout_s` (default CLIPFLEET_API_TIMEOUT_S). Raises ApiError: those of `route`,
    504 when no reply comes in time (the request is then withdrawn), the worker's error with its status, and 500
    for a malformed reply. Redis connection errors (redis-py's, kombu's OperationalError) propagate.
    """
    worker = route(state, model)
    timeout_s = state.settings.api_timeout_s if timeout_s is None else timeout_s
    request = RealtimeRequest(request_id=uuid.uuid4().hex, model=worker.model, inputs=inputs, deadline=time.time() + timeout_s)
    started = time.monotonic()
    send_request(state.redis, state.celery, worker.realtime_queue, request)
    logger.debug("Sent request %s with %d inputs to queue %s", request.request_id, len(inputs), worker.realtime_queue)

    reply = wait_reply(state.redis, request.request_id, request.deadline, celery=state.celery, queue=worker.realtime_queue)
    if reply is None:
        withdraw_request(state.redis, worker.realtime_queue, request.request_id)
        logger.warning("Request %s to queue %s got no reply within %.1f s; withdrawn", request.request_id, worker.realtime_queue, timeout_s)
        raise ApiError(
            504, f"no worker of model {model!r} replied within CLIPFLEET_API_TIMEOUT_S={timeout_s:g} s; the realtime "
            f"queue {worker.realtime_queue!r} may be behind or its workers busy. Retry later or add workers", code="timeout",
        )
    logger.debug("Got the reply to request %s from %s in %.3f s", request.request_id, reply.worker, time.monotonic() - started)
    return reply_vectors(reply, len(inputs))


def reply_vectors(reply: RealtimeReply, rows: int) -> tuple[np.ndarray, list[int]]:
    """Return the `[rows, dim]` vectors and per-input tokens of `reply`; raise its error, or ApiError 500 if malformed."""
    if reply.error is not None:
        raise reply_error(reply.error)
    try:
        vectors = decode_vectors(reply.embeddings, rows, reply.dim)
        if len(reply.tokens) != rows:
            raise ValueError(f"{len(reply.tokens)} token counts for {rows} inputs")
    except ValueError as e:
        logger.error("Worker %s sent a malformed reply to request %s: %s", reply.worker, reply.request_id, e)
        raise ApiError(500, f"the worker sent a malformed reply ({e}); retry, and report it if it persists", code="server_error") from e
    return vectors, list(reply.tokens)


def reply_error(error: RealtimeError) -> ApiError:
    """Return the ApiError of a worker's RealtimeError, with its status, code and message (which names the input)."""
    param = "model" if error.code == "model_not_served" else "input"
    return ApiError(error.status, error.message, code=error.code, param=param)


def check_dimensions(dimensions: int | None, dim: int, model: str) -> None:
    """Raise ApiError 400 unless `dimensions` is None or the model's embedding size `dim`."""
    # NOTE: the API server learns a model's size from a worker's reply, so a wrong `dimensions` costs one embedding.
    if dimensions is not None and dimensions != dim:
        raise ApiError(
            400, f"dimensions={dimensions} is not supported: model {model!r} returns {dim}-dimensional embeddings and "
            f"they cannot be shortened; leave dimensions out or set it to {dim}", code="invalid_dimensions", param="dimensions",
        )


def embeddings_body(vectors: np.ndarray, tokens: list[int], model: str, encoding_format: Literal["float", "base64"]) -> dict[str, Any]:
    """Return OpenAI's embeddings response for `vectors` `[inputs, dim]`; base64 is of little-endian float32 values."""
    little_endian = np.ascontiguousarray(vectors, dtype="<f4")
    data = [
        {"object": "embedding", "index": index, "embedding": _encode_row(row, encoding_format)}
        for index, row in enumerate(little_endian)
    ]
    total = int(sum(tokens))
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": total, "total_tokens": total}}


def _encode_row(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(row.tobytes()).decode("ascii")
    return row.tolist()


def _invalid(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_input", param="input")


def _json_type(value: object) -> str:
    """Return the JSON name of `value`'s type, for messages: `a number`, `an object`, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a string"


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
