"""Reading, writing and listing in S3 or on the local file system, behind one interface.

A `Storage` keeps two boto3 clients, created on first use so that a worker process creates its own after
fork. boto3 clients are thread-safe; each connection pool is sized by `max_pool_connections`.

- `client` keeps botocore's standard retries (6 attempts) and serves listing, reads of results and deletes.
- `single_attempt_client` sends each request once. Shard writes (`put_bytes`) and the workers' image reads
  retry through `producer.retry` instead, so every retry is logged and counted in the job's hash.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from producer.errors import InvalidJobSpec, StorageError
from producer.retry import EventCounter, RetryPolicy, RetryScope, call_with_retry
from producer.uris import S3Uri, parse_location

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Attempts of a call through `Storage.client`, the first included: botocore's standard mode with 5 retries.
BOTOCORE_TOTAL_MAX_ATTEMPTS = 6
# S3 error codes and HTTP statuses that a later attempt may not see again.
TRANSIENT_S3_CODES = frozenset(
    {"500", "502", "503", "504", "SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable"}
)
TRANSIENT_HTTP_STATUSES = frozenset({500, 502, 503, 504})


class OutputNotWritable(StorageError, InvalidJobSpec):
    """The write probe under a job's output failed, so the job is rejected before anything is enqueued."""


class Storage:
    """Object-store access for one process. Thread-safe once the client exists."""

    def __init__(
        self,
        endpoint_url: str | None = None,
        max_pool_connections: int = 16,
        timeout_s: float = 30.0,
        retry_policy: RetryPolicy | None = None,
        count_event: EventCounter | None = None,
    ) -> None:
        """`retry_policy` bounds the retries of `put_bytes` and `call_with_retry`. `count_event(job_id, field)`,
        such as `JobStore.count_event`, counts them in the job's hash. Without it retries are only logged."""
        self.endpoint_url = endpoint_url
        self.max_pool_connections = max_pool_connections
        self.timeout_s = timeout_s
        self.retry_policy = retry_policy or RetryPolicy()
        self.count_event = count_event
        self._client: Any = None
        self._single_attempt_client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The boto3 S3 client with botocore's standard retries, created on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client(BOTOCORE_TOTAL_MAX_ATTEMPTS)
        return self._client

    @property
    def single_attempt_client(self) -> Any:
        """A boto3 S3 client that sends each request once, for calls retried by `call_with_retry`."""
        if self._single_attempt_client is None:
            with self._lock:
                if self._single_attempt_client is None:
                    self._single_attempt_client = self._make_client(1)
        return self._single_attempt_client

    def _make_client(self, total_max_attempts: int) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            max_pool_connections=self.max_pool_connections,
            connect_timeout=self.timeout_s,
            read_timeout=self.timeout_s,
            retries={"mode": "standard", "total_max_attempts": total_max_attempts},
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    def call_with_retry(self, call: Callable[[], T], scope: RetryScope) -> T:
        """Return `call()`, retried by this storage's policy while it raises a transient S3 error.

        `call` should use `single_attempt_client`, or botocore retries inside each attempt too. Raises the
        permanent error at once, or the last transient one once attempts or time run out.
        """
        return call_with_retry(call, self.retry_policy, scope, is_transient_s3_error, self.count_event)

    def put_bytes(
        self,
        location: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        job_id: str | None = None,
        batch: int | None = None,
    ) -> None:
        """Write `data` to an S3 object or a local file, replacing what was there.

        An S3 write is retried on transient errors (see `is_transient_s3_error`); `job_id` and `batch` name
        the retries in the log and count them in that job's hash. A local file is written to a temporary
        file in the same folder and renamed, so readers never see a partial file. Raises StorageError
        naming the location.
        """
        target = parse_location(location)
        try:
            if isinstance(target, S3Uri):
                self.call_with_retry(
                    lambda: self.single_attempt_client.put_object(
                        Bucket=target.bucket, Key=target.key, Body=data, ContentType=content_type
                    ),
                    RetryScope("s3_put", location, job_id, batch),
                )
            else:
                _write_atomically(target, data)
        except (OSError, *self.client_errors()) as e:
            raise StorageError(f"writing {location!r} failed: {e}") from e

    def get_bytes(self, location: str) -> bytes:
        """Read a whole S3 object or local file. Raises StorageError naming the location."""
        target = parse_location(location)
        try:
            if isinstance(target, S3Uri):
                return self.client.get_object(Bucket=target.bucket, Key=target.key)["Body"].read()
            return target.read_bytes()
        except (OSError, *self.client_errors()) as e:
            raise StorageError(f"reading {location!r} failed: {e}") from e

    def delete(self, location: str) -> None:
        """Delete an S3 object or local file; a missing one is not an error. Raises StorageError."""
        target = parse_location(location)
        try:
            if isinstance(target, S3Uri):
                self.client.delete_object(Bucket=target.bucket, Key=target.key)
            else:
                target.unlink(missing_ok=True)
        except (OSError, *self.client_errors()) as e:
            raise StorageError(f"deleting {location!r} failed: {e}") from e

    def check_writable(self, location: str) -> None:
        """Write and delete a small probe object under `location`, so an unwritable output fails before a job starts.

        Raises OutputNotWritable naming the location, the cause and the fix. A probe that cannot be deleted
        is only logged.
        """
        probe = join_location(location, f".clipfleet-write-check-{uuid.uuid4().hex}")
        try:
            self.put_bytes(probe, b"")
        except StorageError as e:
            if isinstance(parse_location(location), S3Uri):
                fix = "check that the bucket exists and that these AWS credentials may write to it"
            else:
                fix = "check that the path is a folder, or can be created as one, and that this user may write to it"
            raise OutputNotWritable(f"output {location!r} is not writable: {e.__cause__ or e}; {fix}") from e
        try:
            self.delete(probe)
        except StorageError as e:
            logger.warning("Could not delete the write probe %s: %s", probe, e)

    def exists(self, location: str) -> bool:
        target = parse_location(location)
        if not isinstance(target, S3Uri):
            return target.exists()
        try:
            self.client.head_object(Bucket=target.bucket, Key=target.key)
        except self.client_errors() as e:
            if _error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"checking {location!r} failed: {e}") from e
        return True

    def iter_objects(self, prefix: S3Uri) -> Iterator[tuple[str, int]]:
        """Yield `(key, size_bytes)` for every object under `prefix`, in S3's lexicographic order.

        Pages through ListObjectsV2, so prefixes of any size stream with bounded memory.
        """
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key):
                for item in page.get("Contents", []):
                    yield item["Key"], int(item["Size"])
        except self.client_errors() as e:
            raise StorageError(f"listing {prefix} failed: {e}") from e

    def iter_names(self, location: str) -> Iterator[str]:
        """Yield the names directly under a local folder or S3 prefix, unsorted, without holding them all."""
        target = parse_location(location)
        if not isinstance(target, S3Uri):
            if target.is_dir():
                with os.scandir(target) as entries:
                    yield from (entry.name for entry in entries if entry.is_file())
            return
        prefix = as_folder(target)
        for key, _ in self.iter_objects(prefix):
            name = key[len(prefix.key):]
            if "/" not in name:
                yield name

    def list_names(self, location: str) -> list[str]:
        """Return the sorted names directly under a local folder or S3 prefix (used for result shards)."""
        return sorted(self.iter_names(location))

    @staticmethod
    def client_errors() -> tuple[type[BaseException], ...]:
        """Return the exception types boto3 raises for a failed request."""
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError)


