"""OpenAI's Files API: uploads kept under CLIPFLEET_API_FILES_URI, their metadata in Redis.

The content of file `ID` is the object `{CLIPFLEET_API_FILES_URI}/files/ID`. Its metadata is the hash
API_FILE_KEY, and API_FILES_INDEX_KEY lists every file id scored by its creation time. Batch inputs are
uploaded here with purpose `batch`; the batch driver stores its output and error files here with purpose
`batch_output`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, StreamingResponse

from producer.api.errors import ApiError
from producer.api.schemas import error_responses
from producer.api.state import ApiState, get_state
from producer.constants import API_FILE_KEY, API_FILES_INDEX_KEY
from producer.errors import StorageError
from producer.storage import Storage, join_location
from producer.uris import S3Uri, parse_location

logger = logging.getLogger(__name__)

router = APIRouter(tags=["files"])

FILE_ID_RE = re.compile(r"file-[A-Za-z0-9]{1,64}")
UPLOAD_PURPOSES = ("batch",)
OUTPUT_PURPOSE = "batch_output"
STREAM_CHUNK_BYTES = 1024 * 1024
MAX_LIST_LIMIT = 10_000


def files_folder(state: ApiState) -> str:
    """Return CLIPFLEET_API_FILES_URI. Raises ApiError 503 when it is unset, since files then have nowhere to go."""
    folder = state.settings.api_files_uri
    if not folder:
        raise ApiError(
            503, "files and batches are disabled: set CLIPFLEET_API_FILES_URI to an s3:// prefix or a local folder "
            "that the workers can read, and restart the server", code="files_disabled",
        )
    return folder


def content_location(state: ApiState, file_id: str) -> str:
    return join_location(files_folder(state), "files", file_id)


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def file_object(fields: dict[str, str]) -> dict[str, Any]:
    """Return OpenAI's File object for the metadata hash of a file."""
    return {
        "id": fields["id"],
        "object": "file",
        "bytes": int(fields["bytes"]),
        "created_at": int(fields["created_at"]),
        "filename": fields["filename"],
        "purpose": fields["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def load_file(state: ApiState, file_id: str) -> dict[str, str]:
    """Return the metadata hash of file `file_id`. Raises ApiError 404 for an unknown id."""
    files_folder(state)
    raw = state.redis.hgetall(API_FILE_KEY.format(file_id=file_id)) if FILE_ID_RE.fullmatch(file_id) else {}
    if not raw:
        raise ApiError(404, f"no file with id {file_id!r}; list the files with GET /v1/files", code="file_not_found", param="file_id")
    return {key.decode(): value.decode() for key, value in raw.items()}


def _record_file(state: ApiState, file_id: str, size_bytes: int, filename: str, purpose: str) -> dict[str, str]:
    fields = {"id": file_id, "bytes": str(size_bytes), "created_at": str(int(time.time())), "filename": filename, "purpose": purpose}
    with state.redis.pipeline() as pipe:
        pipe.hset(API_FILE_KEY.format(file_id=file_id), mapping=fields)
        pipe.zadd(API_FILES_INDEX_KEY, {file_id: time.time()})
        pipe.execute()
    logger.info("File %s stored: %s, %d bytes, purpose %s", file_id, filename, size_bytes, purpose)
    return fields


def store_stream(state: ApiState, stream: IO[bytes], size_bytes: int, filename: str, purpose: str = OUTPUT_PURPOSE) -> dict[str, str]:
    """Store the `size_bytes` bytes of `stream` as a new file and return its metadata. Raises StorageError when the write fails."""
    file_id = new_file_id()
    _put_stream(state.storage, content_location(state, file_id), stream)
    return _record_file(state, file_id, size_bytes, filename, purpose)


def read_bytes(state: ApiState, file_id: str) -> bytes:
    """Return the whole content of file `file_id`. Raises ApiError 404 for an unknown id, StorageError on a failed read."""
    load_file(state, file_id)
    return state.storage.get_bytes(content_location(state, file_id))


def _put_stream(storage: Storage, location: str, stream: IO[bytes]) -> None:
    """Copy `stream` to an S3 object (a multipart upload when large) or to a local file, without reading it whole."""
    target = parse_location(location)
    try:
        if isinstance(target, S3Uri):
            storage.client.upload_fileobj(stream, target.bucket, target.key)
            return
        _copy_atomically(stream, target)
    except (OSError, *storage.client_errors()) as e:
        raise StorageError(f"writing {location!r} failed: {e}") from e


def _copy_atomically(stream: IO[bytes], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            shutil.copyfileobj(stream, file, STREAM_CHUNK_BYTES)
        os.chmod(temporary, 0o644)  # the workers may run as another user
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _upload_size(upload: UploadFile) -> int:
    """Return the size of the spooled upload in bytes, measured on the spooled file itself."""
    upload.file.seek(0, os.SEEK_END)
    size_bytes = upload.file.tell()
    upload.file.seek(0)
    return size_bytes


def _iter_s3(storage: Storage, target: S3Uri) -> Iterator[bytes]:
    body = storage.client.get_object(Bucket=target.bucket, Key=target.key)["Body"]
    try:
        yield from body.iter_chunks(STREAM_CHUNK_BYTES)
    finally:
        body.close()


@router.post("/v1/files", responses=error_responses(400, 401, 413, 500, 503))
def upload_file(
    file: UploadFile = File(..., description="The file; a batch input is a JSONL file of requests"),
    purpose: str = Form(..., description="What the file is for; `batch` is the only purpose accepted for uploads"),
    state: ApiState = Depends(get_state),
) -> dict[str, Any]:
    """Upload a file. Larger than CLIPFLEET_API_MAX_FILE_BYTES: 413."""
    files_folder(state)
    if purpose not in UPLOAD_PURPOSES:
        raise ApiError(400, f"purpose {purpose!r} is not supported: use {', '.join(UPLOAD_PURPOSES)}", code="invalid_purpose", param="purpose")
    size_bytes = _upload_size(file)
    limit_bytes = state.settings.api_max_file_bytes
    if size_bytes > limit_bytes:
        raise ApiError(
            413, f"file of {size_bytes} bytes is over the limit of {limit_bytes} bytes (CLIPFLEET_API_MAX_FILE_BYTES); "
            "split it into smaller files", code="file_too_large", param="file",
        )
    file_id = new_file_id()
    try:
        _put_stream(state.storage, content_location(state, file_id), file.file)
    except StorageError as e:
        logger.exception("Storing upload %s failed", file_id)
        raise ApiError(500, f"storing the file failed: {e}; retry, or check CLIPFLEET_API_FILES_URI", code="storage_error") from e
    return file_object(_record_file(state, file_id, size_bytes, file.filename or "upload", purpose))


@router.get("/v1/files", responses=error_responses(400, 401, 503))
def list_files(
    purpose: str | None = Query(None, description="Only files with this purpose"),
    limit: int = Query(10_000, ge=1, le=MAX_LIST_LIMIT, description="Maximum number of files to return"),
    order: Literal["asc", "desc"] = Query("desc", description="By creation time"),
    after: str | None = Query(None, description="A file id: return the files after it in this order"),
    state: ApiState = Depends(get_state),
) -> dict[str, Any]:
    """List files, newest first by default."""
    files_folder(state)
    ids = [value.decode() for value in state.redis.zrange(API_FILES_INDEX_KEY, 0, -1, desc=order == "desc")]
    if after is not None:
        ids = ids[ids.index(after) + 1:] if after in ids else []
    selected: list[dict[str, Any]] = []
    has_more = False
    for file_id in ids:
        raw = state.redis.hgetall(API_FILE_KEY.format(file_id=file_id))
        fields = {key.decode(): value.decode() for key, value in raw.items()}
        if not fields or (purpose is not None and fields["purpose"] != purpose):
            continue
        if len(selected) == limit:
            has_more = True
            break
        selected.append(file_object(fields))
    return {
        "object": "list", "data": selected, "has_more": has_more,
        "first_id": selected[0]["id"] if selected else None, "last_id": selected[-1]["id"] if selected else None,
    }


@router.get("/v1/files/{file_id}", responses=error_responses(401, 404, 503))
def retrieve_file(file_id: str, state: ApiState = Depends(get_state)) -> dict[str, Any]:
    return file_object(load_file(state, file_id))


@router.get("/v1/files/{file_id}/content", response_model=None, responses=error_responses(401, 404, 500, 503))
def file_content(file_id: str, state: ApiState = Depends(get_state)) -> StreamingResponse | FileResponse:
    """Stream the content of a file, in chunks of STREAM_CHUNK_BYTES."""
    fields = load_file(state, file_id)
    target = parse_location(content_location(state, file_id))
    if not isinstance(target, S3Uri):
        if not target.is_file():
            raise ApiError(500, f"the content of file {file_id} is missing from {target}", code="storage_error")
        return FileResponse(target, media_type="application/octet-stream", filename=fields["filename"])
    try:
        chunks = _iter_s3(state.storage, target)
        first = next(chunks, b"")  # fails here, before the status line is sent, when the object cannot be read
    except state.storage.client_errors() as e:
        raise ApiError(500, f"reading file {file_id} failed: {e}", code="storage_error") from e
    headers = {"Content-Length": fields["bytes"]}
    return StreamingResponse(_prepend(first, chunks), media_type="application/octet-stream", headers=headers)


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


@router.delete("/v1/files/{file_id}", responses=error_responses(401, 404, 500, 503))
def delete_file(file_id: str, state: ApiState = Depends(get_state)) -> dict[str, Any]:
    """Delete a file's content and metadata. Batches that name it as input or output can no longer read it."""
    load_file(state, file_id)
    try:
        state.storage.delete(content_location(state, file_id))
    except StorageError as e:
        raise ApiError(500, f"deleting file {file_id} failed: {e}; retry", code="storage_error") from e
    with state.redis.pipeline() as pipe:
        pipe.delete(API_FILE_KEY.format(file_id=file_id))
        pipe.zrem(API_FILES_INDEX_KEY, file_id)
        pipe.execute()
    logger.info("File %s deleted", file_id)
    return {"id": file_id, "object": "file", "deleted": True}
