#!/usr/bin/env python
"""Bulk submission at scale: enqueue rate, peak memory and Redis memory of `clipfleet submit` with no workers.

Run from the repository root, because it imports the test helpers in tests/support:

    python benchmarks/scale.py                                # 1,000,000 URIs and 100,000 S3 keys
    python benchmarks/scale.py --formats txt,parquet,txt.gz   # the same manifest in three formats
    python benchmarks/scale.py --quick                        # 20,000 URIs and 2,000 keys, under a minute

Each submission is a `python -m producer.cli submit` child process against a private redis-server that
no worker reads, with CLIPFLEET_QUEUE_HIGH_WATER above the job's task count, so nothing pauses it. The
script ends with one line `RESULT {json}` for scripts, with the keys `manifest` (one entry per format),
`listing`, `goals` and `machine`.

Every server (redis-server, moto's S3 server on a thread of this process) listens on 127.0.0.1 and is
stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import _stack  # noqa: E402
from benchmarks._options import fill_defaults, positive_float, positive_int  # noqa: E402
from producer.constants import JOB_KEY, JOBS_INDEX_KEY, MAX_BATCH_SIZE  # noqa: E402

FORMATS = ("txt", "parquet", "txt.gz")
BUCKET = "scale-bench"
PREFIX = "images/"
QUEUE = "clipfleet-scale"
LABELS = "a,b"
GOAL_URIS_PER_S = 20_000.0
GOAL_PEAK_RSS_MB = 300.0
GOAL_URIS = 1_000_000  # the goals are stated for a manifest of this many URIs
MANIFEST_CHUNK_URIS = 100_000  # URIs generated and written at a time
BYTES_PER_MB = 1_000_000

# Runs the submit process and records its rusage from os.wait4. On Linux, exec keeps the larger of the old
# and the new peak RSS, so a child's ru_maxrss counts the resident memory of the process that spawned it.
# Spawned from this process, which has moto and pyarrow loaded, every submit would report at least this
# process's size. This launcher runs without the site module and stays under 15 MB, below any submit's peak.
# Times are epoch seconds, so that they compare with the job's `created_at`.
_LAUNCHER = """
import json, os, sys, time
started_at, started = time.time(), time.monotonic()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
ended_at, wall_s = time.time(), time.monotonic() - started
with open(sys.argv[1], "w") as file:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime, "started_at": started_at, "ended_at": ended_at,
               "wall_s": wall_s}, file)
