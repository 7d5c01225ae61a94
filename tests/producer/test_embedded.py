"""The private Redis that `clipfleet run` starts."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import redis

from producer.embedded import ManagedProcess, start_redis


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[ManagedProcess, str]]:
    process, url = start_redis(tmp_path)
    yield process, url
    process.stop()


def test_private_redis_accepts_its_url(private_redis: tuple[ManagedProcess, str]) -> None:
    _, url = private_redis
    client = redis.Redis.from_url(url)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_private_redis_requires_password(private_redis: tuple[ManagedProcess, str]) -> None:
    _, url = private_redis
    parts = urlsplit(url)
    client = redis.Redis(host=parts.hostname, port=parts.port)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.ping()
    finally:
        client.close()


def test_password_not_on_command_line(private_redis: tuple[ManagedProcess, str]) -> None:
    process, url = private_redis
    password = urlsplit(url).password
    assert password
    assert password not in " ".join(psutil.Process(process.process.pid).cmdline())


def test_config_file_private(private_redis: tuple[ManagedProcess, str], tmp_path: Path) -> None:
    mode = stat.S_IMODE((tmp_path / "redis.conf").stat().st_mode)
    assert mode & 0o077 == 0
