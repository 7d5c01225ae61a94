"""The services of the end-to-end measurement: moto's S3 server in its own process, uploads, a worker, job runs.

Everything listens on 127.0.0.1. Redis and the worker come from tests/support, so run from the repository root.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from producer.embedded import free_port
from tests.support.servers import AWS_TEST_ENVIRONMENT, AWS_VARIABLES_TO_CLEAR

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
MOTO_START_TIMEOUT_S = 30.0
MOTO_STOP_TIMEOUT_S = 5.0
UPLOAD_THREADS = 8

# Runs in the child process: moto's threaded server with werkzeug's per-request log silenced. The child exits
# when its stdin closes, so it also stops when the benchmark is killed without running its cleanup.
# moto's ThreadedMotoServer (werkzeug's development server) replies to every request with "Connection: close",
# so each GET pays for a new TCP connection on both sides, where S3 and MinIO keep connections open. That
# costs about 0.5 ms of CPU per GET: 2.85 ms per 60 KB GET against 2.37 ms for the same backend served with
# keep-alive, measured on the 2-core machine of docs/benchmarks.md. The figures here include that cost.
_MOTO_SCRIPT = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address=sys.argv[1], port=int(sys.argv[2]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""



def use_test_credentials() -> None:
    """Point the AWS SDK at moto's dummy credentials and keep loopback traffic away from any proxy."""
    os.environ.update(AWS_TEST_ENVIRONMENT)
    for name in AWS_VARIABLES_TO_CLEAR:
        os.environ.pop(name, None)
    for name in ("NO_PROXY", "no_proxy"):
        existing = os.environ.get(name)
        os.environ[name] = f"{existing},127.0.0.1,localhost" if existing else "127.0.0.1,localhost"


class MotoProcess:
    """moto's S3 server in a child process, so its CPU time can be measured apart from the benchmark's."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://{LOOPBACK_HOST}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoProcess:
        """Start the child and wait until it responds to HTTP. Raises TimeoutError or RuntimeError."""
        self.process = subprocess.Popen(
            [sys.executable, "-c", _MOTO_SCRIPT, LOOPBACK_HOST, str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + MOTO_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.process.returncode} while starting on port {self.port}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json", timeout=1.0):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise TimeoutError(f"moto server on port {self.port} did not respond within {MOTO_START_TIMEOUT_S} s")

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("moto server is not started")
        return self.process.pid

    def stop(self) -> None:
        """Close the child's stdin, then terminate it, then kill it. Safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=MOTO_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=MOTO_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=MOTO_STOP_TIMEOUT_S)


def upload(s3_client: Any, bucket: str, prefix: str, photos: list[tuple[str, bytes]]) -> None:
    """Upload the photos under `prefix` with a thread pool; boto3 clients are thread-safe."""
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        futures = [pool.submit(s3_client.put_object, Bucket=bucket, Key=f"{prefix}{name}", Body=data) for name, data in photos]
        for future in futures:
            future.result()


def fetch_cpu_ms(endpoint_url: str, uris: list[str], threads: int) -> float:
    """Return the CPU milliseconds per image that this process spends reading `uris` with the worker's S3
    client (`workers.fetch.fetch_bytes` on a `producer.storage.Storage`) from `threads` threads. The S3
    server's CPU is not included: moto runs in its own process."""
    from producer.storage import Storage
    from workers.fetch import fetch_bytes

    storage = Storage(endpoint_url, threads + 4)

    def read(uri: str) -> bytes:
        return fetch_bytes(storage, uri, 2**30, [], None)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, uris[:threads]))  # open the connections
        started = time.process_time()
        list(pool.map(read, uris))
        return 1000.0 * (time.process_time() - started) / len(uris)


@dataclass
class ResourceSample:
    """CPU counters read at one moment: the machine's, and the CPU seconds of the moto and worker processes."""

    wall_s: float
    machine: Any
    moto_cpu_s: float
    worker_cpu_s: float