"""



def batch_size(text: str) -> int:
    value = positive_int(text)
    if value > MAX_BATCH_SIZE:
        raise ValueError(text)
    return value



def format_list(text: str) -> list[str]:
    """Parse a comma-separated list of manifest formats, each one of FORMATS, in the given order."""
    names = [part.strip() for part in text.split(",")]
    if not names or any(name not in FORMATS for name in names) or len(set(names)) != len(names):
        raise ValueError(text)
    return names


# argparse names the expected type in its error message after "invalid ... value".
batch_size.__name__ = f"integer from 1 to {MAX_BATCH_SIZE}"
format_list.__name__ = f"comma-separated list of distinct formats from {', '.join(FORMATS)}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time `clipfleet submit` of a large manifest and of a large S3 prefix with no workers: enqueue "
        "rate, the producer's peak RSS and Redis memory per queued image. See docs/benchmarks.md.",
    )
    parser.add_argument("--quick", action="store_true", help="20,000 URIs and 2,000 keys: checks that the script works; the goals are not judged")
    parser.add_argument("--uris", type=positive_int, default=None, help="URIs in the manifest (default 1,000,000; 20,000 with --quick)")
    parser.add_argument("--keys", type=positive_int, default=None, help="keys under the listed S3 prefix (default 100,000; 2,000 with --quick)")
    parser.add_argument("--batch-size", type=batch_size, default=64, help="images per task, the submit's --batch-size (default 64)")
    parser.add_argument("--formats", type=format_list, default=["txt"], help=f"manifest formats to submit, from {', '.join(FORMATS)} (default txt)")
    parser.add_argument("--timeout-s", type=positive_float, default=None, help="limit for each submit process, in seconds (default 1800; 300 with --quick)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result JSON to this file")
    args = parser.parse_args(argv)
    defaults = {"uris": (20_000, 1_000_000), "keys": (2_000, 100_000), "timeout_s": (300.0, 1800.0)}
    fill_defaults(args, defaults)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    _stack.use_test_credentials()
    result: dict[str, Any] = {
        "quick": args.quick, "uris": args.uris, "keys": args.keys, "batch_size": args.batch_size,
        "formats": args.formats, "machine": machine_description(),
    }
    with tempfile.TemporaryDirectory(prefix="clipfleet-scale-") as folder:
        workdir = Path(folder)
        manifests = write_manifests(workdir, args.uris, args.formats)
        result["manifest"] = {name: measure_manifest(args, name, path, workdir) for name, path in manifests.items()}
        result["listing"] = measure_listing(args, workdir)
    result["goals"] = report_goals(args, result["manifest"])
    line = json.dumps(result, sort_keys=True)
    if args.json is not None:
        args.json.write_text(line + "\n")
    print("RESULT " + line)
    return 0


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def machine_description() -> dict[str, Any]:
    """Return the CPU model, core count, Python version and the repository's commit with a flag for uncommitted changes."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
        "commit": _git(["rev-parse", "--short", "HEAD"]), "uncommitted_changes": bool(_git(["status", "--porcelain"])),
    }


def _git(arguments: list[str]) -> str | None:
    try:
        completed = subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def image_uri(number: int) -> str:
    return f"s3://{BUCKET}/{PREFIX}{number:09d}.jpg"


def _uri_chunks(count: int) -> Iterator[list[str]]:
    for start in range(1, count + 1, MANIFEST_CHUNK_URIS):
        yield [image_uri(number) for number in range(start, min(start + MANIFEST_CHUNK_URIS, count + 1))]


def write_manifests(folder: Path, count: int, formats: list[str]) -> dict[str, Path]:
    """Write the manifest of `count` URIs in each format and return the paths by format name."""
    _section(f"Manifests of {count:,} URIs")
    writers = {"txt": _write_txt, "parquet": _write_parquet, "txt.gz": _write_txt_gz}
    paths = {}
    for name in formats:
        path = folder / f"manifest.{name}"
        started = time.perf_counter()
        writers[name](path, count)
        paths[name] = path
        print(f"  {path.name}: {path.stat().st_size / BYTES_PER_MB:.1f} MB, written in {time.perf_counter() - started:.1f} s")
    return paths


def _write_txt(path: Path, count: int) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for chunk in _uri_chunks(count):
            file.write("\n".join(chunk) + "\n")


def _write_txt_gz(path: Path, count: int) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as file:
        for chunk in _uri_chunks(count):
            file.write("\n".join(chunk) + "\n")


