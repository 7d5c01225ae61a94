"""Fixtures of the HTTP API tests: real `clipfleet serve` processes on free loopback ports, and openai SDK clients.

A server listens to the session's Redis (emptied before each test by `redis_url`) and moto's S3 server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from openai import OpenAI

from tests.support.api_server import ApiServer, start_api_server
from tests.support.servers import RedisServer, S3Server

# The key the SDK sends to a server without CLIPFLEET_API_KEYS, which accepts any key.
ANY_KEY = "unused"


@pytest.fixture
def make_openai() -> Iterator[Callable[..., OpenAI]]:
    """A function that returns an SDK client of a server; the clients are closed after the test.

    The clients never retry, so each test sees every status the server returns.
    """
    clients: list[OpenAI] = []

    def build(server: ApiServer, api_key: str = ANY_KEY, timeout_s: float = 30.0) -> OpenAI:
        client = OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture(scope="module")
def start_api(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, s3_server: S3Server
) -> Iterator[Callable[..., ApiServer]]:
    """A function that starts `clipfleet serve` with extra CLIPFLEET_* variables; the servers stop after the module."""
    log_dir = tmp_path_factory.mktemp("api-logs")
    servers: list[ApiServer] = []

    def start(**env: str) -> ApiServer:
        server = start_api_server(log_dir, redis_server.url, s3_server.endpoint_url, env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
