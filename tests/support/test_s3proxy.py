"""The fault-injecting S3 proxy, driven by boto3 clients against moto's S3 server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import boto3
import pytest
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from tests.support.s3proxy import MAX_STALL_S, S3FaultProxy
from tests.support.servers import S3Server

pytestmark = pytest.mark.timeout(60)

BODY = bytes(range(256)) * 300
# A key with a space, a plus, a percent sign and non-ASCII characters, which must pass through unchanged.
AWKWARD_KEY = "dir/a b+c 100%2B café/猫.bin"


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.endpoint_url, seed=1234) as fault_proxy:
        yield fault_proxy


def client_for(endpoint_url: str, total_attempts: int = 1, read_timeout_s: float = 10.0) -> BaseClient:
    """A boto3 S3 client that sends each request at most ``total_attempts`` times, first try included."""
    config = Config(
        retries={"mode": "standard", "total_max_attempts": total_attempts},
        read_timeout=read_timeout_s,
        connect_timeout=5.0,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1", config=config)


@pytest.fixture
def bucket(make_bucket: Callable[[], str], s3_client: BaseClient) -> str:
    name = make_bucket()
    s3_client.put_object(Bucket=name, Key="plain.bin", Body=BODY)
    s3_client.put_object(Bucket=name, Key=AWKWARD_KEY, Body=BODY)
    return name


def test_passthrough_get_exact_bytes(proxy: S3FaultProxy, bucket: str) -> None:
    client = client_for(proxy.endpoint_url)
    assert client.get_object(Bucket=bucket, Key=AWKWARD_KEY)["Body"].read() == BODY


def test_passthrough_put_then_direct_read(proxy: S3FaultProxy, bucket: str, s3_client: BaseClient) -> None:
    client_for(proxy.endpoint_url).put_object(Bucket=bucket, Key="put/through proxy.bin", Body=BODY[:5000])
    assert s3_client.get_object(Bucket=bucket, Key="put/through proxy.bin")["Body"].read() == BODY[:5000]


def test_passthrough_list_and_head(proxy: S3FaultProxy, bucket: str) -> None:
    client = client_for(proxy.endpoint_url)
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == sorted([AWKWARD_KEY, "plain.bin"])
    assert client.head_object(Bucket=bucket, Key="plain.bin")["ContentLength"] == len(BODY)


def test_passthrough_missing_key_status(proxy: S3FaultProxy, bucket: str) -> None:
    with pytest.raises(ClientError) as raised:
        client_for(proxy.endpoint_url).get_object(Bucket=bucket, Key="missing.bin")
    assert raised.value.response["Error"]["Code"] == "NoSuchKey"


def test_passthrough_records_no_faults(proxy: S3FaultProxy, bucket: str) -> None:
    client_for(proxy.endpoint_url).get_object(Bucket=bucket, Key="plain.bin")["Body"].read()
    assert proxy.injected == []


def test_stall_times_out_matching_get(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("stall", method="GET", key_contains="plain", stall_s=3.0)
    client = client_for(proxy.endpoint_url, read_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        client.get_object(Bucket=bucket, Key="plain.bin")
    assert 0.5 <= time.monotonic() - started < 3.0


def test_stall_leaves_other_keys(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("stall", method="GET", key_contains="plain", stall_s=3.0)
    client = client_for(proxy.endpoint_url, read_timeout_s=0.5)
    assert client.get_object(Bucket=bucket, Key=AWKWARD_KEY)["Body"].read() == BODY


def test_stall_leaves_other_methods(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("stall", method="GET", key_contains="plain", stall_s=3.0)
    client = client_for(proxy.endpoint_url, read_timeout_s=0.5)
    assert client.head_object(Bucket=bucket, Key="plain.bin")["ContentLength"] == len(BODY)


def test_short_stall_still_responds(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("stall", method="GET", key_contains="plain", stall_s=0.3)
    client = client_for(proxy.endpoint_url, read_timeout_s=5.0)
    started = time.monotonic()
    assert client.get_object(Bucket=bucket, Key="plain.bin")["Body"].read() == BODY
    assert time.monotonic() - started >= 0.3


def test_delay_slows_matching_get(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("delay", method="GET", key_contains="plain", delay_ms=400)
    client = client_for(proxy.endpoint_url, read_timeout_s=5.0)
    started = time.monotonic()
    body = client.get_object(Bucket=bucket, Key="plain.bin")["Body"].read()
    elapsed_s = time.monotonic() - started
    assert body == BODY
    assert 0.4 <= elapsed_s < 3.0
    assert [fault.action for fault in proxy.injected] == ["delay"]


def test_delay_leaves_other_keys(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("delay", method="GET", key_contains="plain", delay_ms=2000)
    client = client_for(proxy.endpoint_url, read_timeout_s=5.0)
    started = time.monotonic()
    assert client.get_object(Bucket=bucket, Key=AWKWARD_KEY)["Body"].read() == BODY
    assert time.monotonic() - started < 2.0


def test_delay_max_hits_then_fast(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("delay", method="GET", delay_ms=1500, max_hits=1)
    client = client_for(proxy.endpoint_url, read_timeout_s=5.0)
    client.get_object(Bucket=bucket, Key="plain.bin")["Body"].read()
    started = time.monotonic()
    assert client.get_object(Bucket=bucket, Key="plain.bin")["Body"].read() == BODY
    assert time.monotonic() - started < 1.5


def test_stall_above_cap_rejected(proxy: S3FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.add_rule("stall", stall_s=MAX_STALL_S + 1)


def test_error_500_internal_error(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("error_500", method="GET", key_contains="plain")
    with pytest.raises(ClientError) as raised:
        client_for(proxy.endpoint_url).get_object(Bucket=bucket, Key="plain.bin")
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert raised.value.response["Error"]["Code"] == "InternalError"


def test_slow_down_503(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("slow_down_503", method="GET", key_contains="plain")
    with pytest.raises(ClientError) as raised:
        client_for(proxy.endpoint_url).get_object(Bucket=bucket, Key="plain.bin")
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert raised.value.response["Error"]["Code"] == "SlowDown"


def test_slow_down_on_put_keeps_connection_usable(proxy: S3FaultProxy, bucket: str) -> None:
    """The proxy reads the request body before responding, so the next request on the connection works."""
    proxy.add_rule("slow_down_503", method="PUT", max_hits=1)
    client = client_for(proxy.endpoint_url)
    with pytest.raises(ClientError):
        client.put_object(Bucket=bucket, Key="rejected.bin", Body=BODY)
    assert client.get_object(Bucket=bucket, Key="plain.bin")["Body"].read() == BODY


def test_drop_closes_connection(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("drop", method="GET", key_contains="plain")
    with pytest.raises(ConnectionClosedError):
        client_for(proxy.endpoint_url).get_object(Bucket=bucket, Key="plain.bin")


def test_max_hits_then_retry_succeeds(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("slow_down_503", method="GET", key_contains="plain", max_hits=2)
    client = client_for(proxy.endpoint_url, total_attempts=3)
    assert client.get_object(Bucket=bucket, Key="plain.bin")["Body"].read() == BODY
    assert [fault.action for fault in proxy.injected] == ["slow_down_503", "slow_down_503"]


def test_injected_records_method_and_key(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("error_500", key_contains="猫")
    with pytest.raises(ClientError):
        client_for(proxy.endpoint_url).get_object(Bucket=bucket, Key=AWKWARD_KEY)
    assert [(fault.method, fault.path) for fault in proxy.injected] == [("GET", f"/{bucket}/{AWKWARD_KEY}")]


def fault_pattern(upstream_url: str, bucket: str, seed: int, requests: int = 40) -> list[bool]:
    """Send HEAD requests through a proxy that fails half of them, and return which ones failed."""
    with S3FaultProxy(upstream_url, seed=seed) as fault_proxy:
        fault_proxy.add_rule("error_500", method="HEAD", fraction=0.5)
        client = client_for(fault_proxy.endpoint_url)
        pattern = []
        for _ in range(requests):
            try:
                client.head_object(Bucket=bucket, Key="plain.bin")
                pattern.append(False)
            except ClientError:
                pattern.append(True)
    return pattern


def test_fraction_fails_some_requests(s3_server: S3Server, bucket: str) -> None:
    failed = sum(fault_pattern(s3_server.endpoint_url, bucket, seed=7))
    # With p = 0.5 over 40 requests, 8..32 failures has probability above 0.9999, and the seed fixes the draw.
    assert 8 <= failed <= 32


def test_fraction_same_seed_same_faults(s3_server: S3Server, bucket: str) -> None:
    first = fault_pattern(s3_server.endpoint_url, bucket, seed=7)
    assert fault_pattern(s3_server.endpoint_url, bucket, seed=7) == first


def test_fraction_other_seed_other_faults(s3_server: S3Server, bucket: str) -> None:
    first = fault_pattern(s3_server.endpoint_url, bucket, seed=7)
    assert fault_pattern(s3_server.endpoint_url, bucket, seed=8) != first


def test_clear_rules_restores_passthrough(proxy: S3FaultProxy, bucket: str) -> None:
    proxy.add_rule("error_500")
    proxy.clear_rules()
    assert client_for(proxy.endpoint_url).get_object(Bucket=bucket, Key="plain.bin")["Body"].read() == BODY


def test_close_refuses_connections(s3_server: S3Server, bucket: str) -> None:
    fault_proxy = S3FaultProxy(s3_server.endpoint_url).start()
    endpoint_url = fault_proxy.endpoint_url
    fault_proxy.close()
    fault_proxy.close()
    with pytest.raises(EndpointConnectionError):
        client_for(endpoint_url).head_object(Bucket=bucket, Key="plain.bin")


def test_close_ends_stall_early(s3_server: S3Server, bucket: str) -> None:
    """A stalled request is forwarded as soon as the proxy closes, instead of after the whole stall."""
    fault_proxy = S3FaultProxy(s3_server.endpoint_url).start()
    fault_proxy.add_rule("stall", stall_s=20.0)
    client = client_for(fault_proxy.endpoint_url, read_timeout_s=10.0)
    closer = threading.Timer(0.5, fault_proxy.close)
    started = time.monotonic()
    closer.start()
    try:
        body = client.get_object(Bucket=bucket, Key="plain.bin")["Body"].read()
    finally:
        closer.join()
    assert time.monotonic() - started < 5.0
    assert body == BODY


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"action": "explode"}, "unknown fault action"),
        ({"action": "drop", "fraction": 1.5}, "fraction"),
        ({"action": "drop", "max_hits": 0}, "max_hits"),
        ({"action": "stall", "stall_s": 0.0}, "stall_s"),
        ({"action": "delay", "delay_ms": 0}, "delay_ms"),
        ({"action": "delay", "delay_ms": int(MAX_STALL_S * 1000) + 1}, "delay_ms"),
    ],
    ids=["action", "fraction", "max-hits", "zero-stall", "zero-delay", "delay-above-cap"],
)
def test_invalid_rule_rejected(proxy: S3FaultProxy, arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        proxy.add_rule(**arguments)


def test_invalid_upstream_rejected() -> None:
    with pytest.raises(ValueError, match="upstream_url"):
        S3FaultProxy("127.0.0.1:9000")
