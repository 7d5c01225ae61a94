#!/usr/bin/env python
"""Embeddings requests through `clipfleet serve` from concurrent clients, against the worker's bare image tower rate.

Run from the repository root, because it imports the test helpers in tests/support:

    python benchmarks/api.py            # ViT-B/32-sized random checkpoint, 32 clients, 512 single-image requests
    python benchmarks/api.py --quick    # tiny checkpoint, a few requests; checks that the script works

Steps, in one run on one machine:
(a) the bare image tower rate, images/s, at the worker's model batch size and dtype, in this process before any
    service starts (so nothing else shares the CPU);
(b1) one client sends single-image `embeddings.create(input="s3://...")` requests back to back, with the
    official `openai` SDK: the latency of a request that waits for no other;
(b) the load: CLIENTS threads, each with its own SDK client, do the same; it reports requests/s, the p50 and
    p99 latency, the share of the cores each process used, and the ratio b/a;
(c) for scale, the same worker's end-to-end rate on a batch job over the same images, and the ratios c/a and b/c.
Every service (redis-server, moto's S3 server, one Celery worker, the API server) runs as a child process on
127.0.0.1 and is stopped on exit. The script prints a table and ends with one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import _model, _stack  # noqa: E402
from benchmarks._options import fill_defaults, positive_int  # noqa: E402
from benchmarks._runner import (  # noqa: E402
    checkpoint_description,
    prepare_images_and_checkpoint,
    run_benchmark,
)

INPUT_BUCKET = "bench-input"
OUTPUT_BUCKET = "bench-output"
WARMUP_REQUESTS = 4
MIN_TOWER_SECONDS = 10.0
# Requests of the one-client phase, which shows the latency of a request that waits for no other.
SINGLE_CLIENT_REQUESTS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Load `clipfleet serve` with concurrent embeddings requests. See docs/benchmarks.md.")
    parser.add_argument("--quick", action="store_true", help="tiny test checkpoint and a few requests; checks that the script works, its figures mean nothing")
    parser.add_argument("--clients", type=positive_int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--requests", type=positive_int, default=None, help="requests in all, one image each (default 512, 64 with --quick)")
    parser.add_argument("--images", type=positive_int, default=None, help="distinct generated JPEGs the requests cycle through (default 256, 8 with --quick)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="CLIPFLEET_DTYPE of the worker")
    parser.add_argument("--json", type=Path, default=None, help="also write the RESULT object to this file")
    args = parser.parse_args(argv)
    fill_defaults(args, {"requests": (64, 512), "images": (8, 256)})
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), run, "clipfleet-api-bench-")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    info, photos, checkpoint = prepare_images_and_checkpoint(args.quick, args.images, workdir)
    result: dict[str, Any] = {
        "machine": info, "quick": args.quick, "clients": args.clients, "requests": args.requests, "images": len(photos),
        "checkpoint": checkpoint_description(args.quick),
    }
    result["bare"] = bare_tower_rate(args, checkpoint, photos)
    result.update(measure(args, checkpoint, photos, workdir))
    result["ratio_api_to_bare"] = result["api"]["images_per_s"] / result["bare"]["images_per_s"]
    result["ratio_job_to_bare"] = result["job"]["images_per_s"] / result["bare"]["images_per_s"]
    result["ratio_api_to_job"] = result["api"]["images_per_s"] / result["job"]["images_per_s"]
    print_table(result)
    return result


def bare_tower_rate(args: argparse.Namespace, checkpoint: Path, photos: list[tuple[str, bytes]]) -> dict[str, Any]:
    """(a): the image tower alone, at the worker's model batch size and dtype, with nothing else running."""
    from producer.settings import Settings
    from workers.model import load_model

    batch_size = Settings().model_batch_size
    loaded = load_model(str(checkpoint), dtype=args.dtype)
    pixels = _model.reference_pixels(photos, loaded.processor)
    min_seconds = 1.0 if args.quick else MIN_TOWER_SECONDS
    rate = _model.images_per_second(loaded, pixels, batch_size, min_seconds)
    dtype = str(loaded.dtype).removeprefix("torch.")
    print(f"== (a) bare image tower: {rate:.1f} images/s at batch {batch_size}, {dtype}")
    return {"images_per_s": rate, "batch_size": batch_size, "dtype": dtype}


