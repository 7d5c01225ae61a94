"""Reading image bytes from moto's S3 server and from local folders, with per-image error codes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from botocore.client import BaseClient

from producer.settings import Settings
from producer.storage import Storage
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
    (tmp_path / "a.jpg").write_bytes(BODY)
    assert fetch_bytes(storage, str(tmp_path / "a.jpg"), MAX_BYTES, [], None) == BODY


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
