"""OpenAI's Batch API: batches of /v1/embeddings or /v1/classifications requests, run as clipfleet jobs.

A batch is the Redis hash API_BATCH_KEY. Its field `object` holds OpenAI's Batch object as JSON, written by
the route that creates it and then only by the driver (producer.api.batch_jobs). The cancel route writes only
the field `cancel_requested_at`, and a batch is shown as `cancelling` while that field is set and the driver
has not finished it, so the two writers never overwrite each other. API_BATCHES_INDEX_KEY lists every batch
by creation time, and API_BATCHES_ACTIVE_KEY the batches that the driver still advances.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from producer.api.errors import ApiError
from producer.api.files import files_folder, load_file
from producer.api.schemas import error_responses
from producer.api.state import ApiState, get_state
from producer.constants import (
    API_BATCH_KEY,
    API_BATCHES_ACTIVE_KEY,
    API_BATCHES_INDEX_KEY,
)

router = APIRouter(tags=["batches"])

ENDPOINTS = ("/v1/embeddings", "/v1/classifications")
COMPLETION_WINDOW_S = {"24h": 24 * 3600}
BATCH_ID_RE = re.compile(r"batch_[A-Za-z0-9]{1,64}")
# OpenAI's limits: requests per input file, metadata pairs, and lengths of metadata keys and values.
MAX_REQUESTS = 50_000
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# A batch that fails validation lists at most this many invalid lines in `errors`.
MAX_LISTED_ERRORS = 100
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")
# Statuses in which a cancel request is accepted, and in which the batch is then shown as `cancelling`.
CANCELLABLE_STATUSES = ("validating", "in_progress", "finalizing")


class CreateBatch(BaseModel):
    """The body of POST /v1/batches."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: Literal["/v1/embeddings", "/v1/classifications"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None


class ClassificationBody(BaseModel):
    """The body of a /v1/classifications request: classify one image with CLIP zero-shot prompts.

    The response body is a clipfleet result row: `uri`, `label`, `score`, `top_k` and `error`.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="The CLIPFLEET_MODEL of the workers, or its last path component")
    input: str = Field(min_length=1, description="An s3:// URI of the image, or a data URI `data:image/png;base64,...`")
    labels: list[str] | dict[str, list[str]] = Field(description="Class names, or class name -> its own prompts")
    templates: list[str] | None = Field(None, description="Prompt templates, each with `{}` once")
    template_set: str | None = Field(None, description="A built-in template set, instead of `templates`")
    top_k: StrictInt = Field(5, ge=1, description="Labels listed in `top_k`, best first")
    multi_label: StrictBool = Field(False, description="Score each label by its raw cosine similarity, without a softmax")
    threshold: float | None = Field(None, description="Leave out `top_k` entries scoring below this")


@dataclass(frozen=True)
class BatchRequest:
    """One valid line of a batch input file. `line` counts from 1."""

    line: int
    custom_id: str
    body: dict[str, Any]


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


def parse_input(content: bytes, endpoint: str) -> tuple[list[BatchRequest], list[dict[str, Any]]]:
    """Split a batch input file into requests, and list the lines that make the whole file invalid.

    A line is invalid when it is not a JSON object with a string `custom_id` unique in the file, `method`
    POST, `url` equal to `endpoint` and an object `body`. A file with any invalid line, no request or more
    than MAX_REQUESTS fails validation as a whole, as OpenAI's does; its errors are OpenAI's BatchError
    objects (code, message, param, line). A body is checked later, request by request.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [_line_error("invalid_encoding", f"the file is not UTF-8 text: {e}; save it as UTF-8 JSONL", None, None)]
    requests: list[BatchRequest] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        request = _parse_line(line, number, endpoint, seen, errors)
        if request is not None:
            requests.append(request)
            seen.add(request.custom_id)
    if not requests and not errors:
        errors.append(_line_error("empty_file", "the input file contains no requests; write one JSON request per line", None, None))
    if len(requests) > MAX_REQUESTS:
        errors.append(_line_error(
            "too_many_requests", f"the input file has {len(requests)} requests, over the limit of {MAX_REQUESTS}; "
            "split it into several batches", None, None,
        ))
    return requests, errors