def sample_resources(moto_pid: int, worker_pid: int) -> ResourceSample:
    """Read the counters; `worker_cpu_s` sums the worker's main process and its pool processes."""
    moto = psutil.Process(moto_pid).cpu_times()
    worker = psutil.Process(worker_pid)
    worker_cpu_s = sum(sum(process.cpu_times()[:2]) for process in [worker, *worker.children(recursive=True)])
    return ResourceSample(time.monotonic(), psutil.cpu_times(), moto.user + moto.system, worker_cpu_s)


def cpu_shares(before: ResourceSample, after: ResourceSample, images: int) -> dict[str, float]:
    """Return the moto process's share of all cores and the machine's CPU utilisation between two samples, in %,
    and the CPU milliseconds per image of the worker and of moto."""
    wall_s = max(after.wall_s - before.wall_s, 1e-9)
    cores = psutil.cpu_count() or 1
    total = sum(after.machine) - sum(before.machine)
    idle = (after.machine.idle - before.machine.idle) + (getattr(after.machine, "iowait", 0.0) - getattr(before.machine, "iowait", 0.0))
    return {
        "moto_cpu_percent": 100.0 * (after.moto_cpu_s - before.moto_cpu_s) / wall_s / cores,
        "machine_cpu_percent": 100.0 * (total - idle) / total if total > 0 else 0.0,
        "worker_cpu_ms_per_image": 1000.0 * (after.worker_cpu_s - before.worker_cpu_s) / images,
        "moto_cpu_ms_per_image": 1000.0 * (after.moto_cpu_s - before.moto_cpu_s) / images,
    }


def peak_rss_mb(main_pid: int) -> dict[str, float]:
    """Return VmHWM (peak resident memory) in MiB of the worker's main process and of its largest child."""
    main = psutil.Process(main_pid)
    children = [_vm_hwm_mb(child.pid) for child in main.children(recursive=True)]
    return {"main_mb": _vm_hwm_mb(main_pid), "pool_mb": max(children, default=0.0)}


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    return 0.0


_STAGE = re.compile(r"\b([a-z_]+)=([0-9]+(?:\.[0-9]+)?)s\b")
_TIMESTAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_MODEL_LOAD = re.compile(r"Loaded model .* in ([0-9.]+) s")
_TOWER_DTYPE = re.compile(r"Loaded model .* image tower in ([a-z0-9]+)")


@dataclass
class StageProfile:
    """Per-stage seconds summed over the batches of one job, from the worker's `finished:` log lines."""

    batches: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def stage_profile(log_text: str, job_id: str) -> StageProfile:
    """Sum every `key=<float>s` pair on the job's `batch ... finished:` lines."""
    profile = StageProfile()
    for line in log_text.splitlines():
        if f"Job {job_id} batch" not in line or " finished: " not in line:
            continue
        profile.batches += 1
        for key, value in _STAGE.findall(line.split(" finished: ", 1)[1]):
            profile.seconds[key] = profile.seconds.get(key, 0.0) + float(value)
    return profile


def model_load_s(log_text: str) -> float | None:
    """Return the last `Loaded model ... in X s` time in the worker log, or None."""
    found = _MODEL_LOAD.findall(log_text)
    return float(found[-1]) if found else None


def image_tower_dtype(log_text: str) -> str | None:
    """Return the image tower dtype from the last `Loaded model ... image tower in DTYPE` line, or None."""
    found = _TOWER_DTYPE.findall(log_text)
    return found[-1] if found else None


def cold_prompt_s(log_text: str, job_id: str) -> float | None:
    """Return the seconds from the job's first `batch ... started` line to the next `Encoded N labels` line.

    Reads Celery's log timestamps (millisecond resolution). Returns None when either line is missing, for
    example when the labels came from the Redis prompt cache.
    """
    started_at = None
    for line in log_text.splitlines():
        stamp = _TIMESTAMP.match(line)
        if stamp is None:
            continue
        if started_at is None and f"Job {job_id} batch" in line and " started: " in line:
            started_at = _parse_stamp(stamp.group(1))
        elif started_at is not None and "Encoded " in line and " labels for prompt set " in line:
            return _parse_stamp(stamp.group(1)) - started_at
    return None


def _parse_stamp(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()
