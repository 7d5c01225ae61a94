"""A real `clipfleet serve` process for integration tests and benchmarks, on a free loopback port."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from producer.embedded import ManagedProcess, free_port

READY_TIMEOUT_S = 60.0


class ApiServer:
    """A started `clipfleet serve`; `base_url` ends in /v1, as the openai SDK's `base_url` expects."""

    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.process.stop()


def start_api_server(log_dir: Path, redis_url: str, s3_endpoint_url: str | None = None, extra_env: dict[str, str] | None = None) -> ApiServer:
    """Start `clipfleet serve` and wait until /healthz returns 200. Raises RuntimeError with the log's end if it exits first."""
    port = free_port()
    env = dict(os.environ, CLIPFLEET_REDIS_URL=redis_url)
    if s3_endpoint_url:
        env["CLIPFLEET_S3_ENDPOINT_URL"] = s3_endpoint_url
    env.update(extra_env or {})
    name = f"api-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "producer.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = ApiServer(ManagedProcess(name, argv, log_dir / f"{name}.log", env), port)
    try:
        _wait_until(lambda: _get_status(server.url + "/healthz") == 200, server, "answer /healthz")
    except BaseException:
        server.stop()
        raise
    return server


def wait_for_model(server: ApiServer, model: str, api_key: str | None = None, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until GET /v1/models lists `model`, that is, until a ready worker serves it."""
    _wait_until(lambda: model in _model_ids(server, api_key), server, f"list model {model!r}", timeout_s)


def _model_ids(server: ApiServer, api_key: str | None) -> list[str]:
    request = urllib.request.Request(server.base_url + "/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return [item["id"] for item in json.load(response)["data"]]
    except (OSError, ValueError, KeyError):
        return []


def _get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _wait_until(condition: object, server: ApiServer, what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.process.running():
            raise RuntimeError(f"clipfleet serve exited before it could {what}:\n{server.process.log_tail()}")
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise RuntimeError(f"clipfleet serve did not {what} within {timeout_s:.0f} s:\n{server.process.log_tail()}")
