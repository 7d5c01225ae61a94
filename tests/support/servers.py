"""Real Redis and S3 servers on free 127.0.0.1 ports, for tests.

Every wait here is bounded: starting and stopping raise TimeoutError or RuntimeError after
their timeout instead of hanging the test run. Neither class is thread-safe, so use each
instance from one thread.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis
from moto.server import ThreadedMotoServer

from producer.embedded import find_redis_server, free_port

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"

# moto accepts any credentials. Disabling the EC2 metadata lookup keeps botocore from probing
# the instance metadata address when a credential is missing.
AWS_TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
AWS_VARIABLES_TO_CLEAR = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL")


class RedisServer:
    """A redis-server child process on 127.0.0.1 with persistence off.

    Use as a context manager, or call start() and stop(). The data directory is a private
    temporary directory unless one is given, and a private one is deleted by stop().
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self._requested_port = port
        self._port: int | None = None
        self._given_data_dir = Path(data_dir) if data_dir is not None else None
        self._data_dir: Path | None = None
        self._extra_args = list(extra_args)
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK_HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        """Start the server and wait until it accepts commands on its port.

        Without a fixed port, a port that turns out to be taken is replaced by a new one, up to
        three tries. Raises RuntimeError when the process exits early and TimeoutError when it
        does not respond within startup_timeout_s.
        """
        if self.is_running():
            raise RuntimeError(f"redis-server is already running on port {self._port}")
        if self._data_dir is None:
            self._data_dir = self._given_data_dir or Path(tempfile.mkdtemp(prefix="redis-test-"))
        self._data_dir.mkdir(parents=True, exist_ok=True)

        try:
            self._launch_with_retries()
        except BaseException:
            self.stop()  # removes the private data directory, which the caller has no handle to delete
            raise
        return self

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after stop_timeout_s. Safe to call twice."""
        self._terminate_process()
        if self._given_data_dir is None and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def restart(self) -> None:
        """Stop the process and start a new one on the same port and data directory.

        With persistence off, the new server starts empty.
        """
        self._terminate_process()
        self._launch(self.port)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch_with_retries(self) -> None:
        tries = 1 if self._requested_port is not None else 3
        for attempt in range(1, tries + 1):
            port = self._requested_port or self._port or free_port()
            try:
                self._launch(port)
                return
            except RuntimeError:
                if attempt == tries:
                    raise
                logger.warning("redis-server failed to start on port %d, retrying on another port", port)
                self._port = None

    def _command(self, port: int) -> list[str]:
        return [
            find_redis_server(),
            "--port", str(port),
            "--bind", LOOPBACK_HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._data_dir),
            *self._extra_args,
        ]  # fmt: skip

    def _launch(self, port: int) -> None:
        if self._data_dir is None:
            raise RuntimeError("RedisServer data directory is missing: call start() first")
        log_path = self._data_dir / "redis-server.log"
        with open(log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self._port = port
        try:
            self._wait_until_ready(log_path)
        except BaseException:
            self._terminate_process()
            raise
        logger.info("redis-server pid %d listening on %s", self._process.pid, self.url)

    def _wait_until_ready(self, log_path: Path) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        client = redis.Redis(
            host=LOOPBACK_HOST, port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        try:
            while True:
                if self._process is not None and self._process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with code {self._process.returncode} while starting on port "
                        f"{self.port}. Its log ends with:\n{_tail(log_path)}"
                    )
                if self._answers_as_own_process(client):
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"redis-server pid {self.pid} on port {self.port} did not respond within "
                        f"{self._startup_timeout_s} s. Its log ends with:\n{_tail(log_path)}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _answers_as_own_process(self, client: redis.Redis) -> bool:
        # A reply alone could come from another server that already listens on the port while
        # this process is about to exit with "Address already in use", so compare the pids.
        try:
            return client.info("server")["process_id"] == self.pid
        except redis.exceptions.RedisError:
            return False

    def _terminate_process(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self._stop_timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning(
                "redis-server pid %d ignored SIGTERM for %s s, sending SIGKILL", process.pid, self._stop_timeout_s
            )
            process.kill()
            process.wait(timeout=self._stop_timeout_s)


class S3Server:
    """moto's S3-compatible server, in server mode on a thread of this process.

    Clients reach it over real HTTP at endpoint_url. They need AWS credentials in the
    environment, but moto accepts any values.
    """

    def __init__(self, startup_timeout_s: float = 10.0, request_timeout_s: float = 5.0) -> None:
        self._startup_timeout_s = startup_timeout_s
        self._request_timeout_s = request_timeout_s
        self._server: ThreadedMotoServer | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("S3Server has no port yet: call start() first")
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK_HOST}:{self.port}"

    def start(self) -> S3Server:
        """Start the server on a port that the kernel picks, and wait until it is listening.

        Raises TimeoutError when it is not listening within startup_timeout_s.
        """
        if self._server is not None:
            raise RuntimeError(f"S3Server is already running at {self.endpoint_url}")
        # Port 0 lets the kernel pick a free port at bind time, so there is no race with other
        # processes. ThreadedMotoServer.start() waits without a timeout, so run it on a helper
        # thread to bound the wait.
        server = ThreadedMotoServer(ip_address=LOOPBACK_HOST, port=0, verbose=False)
        starter = threading.Thread(target=server.start, name="moto-start", daemon=True)
        starter.start()
        starter.join(self._startup_timeout_s)
        if starter.is_alive():
            raise TimeoutError(f"moto server did not start within {self._startup_timeout_s} s")

        self._server = server
        self._port = server.get_host_and_port()[1]
        logger.info("moto S3 server listening on %s", self.endpoint_url)
        return self

    def reset(self) -> None:
        """Delete every bucket and object in the server (moto's reset endpoint)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=self._request_timeout_s) as response:
            response.read()

    def stop(self) -> None:
        """Stop the server and join its thread. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            # ThreadedMotoServer.stop() (moto 5.2) shuts the server loop down but leaves the
            # listening socket open until garbage collection, so close it here.
            wsgi_server = getattr(server, "_server", None)
            if wsgi_server is not None:
                wsgi_server.server_close()
            logger.info("moto S3 server on port %s stopped", self._port)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _tail(path: Path, max_bytes: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        return f"(log unreadable: {error})"
    return data[-max_bytes:].decode("utf-8", errors="replace")
