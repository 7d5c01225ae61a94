"""Reading one image's bytes from S3 or a local folder, with the size limit checked before the whole read.

Every failure that belongs to the image alone becomes an `ImageError` with a documented code, which
`workers.pipeline` writes as that image's error row instead of failing the batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
) -> bytes:
    """Return the bytes of the image at `uri`. Thread-safe. Raises ImageError for any per-image failure.

    Only `s3://` URIs and, for a job with a local source (`local_root` set), local paths are read. Any other
    scheme, such as `http://` or `file://`, and a local path in a job whose source is in S3 raise
    ImageError("access_denied") before anything is opened.
    """
    if is_s3_uri(uri):
        return _fetch_s3(storage, uri, max_bytes, allowed_buckets)
    scheme = uri_scheme(uri)
    if scheme is not None:
        raise ImageError("access_denied", f"{shorten(uri)} was not read: scheme {scheme!r} is not supported; use s3://bucket/key")
    if local_root is None:
        raise ImageError("access_denied", f"{shorten(uri)} was not read: local paths are read only in jobs with a local source")
    return _fetch_local(uri, max_bytes, local_root)


def _fetch_s3(storage: Storage, uri: str, max_bytes: int, allowed_buckets: list[str]) -> bytes:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        ReadTimeoutError,
    )

    try:
        location = parse_s3_uri(uri)
    except ValueError as e:
        raise ImageError("not_found", str(e)) from e
    if allowed_buckets and location.bucket not in allowed_buckets:
        raise ImageError("access_denied", f"bucket {location.bucket!r} is not in CLIPFLEET_ALLOWED_BUCKETS")
    try:
        return _read_limited(storage, location, max_bytes)
    except ClientError as e:
        raise _client_error(e, uri) from e
    except (ReadTimeoutError, ConnectTimeoutError) as e:
        # NOTE: botocore retries a timed-out GET, and Storage allows 6 attempts with up to 31 s of
        # backoff in total, so an object that never responds takes up to about 6 x
        # CLIPFLEET_FETCH_TIMEOUT_S + 31 s to reach this line (37.6 s measured at a 2 s timeout).
        raise ImageError("fetch_timeout", f"reading {uri} timed out: {e}") from e
    except BotoCoreError as e:
        raise ImageError("fetch_error", f"reading {uri} failed: {e}") from e


def _read_limited(storage: Storage, location: S3Uri, max_bytes: int) -> bytes:
    response = storage.client.get_object(Bucket=location.bucket, Key=location.key)
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
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError("too_large", _too_large(uri, size, max_bytes))
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
    except FileNotFoundError as e:
        raise ImageError("not_found", f"{uri} does not exist") from e
    except PermissionError as e:
        raise ImageError("access_denied", f"reading {uri} was denied: {e}") from e
    except OSError as e:
        raise ImageError("fetch_error", f"reading {uri} failed: {e}") from e
    if len(data) > max_bytes:
        raise ImageError("too_large", _too_large(uri, len(data), max_bytes))
    return data


def _is_inside(path: Path, root: Path) -> bool:
    """Return True when `path`, with symbolic links resolved, lies under `root`."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _too_large(uri: str, size: int, max_bytes: int) -> str:
    return f"{uri} has {size} bytes, above CLIPFLEET_MAX_IMAGE_BYTES={max_bytes}"