def _parse_line(line: str, number: int, endpoint: str, seen: set[str], errors: list[dict[str, Any]]) -> BatchRequest | None:
    """Return the request on one line, or None after adding its error to `errors`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        errors.append(_line_error("invalid_json_line", f"line {number} is not valid JSON: {e}", None, number))
        return None
    problem = _line_problem(record, endpoint, seen)
    if problem is not None:
        code, message, param = problem
        errors.append(_line_error(code, f"line {number}: {message}", param, number))
        return None
    return BatchRequest(number, record["custom_id"], record["body"])


def _line_problem(record: Any, endpoint: str, seen: set[str]) -> tuple[str, str, str | None] | None:
    """Return (code, message, param) of what makes a parsed line invalid, or None for a valid request."""
    if not isinstance(record, dict):
        return "invalid_request", "a request must be a JSON object with custom_id, method, url and body", None
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_required_parameter", "custom_id must be a non-empty string", "custom_id"
    if custom_id in seen:
        return "duplicate_custom_id", f"custom_id {custom_id!r} appears on an earlier line; give each request its own", "custom_id"
    if record.get("method") != "POST":
        return "invalid_method", f"method is {record.get('method')!r}; batch requests use POST", "method"
    if record.get("url") != endpoint:
        return "mismatched_endpoint", f"url {record.get('url')!r} differs from the batch's endpoint {endpoint!r}", "url"
    if not isinstance(record.get("body"), dict):
        return "invalid_request", "body must be a JSON object holding the request", "body"
    return None


def _line_error(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def batch_key(batch_id: str) -> str:
    return API_BATCH_KEY.format(batch_id=batch_id)


def load_fields(client: redis.Redis, batch_id: str) -> dict[str, str] | None:
    """Return the batch hash as text, or None when there is no such batch."""
    if not BATCH_ID_RE.fullmatch(batch_id):
        return None
    raw = client.hgetall(batch_key(batch_id))
    return {key.decode(): value.decode() for key, value in raw.items()} or None


def batch_object(fields: dict[str, str]) -> dict[str, Any]:
    """Return OpenAI's Batch object of a batch hash, shown as `cancelling` while a cancel request is pending."""
    batch = json.loads(fields["object"])
    requested_at = fields.get("cancel_requested_at")
    if requested_at and batch["status"] in CANCELLABLE_STATUSES:
        batch["status"] = "cancelling"
        batch["cancelling_at"] = int(requested_at)
    return batch


def save_object(client: redis.Redis, batch: dict[str, Any]) -> None:
    """Write the Batch object; a batch that reached a final status leaves the active set. Used by the driver."""
    with client.pipeline() as pipe:
        pipe.hset(batch_key(batch["id"]), "object", json.dumps(batch))
        if batch["status"] in FINAL_STATUSES:
            pipe.srem(API_BATCHES_ACTIVE_KEY, batch["id"])
        pipe.execute()


