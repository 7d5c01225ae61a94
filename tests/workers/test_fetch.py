"""Reading image bytes from moto's S3 server and from local folders, with per-image error codes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.client import BaseClient
from botocore.config import Config

from producer.settings import Settings
from producer.storage import Storage
from tests.support.s3proxy import S3FaultProxy
from tests.support.servers import S3Server
from workers.fetch import fetch_bytes
from workers.images import ImageError
from workers.runtime import WorkerRuntime

MAX_BYTES = 1_000_000
# A key with a space, a plus, a percent sign and non-ASCII characters, which must reach S3 unchanged.
AWKWARD_KEY = "photos/a b+c 100%2B café/猫 1%.jpg"
BODY = bytes(range(256)) * 4


@pytest.fixture
def storage(s3_server: S3Server) -> Storage:
    return Storage(endpoint_url=s3_server.endpoint_url)


@pytest.fixture
def bucket(make_bucket: Callable[[], str]) -> str:
    return make_bucket()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


def fetch_error(storage: Storage, uri: str, max_bytes: int = MAX_BYTES, allowed: list[str] | None = None, local_root: Path | None = None) -> ImageError:
    with pytest.raises(ImageError) as caught:
        fetch_bytes(storage, uri, max_bytes, allowed or [], local_root)
    return caught.value


def test_s3_returns_exact_bytes(storage: Storage, s3_client: BaseClient, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key=AWKWARD_KEY, Body=BODY)
    assert fetch_bytes(storage, f"s3://{bucket}/{AWKWARD_KEY}", MAX_BYTES, [], None) == BODY


def test_s3_allowed_bucket_read(storage: Storage, s3_client: BaseClient, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=BODY)
    assert fetch_bytes(storage, f"s3://{bucket}/a.jpg", MAX_BYTES, [bucket], None) == BODY


def test_s3_missing_key(storage: Storage, bucket: str) -> None:
    assert fetch_error(storage, f"s3://{bucket}/missing.jpg").code == "not_found"


def test_s3_missing_key_similar_to_existing(storage: Storage, s3_client: BaseClient, bucket: str) -> None:
    """A key that differs only by URL-decoding (`%2B` versus `+`) is a different object."""
    s3_client.put_object(Bucket=bucket, Key="x%2By.jpg", Body=BODY)
    assert fetch_error(storage, f"s3://{bucket}/x+y.jpg").code == "not_found"


def test_s3_missing_bucket(storage: Storage, bucket: str) -> None:
    assert fetch_error(storage, f"s3://{bucket}-absent/a.jpg").code == "not_found"


def test_s3_invalid_bucket_name(storage: Storage) -> None:
    assert fetch_error(storage, "s3://Not_A_Bucket/a.jpg").code == "not_found"


def test_s3_size_at_limit_read(storage: Storage, s3_client: BaseClient, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="exact.bin", Body=b"x" * 1000)
    assert len(fetch_bytes(storage, f"s3://{bucket}/exact.bin", 1000, [], None)) == 1000


def test_s3_one_byte_over_limit(storage: Storage, s3_client: BaseClient, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="big.bin", Body=b"x" * 1000)
    assert fetch_error(storage, f"s3://{bucket}/big.bin", max_bytes=999).code == "too_large"


def test_s3_size_checked_from_length(storage: Storage, s3_client: BaseClient, bucket: str) -> None:
    """The reported size is the object's Content-Length, not the max_bytes + 1 bytes a read would stop at."""
    s3_client.put_object(Bucket=bucket, Key="big.bin", Body=b"x" * 5000)
    error = fetch_error(storage, f"s3://{bucket}/big.bin", max_bytes=999)
    assert "5000 bytes" in error.message


def test_s3_bucket_not_allowed(s3_server: S3Server, s3_client: BaseClient, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=BODY)
    fresh = Storage(endpoint_url=s3_server.endpoint_url)
    error = fetch_error(fresh, f"s3://{bucket}/a.jpg", allowed=["some-other-bucket"])
    assert error.code == "access_denied"
    assert fresh._client is None, "no S3 client should have been created, so no request was sent"


def test_local_file_inside_root(storage: Storage, root: Path) -> None:
    (root / "a.jpg").write_bytes(BODY)
    assert fetch_bytes(storage, str(root / "a.jpg"), MAX_BYTES, [], root) == BODY


def test_local_file_without_root(storage: Storage, tmp_path: Path) -> None:
    """A job whose source is in S3 has no local root, so a local path in its message is not opened."""
    (tmp_path / "a.jpg").write_bytes(BODY)
    assert fetch_error(storage, str(tmp_path / "a.jpg"), local_root=None).code == "access_denied"


def test_local_dotdot_outside_root(storage: Storage, root: Path) -> None:
    (root.parent / "secret.jpg").write_bytes(BODY)
    error = fetch_error(storage, str(root / ".." / "secret.jpg"), local_root=root)
    assert error.code == "access_denied"


def test_local_sibling_with_root_prefix(storage: Storage, root: Path) -> None:
    """A folder whose name starts with the root's name (`root-other`) is outside the root."""
    sibling = root.parent / f"{root.name}-other"
    sibling.mkdir()
    (sibling / "a.jpg").write_bytes(BODY)
    assert fetch_error(storage, str(sibling / "a.jpg"), local_root=root).code == "access_denied"


