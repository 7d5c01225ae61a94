"""Reading image bytes from moto's S3 server and from local folders, with per-image error codes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
import os
from pathlib import Path

import pytest
from botocore.client import BaseClient

from producer.errors import StorageError
from producer.retry import RetryPolicy
from producer.settings import Settings
from producer.state import JobStore
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


def single_attempt_storage(endpoint_url: str, timeout_s: float = 30.0) -> Storage:
    """A Storage that sends each request once, so a fault reaches fetch_bytes without retries."""
    return Storage(endpoint_url, timeout_s=timeout_s, retry_policy=RetryPolicy(max_attempts=1))


def fast_retry_storage(endpoint_url: str, store: JobStore | None = None, timeout_s: float = 30.0) -> Storage:
    """A Storage that makes 4 attempts with short backoff, counting its retries in `store` when given."""
    return Storage(
        endpoint_url,
        timeout_s=timeout_s,
        retry_policy=RetryPolicy(max_attempts=4, base_s=0.05, max_total_s=10.0),
        count_event=store.count_event if store is not None else None,
    )


def running_job_store(redis_url: str) -> JobStore:
    """Return a job store holding a running job `job-fetch`, whose hash the retry counters go into."""
    store = JobStore.from_url(redis_url)
    store.redis.hset("clipfleet:job:job-fetch", "state", "running")
    return store


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
    storage = single_attempt_storage(proxy.endpoint_url, timeout_s=0.5)
    started = time.monotonic()
    error = fetch_error(storage, stored_key)
    assert error.code == "fetch_timeout"
    assert time.monotonic() - started < 3.0


@pytest.mark.timeout(30)
def test_s3_slow_down_is_fetch_error(proxy: S3FaultProxy, stored_key: str) -> None:
    proxy.add_rule("slow_down_503", method="GET", key_contains="faulty/")
    error = fetch_error(single_attempt_storage(proxy.endpoint_url), stored_key)
    assert error.code == "fetch_error"
    assert "SlowDown" in error.message


@pytest.mark.timeout(30)
def test_s3_internal_error_is_fetch_error(proxy: S3FaultProxy, stored_key: str) -> None:
    proxy.add_rule("error_500", method="GET", key_contains="faulty/")
    error = fetch_error(single_attempt_storage(proxy.endpoint_url), stored_key)
    assert error.code == "fetch_error"
    assert "InternalError" in error.message


@pytest.mark.timeout(30)
def test_s3_dropped_connection_is_fetch_error(proxy: S3FaultProxy, stored_key: str) -> None:
    proxy.add_rule("drop", method="GET", key_contains="faulty/")
    assert fetch_error(single_attempt_storage(proxy.endpoint_url), stored_key).code == "fetch_error"


@pytest.mark.timeout(30)
def test_s3_transient_slow_down_retried(proxy: S3FaultProxy, stored_key: str) -> None:
    """The product's own Storage retries throttling, so two 503 responses before a 200 still return the bytes."""
    proxy.add_rule("slow_down_503", method="GET", key_contains="faulty/", max_hits=2)
    storage = fast_retry_storage(proxy.endpoint_url)
    assert fetch_bytes(storage, stored_key, MAX_BYTES, [], None) == BODY
    assert len(proxy.injected) == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("action", ["error_500", "slow_down_503", "drop"])