def _require_batch(state: ApiState, batch_id: str) -> dict[str, str]:
    files_folder(state)
    fields = load_fields(state.redis, batch_id)
    if fields is None:
        raise ApiError(404, f"no batch with id {batch_id!r}; list the batches with GET /v1/batches", code="batch_not_found", param="batch_id")
    return fields


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ApiError(
            400, f"metadata has {len(metadata)} keys; at most {MAX_METADATA_PAIRS} are allowed: remove some",
            code="invalid_metadata", param="metadata",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise ApiError(
                400, f"metadata key {key[:80]!r} or its value is too long: keys hold at most {MAX_METADATA_KEY_CHARS} "
                f"characters and values {MAX_METADATA_VALUE_CHARS}; shorten it", code="invalid_metadata", param="metadata",
            )


def new_batch(request: CreateBatch, now: float) -> dict[str, Any]:
    """Return the Batch object of a batch just created: validating, with no request counted yet."""
    created_at = int(now)
    return {
        "id": new_batch_id(), "object": "batch", "endpoint": request.endpoint, "errors": None,
        "input_file_id": request.input_file_id, "completion_window": request.completion_window, "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": created_at, "in_progress_at": None,
        "expires_at": created_at + COMPLETION_WINDOW_S[request.completion_window], "finalizing_at": None,
        "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": request.metadata,
    }


@router.post("/v1/batches", responses=error_responses(400, 401, 413, 503))
def create_batch(request: CreateBatch, state: ApiState = Depends(get_state)) -> dict[str, Any]:
    """Create a batch from an uploaded file of purpose `batch`; it is validated and run in the background."""
    _check_metadata(request.metadata)
    try:
        input_file = load_file(state, request.input_file_id)
    except ApiError as e:
        raise ApiError(400, e.message, code="invalid_input_file", param="input_file_id") from e
    if input_file["purpose"] != "batch":
        raise ApiError(
            400, f"file {request.input_file_id} has purpose {input_file['purpose']!r}; upload the input with purpose 'batch'",
            code="invalid_input_file", param="input_file_id",
        )
    batch = new_batch(request, time.time())
    with state.redis.pipeline() as pipe:
        pipe.hset(batch_key(batch["id"]), "object", json.dumps(batch))
        pipe.zadd(API_BATCHES_INDEX_KEY, {batch["id"]: time.time()})
        pipe.sadd(API_BATCHES_ACTIVE_KEY, batch["id"])
        pipe.execute()
    return batch


@router.get("/v1/batches/{batch_id}", responses=error_responses(401, 404, 503))
def retrieve_batch(batch_id: str, state: ApiState = Depends(get_state)) -> dict[str, Any]:
    return batch_object(_require_batch(state, batch_id))


@router.post("/v1/batches/{batch_id}/cancel", responses=error_responses(401, 404, 409, 503))
def cancel_batch(batch_id: str, state: ApiState = Depends(get_state)) -> dict[str, Any]:
    """Cancel a batch: its jobs stop, and it ends `cancelled` with the results finished so far. Idempotent."""
    fields = _require_batch(state, batch_id)
    status = json.loads(fields["object"])["status"]
    if status not in CANCELLABLE_STATUSES and status != "cancelled":
        raise ApiError(409, f"batch {batch_id} is {status}, so it can no longer be cancelled", code="batch_not_cancellable")
    state.redis.hsetnx(batch_key(batch_id), "cancel_requested_at", str(int(time.time())))
    return batch_object(_require_batch(state, batch_id))


@router.get("/v1/batches", responses=error_responses(400, 401, 503))
def list_batches(
    limit: int = Query(20, ge=1, le=100, description="Maximum number of batches to return"),
    after: str | None = Query(None, description="A batch id: return the batches created before it"),
    state: ApiState = Depends(get_state),
) -> dict[str, Any]:
    """List batches, newest first."""
    files_folder(state)
    ids = [value.decode() for value in state.redis.zrange(API_BATCHES_INDEX_KEY, 0, -1, desc=True)]
    if after is not None:
        ids = ids[ids.index(after) + 1:] if after in ids else []
    data: list[dict[str, Any]] = []
    for batch_id in ids[: limit + 1]:
        fields = load_fields(state.redis, batch_id)
        if fields is not None:
            data.append(batch_object(fields))
    page = data[:limit]
    return {
        "object": "list", "data": page, "has_more": len(data) > limit,
        "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
    }


def start_background(state: ApiState) -> Callable[[], None]:
    """Start the thread that drives batches; return the function that stops it. Nothing starts without
    CLIPFLEET_API_FILES_URI, since batches are disabled then."""
    if not state.settings.api_files_uri:
        return lambda: None
    from producer.api.batch_jobs import BatchDriver

    driver = BatchDriver(state)
    driver.start()
    return driver.stop
