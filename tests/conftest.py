"""Shared fixtures: a real Redis server, moto's S3 server over HTTP, and a tiny CLIP checkpoint.

All servers listen on 127.0.0.1 ports picked at start-up and are stopped when the session ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import boto3
import pytest
import redis
from botocore.client import BaseClient

from producer.client import Client
from producer.settings import Settings
from tests.support.checkpoints import build_tiny_clip
from tests.support.servers import (
    AWS_TEST_ENVIRONMENT,
    AWS_VARIABLES_TO_CLEAR,
    RedisServer,
    S3Server,
)

LOOPBACK_NO_PROXY = "127.0.0.1,localhost"
# The Celery queue of the clients that `make_client` builds; `redis_url` empties it before each test.
TEST_QUEUE = "clipfleet-test"


@pytest.fixture(scope="session", autouse=True)
def aws_test_environment() -> Iterator[None]:
    """Point the AWS SDK at dummy credentials and bypass any proxy for loopback, for the whole session."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS_TEST_ENVIRONMENT.items():
            patch.setenv(name, value)
        for name in AWS_VARIABLES_TO_CLEAR:
            patch.delenv(name, raising=False)
        for name in ("NO_PROXY", "no_proxy"):
            existing = os.environ.get(name)
            patch.setenv(name, f"{existing},{LOOPBACK_NO_PROXY}" if existing else LOOPBACK_NO_PROXY)
        yield


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server process shared by the session.

    A test may stop it. The redis_url fixture starts it again on the same port.
    """
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis server's URL, with every database emptied before the test."""
    if not redis_server.is_running():
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5.0)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def s3_server(aws_test_environment: None) -> Iterator[S3Server]:
    """moto's S3 server shared by the session. Buckets persist between tests."""
    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def s3_client(s3_server: S3Server) -> BaseClient:
    """A boto3 S3 client for the session's moto server."""
    region = AWS_TEST_ENVIRONMENT["AWS_DEFAULT_REGION"]
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=region)


@pytest.fixture
def make_bucket(s3_client: BaseClient) -> Callable[[], str]:
    """A function that creates a bucket with a new unique name and returns the name.

    Names are ``b-`` followed by 12 hex digits.

    Buckets are not deleted after the test; their unique names keep tests apart.
    """

    def create_bucket() -> str:
        name = f"b-{uuid4().hex[:12]}"
        s3_client.create_bucket(Bucket=name)
        return name

    return create_bucket


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP checkpoint directory, built once per session (see tests.support.checkpoints)."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client of the test Redis, to inspect queues and job hashes."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    yield client
    client.close()


@pytest.fixture
def make_client(redis_url: str, s3_server: S3Server) -> Iterator[Callable[..., Client]]:
    """A function that builds a Client of the test Redis and S3 server, sending to TEST_QUEUE.

    Keywords go to Settings. The clients' connections are closed after the test.
    """
    clients: list[Client] = []

    def build(**settings: Any) -> Client:
        values = {"redis_url": redis_url, "s3_endpoint_url": s3_server.endpoint_url, "queue": TEST_QUEUE, **settings}
        client = Client(Settings(**values))
        clients.append(client)
        return client

    yield build
    for client in clients:
        client._celery.close()
        client.store.redis.close()