def _write_parquet(path: Path, count: int) -> None:
    """Write one string column `uri`, one row group per MANIFEST_CHUNK_URIS URIs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("uri", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in _uri_chunks(count):
            writer.write_table(pa.table({"uri": chunk}, schema=schema))


@dataclass
class SubmitRun:
    """One finished submit process: exit status, output, times in epoch seconds, and its rusage."""

    returncode: int
    stdout: str
    stderr: str
    started_at: float
    ended_at: float
    wall_s: float
    peak_rss_mb: float
    cpu_s: float


def submit_environment(redis_url: str, high_water: int, temporary: Path, s3_endpoint_url: str | None = None) -> dict[str, str]:
    """Return the submit process's environment: this one without CLIPFLEET_* variables, plus the benchmark's.

    TMPDIR points into the benchmark's folder, so temporary files of a killed submit are deleted with it.
    """
    temporary.mkdir(parents=True, exist_ok=True)
    env = {name: value for name, value in os.environ.items() if not name.startswith("CLIPFLEET_")}
    env.update(
        CLIPFLEET_REDIS_URL=redis_url, CLIPFLEET_QUEUE=QUEUE, CLIPFLEET_QUEUE_HIGH_WATER=str(high_water),
        HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TMPDIR=str(temporary),
    )
    if s3_endpoint_url is not None:
        env["CLIPFLEET_S3_ENDPOINT_URL"] = s3_endpoint_url
    return env


def run_submit(source: str, output: Path, batch_size: int, env: dict[str, str], timeout_s: float, logs: Path) -> SubmitRun:
    """Run `python -m producer.cli submit` to its end through _LAUNCHER and return its times and rusage.

    Kills the launcher's process group and raises TimeoutError after `timeout_s`, and RuntimeError when
    the launcher itself fails.
    """
    command = [sys.executable, "-m", "producer.cli", "submit", source, "--labels", LABELS, "--output", str(output), "--batch-size", str(batch_size)]
    usage_path, stdout_path, stderr_path = (logs.with_suffix(suffix) for suffix in (".usage.json", ".stdout", ".stderr"))
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        launcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(usage_path), *command],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True,
        )
        try:
            launcher.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"submit of {source} ran past {timeout_s:g} s; raise --timeout-s or lower --uris and --keys") from e
        finally:
            _kill_group(launcher)
    stderr_text = stderr_path.read_text(errors="replace")
    if launcher.returncode != 0 or not usage_path.exists():
        raise RuntimeError(f"the launcher of the submit process failed with exit status {launcher.returncode}: {_last_line(stderr_text)}")
    usage = json.loads(usage_path.read_text())
    return SubmitRun(
        returncode=usage["returncode"], stdout=stdout_path.read_text(errors="replace"), stderr=stderr_text,
        started_at=usage["started_at"], ended_at=usage["ended_at"], wall_s=usage["wall_s"],
        peak_rss_mb=usage["maxrss_kib"] * 1024 / BYTES_PER_MB, cpu_s=usage["cpu_s"],
    )


def _kill_group(launcher: subprocess.Popen[bytes]) -> None:
    """Kill the launcher's session, the submit process included, unless the launcher has ended by itself."""
    if launcher.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def queued_tasks(client: Any) -> int:
    """Return the tasks waiting in the benchmark's queue, over kombu's per-priority Redis lists."""
    names = [QUEUE] + [name.decode() for name in client.scan_iter(match=QUEUE + "\x06\x16*")]
    return sum(int(client.llen(name)) for name in names)


def job_fields(client: Any) -> tuple[str, dict[str, str]] | None:
    """Return the id and hash fields of the only job in Redis, or None when no job was created."""
    job_ids = client.zrange(JOBS_INDEX_KEY, 0, -1)
    if not job_ids:
        return None
    if len(job_ids) > 1:
        raise RuntimeError(f"expected one job in the private Redis, found {len(job_ids)}: {job_ids[:5]!r}")
    job_id = job_ids[0].decode()
    fields = client.hgetall(JOB_KEY.format(job_id=job_id))
    return job_id, {key.decode(): value.decode(errors="replace") for key, value in fields.items()}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


class SubmitRejected(Exception):
    """The submit process exited with an error before it created a job, so nothing was enqueued."""


def measure_manifest(args: argparse.Namespace, name: str, path: Path, workdir: Path) -> dict[str, Any]:
    """Submit one manifest on a private Redis. Returns its figures, or `{"skipped": reason}` for a format other
    than txt that the installed producer rejects."""
    _section(f"Manifest {path.name}: {args.uris:,} URIs, {args.batch_size} per task")
    try:
        row = submit_on_private_redis(args, str(path), args.uris, f"manifest-{name}", workdir)
    except SubmitRejected as e:
        if name == "txt":
            raise RuntimeError(f"the producer rejected the .txt manifest, which every version reads: {e}") from e
        print(f"  skipped: the installed producer rejects .{name} manifests: {e}")
        return {"skipped": str(e)}
    row.pop("benchmark_cpu_s")
    print(f"  {_describe_rate(row, 'URIs')}")
    print(f"  {_describe_redis(row)}")
    return row