def measure(args: argparse.Namespace, checkpoint: Path, photos: list[tuple[str, bytes]], workdir: Path) -> dict[str, Any]:
    """Start the services, run the load (b), then the batch job (c)."""
    import boto3

    from producer.client import Client
    from producer.settings import Settings
    from tests.support.api_server import start_api_server, wait_for_model
    from tests.support.servers import RedisServer
    from tests.support.worker import start_worker

    _stack.use_test_credentials()
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        moto = _stack.MotoProcess().start()
        stack.callback(moto.stop)
        s3 = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1")
        for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        _stack.upload(s3, INPUT_BUCKET, "images/", photos)
        worker = start_worker(workdir, redis_server.url, checkpoint, moto.endpoint_url, extra_env={"CLIPFLEET_DTYPE": args.dtype})
        stack.callback(worker.stop)
        server = start_api_server(workdir, redis_server.url, moto.endpoint_url)
        stack.callback(server.stop)
        wait_for_model(server, str(checkpoint))
        uris = [f"s3://{INPUT_BUCKET}/images/{name}" for name, _ in photos]
        warm_up(server.base_url, str(checkpoint), uris[:WARMUP_REQUESTS])
        single = run_load(server.base_url, str(checkpoint), uris, 1, SINGLE_CLIENT_REQUESTS, "(b1) one client")
        before = logged_calls(worker.log_path, WARMUP_REQUESTS + SINGLE_CLIENT_REQUESTS)
        pids = {
            "worker": worker.process.pid, "api_server": server.process.process.pid, "s3_moto": moto.pid,
            "redis": redis_server.pid, "clients": os.getpid(),
        }
        cpu_before, started = cpu_seconds(pids), time.monotonic()
        api = run_load(server.base_url, str(checkpoint), uris, args.clients, args.requests, f"(b) {args.clients} clients")
        api["cpu_percent_of_machine"] = cpu_percent(cpu_before, cpu_seconds(pids), time.monotonic() - started)
        calls = embed_calls(logged_calls(worker.log_path, WARMUP_REQUESTS + SINGLE_CLIENT_REQUESTS + args.requests)[len(before):])
        client = Client(Settings(redis_url=redis_server.url, s3_endpoint_url=moto.endpoint_url, model=str(checkpoint)))
        job = run_job(client, len(photos))
    return {"api_one_client": single, "api": api, "worker_embed_calls": calls, "job": job}


def warm_up(base_url: str, model: str, uris: list[str]) -> None:
    """Send one request per URI, so the first timed requests find the worker's model and connections ready."""
    from openai import OpenAI

    with OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
        for uri in uris:
            client.embeddings.create(model=model, input=uri)