def test_local_symlink_outside_root(storage: Storage, root: Path) -> None:
    (root.parent / "secret.jpg").write_bytes(BODY)
    (root / "link.jpg").symlink_to(root.parent / "secret.jpg")
    assert fetch_error(storage, str(root / "link.jpg"), local_root=root).code == "access_denied"


def test_local_symlink_inside_root(storage: Storage, root: Path) -> None:
    (root / "real.jpg").write_bytes(BODY)
    (root / "link.jpg").symlink_to(root / "real.jpg")
    assert fetch_bytes(storage, str(root / "link.jpg"), MAX_BYTES, [], root) == BODY


def test_local_missing(storage: Storage, root: Path) -> None:
    assert fetch_error(storage, str(root / "missing.jpg"), local_root=root).code == "not_found"


def test_local_too_large(storage: Storage, root: Path) -> None:
    (root / "big.bin").write_bytes(b"x" * 1000)
    assert fetch_error(storage, str(root / "big.bin"), max_bytes=999, local_root=root).code == "too_large"


def test_local_size_at_limit_read(storage: Storage, root: Path) -> None:
    (root / "exact.bin").write_bytes(b"x" * 1000)
    assert len(fetch_bytes(storage, str(root / "exact.bin"), 1000, [], root)) == 1000


@pytest.fixture
def runtime(redis_url: str) -> Iterator[WorkerRuntime]:
    worker_runtime = WorkerRuntime(Settings(redis_url=redis_url, fetch_threads=8))
    yield worker_runtime
    worker_runtime.pool.shutdown()
    worker_runtime.store.redis.close()


def test_runtime_s3_pool_covers_fetch_threads(runtime: WorkerRuntime) -> None:
    assert runtime.storage.client.meta.config.max_pool_connections >= 8


def test_runtime_fetch_threads(runtime: WorkerRuntime) -> None:
    assert runtime.pool._max_workers == 8


# --- faults injected between the worker and S3 -------------------------------------------------


class SingleAttemptStorage(Storage):
    """A Storage whose client sends each request once, so a fault reaches fetch_bytes without retries."""

    def _make_client(self) -> Any:
        config = Config(
            max_pool_connections=self.max_pool_connections,
            connect_timeout=self.timeout_s,
            read_timeout=self.timeout_s,
            retries={"mode": "standard", "total_max_attempts": 1},
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.endpoint_url, seed=3) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def stored_key(s3_client: BaseClient, bucket: str) -> str:
    s3_client.put_object(Bucket=bucket, Key="faulty/a.jpg", Body=BODY)
    return f"s3://{bucket}/faulty/a.jpg"


@pytest.mark.timeout(30)
def test_s3_stalled_get_is_fetch_timeout(proxy: S3FaultProxy, stored_key: str) -> None:
    proxy.add_rule("stall", method="GET", key_contains="faulty/", stall_s=3.0)
    storage = SingleAttemptStorage(proxy.endpoint_url, timeout_s=0.5)
    started = time.monotonic()
    error = fetch_error(storage, stored_key)
    assert error.code == "fetch_timeout"
    assert time.monotonic() - started < 3.0


@pytest.mark.timeout(30)
def test_s3_slow_down_is_fetch_error(proxy: S3FaultProxy, stored_key: str) -> None:
    proxy.add_rule("slow_down_503", method="GET", key_contains="faulty/")
    error = fetch_error(SingleAttemptStorage(proxy.endpoint_url), stored_key)
    assert error.code == "fetch_error"
    assert "SlowDown" in error.message


@pytest.mark.timeout(30)
def test_s3_internal_error_is_fetch_error(proxy: S3FaultProxy, stored_key: str) -> None:
    proxy.add_rule("error_500", method="GET", key_contains="faulty/")
    error = fetch_error(SingleAttemptStorage(proxy.endpoint_url), stored_key)
    assert error.code == "fetch_error"
    assert "InternalError" in error.message


@pytest.mark.timeout(30)
def test_s3_dropped_connection_is_fetch_error(proxy: S3FaultProxy, stored_key: str) -> None:
    proxy.add_rule("drop", method="GET", key_contains="faulty/")
    assert fetch_error(SingleAttemptStorage(proxy.endpoint_url), stored_key).code == "fetch_error"


@pytest.mark.timeout(30)
def test_s3_transient_slow_down_retried(proxy: S3FaultProxy, stored_key: str) -> None:
    """The product's own Storage retries throttling, so two 503 responses before a 200 still return the bytes."""
    proxy.add_rule("slow_down_503", method="GET", key_contains="faulty/", max_hits=2)
    storage = Storage(endpoint_url=proxy.endpoint_url)
    assert fetch_bytes(storage, stored_key, MAX_BYTES, [], None) == BODY
    assert len(proxy.injected) == 2


@pytest.mark.timeout(30)
def test_s3_too_large_through_proxy(proxy: S3FaultProxy, s3_client: BaseClient, bucket: str) -> None:
    """The worker closes the body after the length check, and the proxy copes with the closed connection."""
    s3_client.put_object(Bucket=bucket, Key="faulty/big.bin", Body=b"x" * 500_000)
    s3_client.put_object(Bucket=bucket, Key="faulty/small.bin", Body=BODY)
    storage = Storage(endpoint_url=proxy.endpoint_url)
    assert fetch_error(storage, f"s3://{bucket}/faulty/big.bin", max_bytes=1000).code == "too_large"
    assert fetch_bytes(storage, f"s3://{bucket}/faulty/small.bin", MAX_BYTES, [], None) == BODY