def is_transient_s3_error(error: BaseException) -> bool:
    """Return True for an S3 failure that a later attempt may not see: 5xx, throttling, timeouts, dropped connections.

    Not found, access denied and every other 4xx are permanent, and so is any exception not raised by
    botocore or urllib3 (decode errors, `too_large`).
    """
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import ProtocolError

    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return _error_code(error) in TRANSIENT_S3_CODES or status in TRANSIENT_HTTP_STATUSES
    transient = (
        ConnectionClosedError,
        EndpointConnectionError,
        ReadTimeoutError,
        ConnectTimeoutError,
        IncompleteReadError,
        ResponseStreamingError,
        ProtocolError,
    )
    return isinstance(error, transient)


def _error_code(error: BaseException) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def as_folder(prefix: S3Uri) -> S3Uri:
    """Return `prefix` ending in `/`, so listing it finds the keys inside that folder and not its siblings."""
    if prefix.key.endswith("/") or not prefix.key:
        return prefix
    return S3Uri(prefix.bucket, prefix.key + "/")


def join_location(base: str, *names: str) -> str:
    """Join names under an S3 prefix or a local folder."""
    target = parse_location(base)
    if isinstance(target, S3Uri):
        for name in names:
            target = target.join(name)
        return str(target)
    return str(target.joinpath(*names))
