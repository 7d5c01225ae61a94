"""Reading, writing and listing in S3 or on the local file system, behind one interface.

A `Storage` keeps one boto3 client, created on first use so that a worker process creates its own after
fork. boto3 clients are thread-safe; the connection pool is sized by `max_pool_connections`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from producer.errors import InvalidJobSpec, StorageError
from producer.uris import S3Uri, parse_location

logger = logging.getLogger(__name__)


class OutputNotWritable(StorageError, InvalidJobSpec):
    """The write probe under a job's output failed, so the job is rejected before anything is enqueued."""


class Storage:
    """Object-store access for one process. Thread-safe once the client exists."""

    def __init__(
        self,
        endpoint_url: str | None = None,
        max_pool_connections: int = 16,
        timeout_s: float = 30.0,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.max_pool_connections = max_pool_connections
        self.timeout_s = timeout_s
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            max_pool_connections=self.max_pool_connections,
            connect_timeout=self.timeout_s,
            read_timeout=self.timeout_s,
            retries={"mode": "standard", "max_attempts": 5},
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    def put_bytes(self, location: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write `data` to an S3 object or a local file, replacing what was there.

        A local file is written to a temporary file in the same folder and renamed, so readers never see a
        partial file. Raises StorageError naming the location.
        """
        target = parse_location(location)
        try:
            if isinstance(target, S3Uri):
                self.client.put_object(Bucket=target.bucket, Key=target.key, Body=data, ContentType=content_type)
            else:
                _write_atomically(target, data)
        except (OSError, *self._client_errors()) as e:
            raise StorageError(f"writing {location!r} failed: {e}") from e

    def get_bytes(self, location: str) -> bytes:
        """Read a whole S3 object or local file. Raises StorageError naming the location."""
        target = parse_location(location)
        try:
            if isinstance(target, S3Uri):
                return self.client.get_object(Bucket=target.bucket, Key=target.key)["Body"].read()
            return target.read_bytes()
        except (OSError, *self._client_errors()) as e:
            raise StorageError(f"reading {location!r} failed: {e}") from e

    def delete(self, location: str) -> None:
        """Delete an S3 object or local file; a missing one is not an error. Raises StorageError."""
        target = parse_location(location)
        try:
            if isinstance(target, S3Uri):
                self.client.delete_object(Bucket=target.bucket, Key=target.key)
            else:
                target.unlink(missing_ok=True)
        except (OSError, *self._client_errors()) as e:
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
        except self._client_errors() as e:
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
        except self._client_errors() as e:
            raise StorageError(f"listing {prefix} failed: {e}") from e

    def list_names(self, location: str) -> list[str]:
        """Return the sorted names directly under a local folder or S3 prefix (used for result shards)."""
        target = parse_location(location)
        if not isinstance(target, S3Uri):
            return sorted(entry.name for entry in target.iterdir() if entry.is_file()) if target.is_dir() else []
        prefix = target if target.key.endswith("/") or not target.key else S3Uri(target.bucket, target.key + "/")
        return sorted(key[len(prefix.key):] for key, _ in self.iter_objects(prefix) if "/" not in key[len(prefix.key):])

    @staticmethod
    def _client_errors() -> tuple[type[BaseException], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError)


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


def join_location(base: str, *names: str) -> str:
    """Join names under an S3 prefix or a local folder."""
    target = parse_location(base)
    if isinstance(target, S3Uri):
        for name in names:
            target = target.join(name)
        return str(target)
    return str(target.joinpath(*names))