def run_load(base_url: str, model: str, uris: list[str], clients: int, requests: int, name: str) -> dict[str, Any]:
    """(b): `clients` threads send `requests` single-image requests in all; return the rate and latency percentiles."""
    from openai import OpenAI

    latencies_s: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    next_request = iter(range(requests))

    def client_loop() -> None:
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                index = next(next_request, None)
            if index is None:
                return
            started = time.perf_counter()
            failure = one_request(client, model, uris[index % len(uris)])
            elapsed_s = time.perf_counter() - started
            with lock:
                if failure is None:
                    latencies_s.append(elapsed_s)
                else:
                    failures.append(failure)

    threads = [threading.Thread(target=client_loop, name=f"client-{i}") for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    return summarise_latencies(name, latencies_s, failures, wall_s)


def one_request(client: Any, model: str, uri: str) -> str | None:
    """Send one single-image request; return None when it got one embedding, else what went wrong."""
    try:
        response = client.embeddings.create(model=model, input=uri)
    except Exception as e:  # noqa: BLE001 - counted and reported, the load goes on
        return f"{type(e).__name__}: {e}"
    if len(response.data) != 1 or not len(response.data[0].embedding):
        return f"expected one embedding, got {len(response.data)}"
    return None


def summarise_latencies(name: str, latencies_s: list[float], failures: list[str], wall_s: float) -> dict[str, Any]:
    ordered = sorted(latencies_s)
    rate = len(ordered) / wall_s
    result = {
        "succeeded": len(ordered), "failed": len(failures), "first_failures": failures[:3], "wall_s": wall_s,
        "requests_per_s": rate, "images_per_s": rate,
        "p50_ms": 1000 * percentile(ordered, 50), "p99_ms": 1000 * percentile(ordered, 99),
        "mean_ms": 1000 * statistics.fmean(ordered) if ordered else float("nan"),
    }
    print(f"== {name}: {rate:.1f} requests/s, p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, {len(failures)} failed")
    return result


def percentile(ordered: list[float], q: float) -> float:
    """Return the q-th percentile of sorted values by the nearest-rank method, or NaN when there are none."""
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """Return the user plus system CPU seconds of each named process, with its children except for this process,
    whose children are the services themselves."""
    import psutil

    totals = {}
    for name, pid in pids.items():
        process = psutil.Process(pid)
        members = [process] if pid == os.getpid() else [process, *process.children(recursive=True)]
        totals[name] = sum(sum(member.cpu_times()[:2]) for member in members)
    return totals


def cpu_percent(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Return each process's share of all the machine's cores between two `cpu_seconds` readings, in %."""
    cores = os.cpu_count() or 1
    return {name: round(100.0 * (after[name] - before[name]) / wall_s / cores, 1) for name in before}


def logged_calls(log_path: Path, requests: int, timeout_s: float = 10.0) -> list[int]:
    """Return the requests answered per embed call, from the worker's INFO lines, once they add up to `requests`.

    A worker logs a call after it has sent the replies, so the last lines may come shortly after the clients returned.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        text = log_path.read_text(errors="replace")
        sizes = [int(match) for match in re.findall(r"Realtime queue \S+: replied to (\d+) requests", text)]
        if sum(sizes) >= requests or time.monotonic() > deadline:
            return sizes
        time.sleep(0.1)


def embed_calls(sizes: list[int]) -> dict[str, Any]:
    """Summarise the requests answered per embed call."""
    return {"calls": len(sizes), "mean_requests_per_call": statistics.fmean(sizes) if sizes else 0.0, "max_requests_per_call": max(sizes, default=0)}


def run_job(client: Any, images: int) -> dict[str, Any]:
    """(c): a batch job over the same images on the same worker, timed from submit to the end."""
    started = time.perf_counter()
    job = client.submit(source=f"s3://{INPUT_BUCKET}/images/", labels=["cat", "dog"], output=f"s3://{OUTPUT_BUCKET}/job/")
    status = job.wait(timeout_s=3600, progress=False, poll_s=0.1)
    wall_s = time.perf_counter() - started
    print(f"== (c) batch job: {status.state}, {images / wall_s:.1f} images/s")
    return {"state": status.state, "succeeded": status.succeeded, "wall_s": wall_s, "images_per_s": images / wall_s}


def print_table(result: dict[str, Any]) -> None:
    api, single, bare, job = result["api"], result["api_one_client"], result["bare"], result["job"]
    print("== Summary")
    print(f"  (a) bare image tower          {bare['images_per_s']:8.1f} images/s (batch {bare['batch_size']}, {bare['dtype']})")
    print(f"  (b) API, {result['clients']} clients, 1 image each {api['requests_per_s']:8.1f} requests/s  p50 {api['p50_ms']:.0f} ms  p99 {api['p99_ms']:.0f} ms")
    print(f"  (b1) API, 1 client            {single['requests_per_s']:8.1f} requests/s  p50 {single['p50_ms']:.0f} ms  p99 {single['p99_ms']:.0f} ms")
    print(f"  (c) batch job                 {job['images_per_s']:8.1f} images/s")
    print("  CPU under load, % of all cores: " + ", ".join(f"{name} {share}" for name, share in api["cpu_percent_of_machine"].items()))
    print(f"  b/a {result['ratio_api_to_bare']:.2f}   c/a {result['ratio_job_to_bare']:.2f}   b/c {result['ratio_api_to_job']:.2f}   "
          f"under load, worker embed calls {result['worker_embed_calls']['calls']}, "
          f"{result['worker_embed_calls']['mean_requests_per_call']:.1f} requests per call on average")


if __name__ == "__main__":
    sys.exit(main())