def test_s3_fault_retried_and_counted(
    proxy: S3FaultProxy, stored_key: str, redis_url: str, action: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each kind of transient fault is retried by the helper, logged with the job id and batch, and counted."""
    store = running_job_store(redis_url)
    proxy.add_rule(action, method="GET", key_contains="faulty/", max_hits=2)
    storage = fast_retry_storage(proxy.endpoint_url, store)
    with caplog.at_level(logging.WARNING, logger="producer.retry"):
        data = fetch_bytes(storage, stored_key, MAX_BYTES, [], None, job_id="job-fetch", batch=7)
    assert data == BODY
    assert len(proxy.injected) == 2
    assert store.redis.hget("clipfleet:job:job-fetch", "retries:s3_get") == b"2"
    retry_lines = [record.getMessage() for record in caplog.records if "retrying" in record.getMessage()]
    assert len(retry_lines) == 2
    assert all("Job job-fetch batch 7" in line and stored_key in line for line in retry_lines)


@pytest.mark.timeout(30)
def test_s3_gives_up_after_max_attempts(proxy: S3FaultProxy, stored_key: str, redis_url: str) -> None:
    store = running_job_store(redis_url)
    proxy.add_rule("error_500", method="GET", key_contains="faulty/")
    error = fetch_error_for_job(fast_retry_storage(proxy.endpoint_url, store), stored_key)
    assert error.code == "fetch_error"
    assert len(proxy.injected) == 4
    assert store.redis.hget("clipfleet:job:job-fetch", "retries:s3_get") == b"3"
    assert store.redis.hget("clipfleet:job:job-fetch", "giveups:s3_get") == b"1"


@pytest.mark.timeout(30)
def test_s3_missing_key_not_retried(proxy: S3FaultProxy, bucket: str, redis_url: str) -> None:
    store = running_job_store(redis_url)
    error = fetch_error_for_job(fast_retry_storage(proxy.endpoint_url, store), f"s3://{bucket}/faulty/missing.jpg")
    assert error.code == "not_found"
    assert store.redis.hgetall("clipfleet:job:job-fetch") == {b"state": b"running"}


@pytest.mark.timeout(30)
def test_s3_stalled_get_bounded_by_attempts(proxy: S3FaultProxy, stored_key: str) -> None:
    """A GET that never returns a response fails after 4 read timeouts of 0.5 s plus short backoff, not after minutes."""
    proxy.add_rule("stall", method="GET", key_contains="faulty/", stall_s=5.0)
    storage = fast_retry_storage(proxy.endpoint_url, timeout_s=0.5)
    started = time.monotonic()
    error = fetch_error(storage, stored_key)
    elapsed_s = time.monotonic() - started
    assert error.code == "fetch_timeout"
    assert len(proxy.injected) == 4
    assert elapsed_s < 4.0


@pytest.mark.timeout(30)
def test_s3_put_retried_and_counted(proxy: S3FaultProxy, bucket: str, s3_client: BaseClient, redis_url: str) -> None:
    store = running_job_store(redis_url)
    proxy.add_rule("slow_down_503", method="PUT", key_contains="faulty/", max_hits=1)
    proxy.add_rule("drop", method="PUT", key_contains="faulty/", max_hits=1)
    storage = fast_retry_storage(proxy.endpoint_url, store)
    storage.put_bytes(f"s3://{bucket}/faulty/part-000003.jsonl", b"row\n", job_id="job-fetch", batch=3)
    assert s3_client.get_object(Bucket=bucket, Key="faulty/part-000003.jsonl")["Body"].read() == b"row\n"
    assert len(proxy.injected) == 2
    assert store.redis.hget("clipfleet:job:job-fetch", "retries:s3_put") == b"2"


@pytest.mark.timeout(30)
def test_s3_put_gives_up_as_storage_error(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("error_500", method="PUT", key_contains="faulty/")
    storage = fast_retry_storage(proxy.endpoint_url)
    with pytest.raises(StorageError, match="InternalError"):
        storage.put_bytes(f"s3://{bucket}/faulty/part-000004.jsonl", b"row\n")
    assert len(proxy.injected) == 4


def fetch_error_for_job(storage: Storage, uri: str) -> ImageError:
    with pytest.raises(ImageError) as caught:
        fetch_bytes(storage, uri, MAX_BYTES, [], None, job_id="job-fetch", batch=1)
    return caught.value


@pytest.mark.timeout(30)
def test_s3_too_large_through_proxy(proxy: S3FaultProxy, s3_client: BaseClient, bucket: str) -> None:
    """The worker closes the body after the length check, and the proxy copes with the closed connection."""
    s3_client.put_object(Bucket=bucket, Key="faulty/big.bin", Body=b"x" * 500_000)
    s3_client.put_object(Bucket=bucket, Key="faulty/small.bin", Body=BODY)
    storage = Storage(endpoint_url=proxy.endpoint_url)
    assert fetch_error(storage, f"s3://{bucket}/faulty/big.bin", max_bytes=1000).code == "too_large"
    assert fetch_bytes(storage, f"s3://{bucket}/faulty/small.bin", MAX_BYTES, [], None) == BODY


@pytest.mark.timeout(20)
def test_local_fifo_rejected(storage: Storage, root: Path) -> None:
    os.mkfifo(root / "pipe.jpg")
    error = fetch_error(storage, str(root / "pipe.jpg"), local_root=root)
    assert error.code == "access_denied"
    assert "not a regular file" in error.message


def test_local_directory_rejected(storage: Storage, root: Path) -> None:
    (root / "folder.jpg").mkdir()
    assert fetch_error(storage, str(root / "folder.jpg"), local_root=root).code == "access_denied"
