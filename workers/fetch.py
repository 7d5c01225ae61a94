"""Reading one image's bytes from S3 or a local folder, with the size limit checked before the whole read.

Every failure that belongs to the image alone becomes an `ImageError` with a documented code, which
`workers.pipeline` writes as that image's error row instead of failing the batch. Transient S3 failures
(see `producer.storage.is_transient_s3_error`) are retried first, by the storage's `RetryPolicy`.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from producer.retry import RetryScope
from producer.storage import Storage
from producer.uris import S3Uri, is_s3_uri, parse_s3_uri, shorten, uri_scheme
from workers.images import ImageError

logger = logging.getLogger(__name__)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "InvalidObjectState"}


def fetch_bytes(
    storage: Storage,
    uri: str,
    max_bytes: int,
    allowed_buckets: list[str],
    local_root: Path | None,
    *,
    job_id: str | None = None,
    batch: int | None = None,
) -> bytes:
    """Return the bytes of the image at `uri`. Thread-safe. Raises ImageError for any per-image failure.

    An S3 read is retried on transient errors. `job_id` and `batch` name those retries in the log, and
    they are counted in the job's hash as `retries:s3_get` and `giveups:s3_get`.

    Only `s3://` URIs and, for a job with a local source (`local_root` set), local paths are read. Any other
    scheme, such as `http://` or `file://`, and a local path in a job whose source is in S3 raise
    ImageError("access_denied") before anything is opened.
    """
    if is_s3_uri(uri):
        return _fetch_s3(storage, uri, max_bytes, allowed_buckets, RetryScope("s3_get", uri, job_id, batch))
    scheme = uri_scheme(uri)
    if scheme is not None:
        raise ImageError("access_denied", f"{shorten(uri)} was not read: scheme {scheme!r} is not supported; use s3://bucket/key")
    if local_root is None:
        raise ImageError("access_denied", f"{shorten(uri)} was not read: local paths are read only in jobs with a local source")
    return _fetch_local(uri, max_bytes, local_root)


def _fetch_s3(storage: Storage, uri: str, max_bytes: int, allowed_buckets: list[str], scope: RetryScope) -> bytes:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        ReadTimeoutError,
    )
    from urllib3.exceptions import ProtocolError

    try:
        location = parse_s3_uri(uri)
    except ValueError as e:
        raise ImageError("not_found", str(e)) from e
    if allowed_buckets and location.bucket not in allowed_buckets:
        raise ImageError("access_denied", f"bucket {location.bucket!r} is not in CLIPFLEET_ALLOWED_BUCKETS")
    try:
        return storage.call_with_retry(lambda: _read_limited(storage, location, max_bytes), scope)
    except ClientError as e:
        raise _client_error(e, uri) from e
    except (ReadTimeoutError, ConnectTimeoutError) as e:
        # An object that never responds reaches this line after CLIPFLEET_S3_MAX_ATTEMPTS read timeouts
        # plus the backoff between them: 8.7 s measured with the defaults at CLIPFLEET_FETCH_TIMEOUT_S=2
        # (a stalling proxy in front of moto), where botocore's own retries took 37.6 s.
        raise ImageError("fetch_timeout", f"reading {uri} timed out: {e}") from e
    except (BotoCoreError, ProtocolError) as e:
        raise ImageError("fetch_error", f"reading {uri} failed: {e}") from e


def _read_limited(storage: Storage, location: S3Uri, max_bytes: int) -> bytes:
    response = storage.single_attempt_client.get_object(Bucket=location.bucket, Key=location.key)
    body = response["Body"]
    try:
        size = int(response.get("ContentLength", 0))
        if size > max_bytes:
            raise ImageError("too_large", _too_large(str(location), size, max_bytes))
        data = body.read(max_bytes + 1)
    finally:
        body.close()
    if len(data) > max_bytes:
        raise ImageError("too_large", _too_large(str(location), len(data), max_bytes))
    return data


def _client_error(error: Exception, uri: str) -> ImageError:
    code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
    if code in _NOT_FOUND:
        return ImageError("not_found", f"{uri} does not exist")
    if code in _DENIED:
        return ImageError("access_denied", f"reading {uri} was denied ({code})")
    return ImageError("fetch_error", f"reading {uri} failed: {error}")


def _fetch_local(uri: str, max_bytes: int, local_root: Path | None) -> bytes:
    path = Path(uri)
    if local_root is not None and not _is_inside(path, local_root):
        raise ImageError("access_denied", f"{uri} is outside the job's source folder {str(local_root)!r}")
    try:
        # O_NONBLOCK keeps a FIFO or device from blocking the open; the type check then rejects it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise ImageError("access_denied", f"{uri} is not a regular file (a folder, FIFO, device or socket)")
            if status.st_size > max_bytes:
                raise ImageError("too_large", _too_large(uri, status.st_size, max_bytes))
            data = _read_up_to(descriptor, max_bytes + 1)
        finally:
            os.close(descriptor)
    except FileNotFoundError as e:
        raise ImageError("not_found", f"{uri} does not exist") from e
    except PermissionError as e:
        raise ImageError("access_denied", f"reading {uri} was denied: {e}") from e
    except OSError as e:
        raise ImageError("fetch_error", f"reading {uri} failed: {e}") from e
    if len(data) > max_bytes:
        raise ImageError("too_large", _too_large(uri, len(data), max_bytes))
    return data


def _read_up_to(descriptor: int, limit_bytes: int) -> bytes:
    chunks = []
    remaining = limit_bytes
    while remaining > 0 and (chunk := os.read(descriptor, min(remaining, 1 << 20))):
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _is_inside(path: Path, root: Path) -> bool:
    """Return True when `path`, with symbolic links resolved, lies under `root`."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _too_large(uri: str, size: int, max_bytes: int) -> str:
    return f"{uri} has {size} bytes, above CLIPFLEET_MAX_IMAGE_BYTES={max_bytes}"