def measure_listing(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Submit an S3 prefix of `args.keys` keys that the producer lists over HTTP from moto's server."""
    import boto3

    from tests.support.servers import S3Server

    _section(f"S3 listing: s3://{BUCKET}/{PREFIX} with {args.keys:,} keys on moto's server, {args.batch_size} per task")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per HTTP request otherwise
    with S3Server() as server:
        s3 = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        fill_bucket(args.keys)
        s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}{args.keys:09d}.jpg")  # checks that the HTTP server serves them
        print(f"  stored {args.keys:,} empty objects in moto's in-process backend in {time.perf_counter() - started:.1f} s "
              "(the producer lists them over HTTP)")
        row = submit_on_private_redis(args, f"s3://{BUCKET}/{PREFIX}", args.keys, "listing", workdir, server.endpoint_url)
    # moto's server runs on threads of this process, whose main thread only waits for the submit process.
    row["moto_cpu_s"] = row.pop("benchmark_cpu_s")
    print(f"  {_describe_rate(row, 'keys')}; moto's server used {row['moto_cpu_s']:.1f} s of CPU meanwhile")
    print(f"  {_describe_redis(row)}")
    return row


def fill_bucket(count: int) -> None:
    """Store `count` empty objects under PREFIX straight in moto's backend, which is much faster than HTTP PUTs.

    The backend is process-wide, so the ThreadedMotoServer of this process serves these objects.
    """
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for number in range(1, count + 1):
        backend.put_object(BUCKET, f"{PREFIX}{number:09d}.jpg", b"", disable_notification=True)


def submit_on_private_redis(
    args: argparse.Namespace, source: str, images: int, name: str, workdir: Path, s3_endpoint_url: str | None = None
) -> dict[str, Any]:
    """Run one submit against a new redis-server and return its figures.

    Raises SubmitRejected when it fails before creating a job, and RuntimeError when it fails after.
    """
    import redis

    from tests.support.servers import RedisServer

    expected_tasks = math.ceil(images / args.batch_size)
    high_water = 2 * expected_tasks + 1000  # the queue never reaches it, so backpressure never pauses the submit
    with RedisServer() as server:
        env = submit_environment(server.url, high_water, workdir / "tmp", s3_endpoint_url)
        client = redis.Redis.from_url(server.url, socket_timeout=60.0)
        try:
            memory_before = int(client.info("memory")["used_memory"])
            cpu_before = time.process_time()
            run = run_submit(source, workdir / f"output-{name}", args.batch_size, env, args.timeout_s, workdir / name)
            benchmark_cpu_s = time.process_time() - cpu_before
            job = _created_job(run, job_fields(client))
            memory_after = int(client.info("memory")["used_memory"])
            tasks = queued_tasks(client)
            first_message = client.lindex(QUEUE, -1) or b""  # kombu pushes on the left, so the first task is last
        finally:
            client.close()
    return _submission_row(run, job, images, expected_tasks, memory_after - memory_before, tasks, len(first_message), benchmark_cpu_s)


def _created_job(run: SubmitRun, job: tuple[str, dict[str, str]] | None) -> tuple[str, dict[str, str]]:
    """Return the job of a successful submit. Raises SubmitRejected or RuntimeError, see submit_on_private_redis."""
    if run.returncode == 0 and job is not None:
        return job
    if job is None:
        raise SubmitRejected(f"exit status {run.returncode}, no job created: {_last_line(run.stderr)}")
    raise RuntimeError(f"submit of job {job[0]} exited with status {run.returncode}: {_last_line(run.stderr)}")


def _submission_row(
    run: SubmitRun, job: tuple[str, dict[str, str]], images: int, expected_tasks: int, redis_bytes: int,
    tasks: int, message_bytes: int, benchmark_cpu_s: float,
) -> dict[str, Any]:
    """Collect one submission's figures. The enqueue time runs from the job's `created_at` to the submit
    process's exit, so it includes the producer's cleanup at exit and the interpreter's shutdown."""
    job_id, fields = job
    if "created_at" not in fields:
        raise RuntimeError(f"job {job_id} has no created_at field, so its enqueue time is unknown; fields: {sorted(fields)}")
    created_at = float(fields["created_at"])
    enqueue_s = run.ended_at - created_at
    return {
        "job_id": job_id, "images": images, "listed": _int_or_none(fields.get("listed")),
        "state": fields.get("state"), "wall_s": run.wall_s, "startup_s": created_at - run.started_at,
        "enqueue_s": enqueue_s, "per_s": images / enqueue_s if enqueue_s > 0 else math.nan,
        "per_s_wall": images / run.wall_s, "peak_rss_mb": run.peak_rss_mb, "cpu_s": run.cpu_s,
        "tasks": tasks, "expected_tasks": expected_tasks, "redis_used_memory_bytes": redis_bytes,
        "redis_bytes_per_image": redis_bytes / images, "redis_bytes_per_task": redis_bytes / max(tasks, 1),
        "task_message_bytes": message_bytes, "benchmark_cpu_s": benchmark_cpu_s,
        "load_average_1min": os.getloadavg()[0],
    }


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and re.fullmatch(r"-?\d+", text) else None


def _describe_rate(row: dict[str, Any], unit: str) -> str:
    return (
        f"{row['images']:,} {unit} in {row['tasks']:,} tasks (expected {row['expected_tasks']:,}), job {row['state']}: "
        f"{row['wall_s']:.1f} s wall, of which {row['startup_s']:.1f} s before the job was created "
        f"(start-up and reading the source) and {row['enqueue_s']:.1f} s from creation to exit; "
        f"{row['per_s']:,.0f} {unit}/s enqueued ({row['per_s_wall']:,.0f} over the wall time); "
        f"peak RSS {row['peak_rss_mb']:.0f} MB; {row['cpu_s']:.1f} s of CPU; machine load average {row['load_average_1min']:.1f}"
    )


def _describe_redis(row: dict[str, Any]) -> str:
    return (
        f"Redis used_memory grew by {row['redis_used_memory_bytes'] / BYTES_PER_MB:.1f} MB: "
        f"{row['redis_bytes_per_image']:.0f} bytes per image, {row['redis_bytes_per_task']:,.0f} per task "
        f"(a task message is {row['task_message_bytes']:,} bytes)"
    )


def report_goals(args: argparse.Namespace, manifests: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Print the enqueue rate and peak RSS of each manifest next to their goals. Returns the goal checks."""
    _section(f"Goals (for {GOAL_URIS:,} URIs)")
    goals = []
    for name, row in manifests.items():
        if "skipped" in row:
            continue
        goals.append(_goal(f"{name} enqueue rate, URIs/s", row["per_s"], GOAL_URIS_PER_S, True, args.uris))
        goals.append(_goal(f"{name} peak RSS, MB", row["peak_rss_mb"], GOAL_PEAK_RSS_MB, False, args.uris))
    return goals


def _goal(name: str, value: float, limit: float, at_least: bool, uris: int) -> dict[str, Any]:
    if uris < GOAL_URIS:
        verdict = f"not judged: the goals apply to {GOAL_URIS:,} URIs, this run had {uris:,}"
    elif (value >= limit) if at_least else (value <= limit):
        verdict = "PASS"
    else:
        verdict = "FAIL"
    goal_text = f"{'>=' if at_least else '<='} {limit:,.0f}"
    print(f"  {name:32s} {value:12,.1f}   goal {goal_text:10s} {verdict}")
    return {"name": name, "value": value, "goal": goal_text, "verdict": verdict}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("Interrupted. The servers that the benchmark started are stopped.", file=sys.stderr)
        sys.exit(130)
