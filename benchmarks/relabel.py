#!/usr/bin/env python
"""A full run against a relabel of stored embeddings, on the same images, with real services.

Run from the repository root, because it imports the test helpers in tests/support:

    python benchmarks/relabel.py            # ViT-B/32-sized random checkpoint, 256 images, 10 labels
    python benchmarks/relabel.py --quick    # tiny checkpoint, 8 images; checks that the script works

Four jobs run in order on one worker. (1) is the source job, with --store-embeddings. (2) is a full job
with a new label set. (3) relabels (1) with another new label set of the same size, so (2) and (3) both
encode their prompts cold. (4) relabels (1) with the labels of (2), and its scores are compared with (2)'s.
The script prints a table and ends with one line `RESULT {json}` for scripts. Every service (redis-server, moto's S3
server, a Celery worker) runs as a child process on 127.0.0.1 and is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import _images, _stack  # noqa: E402
from benchmarks._options import fill_defaults, positive_int  # noqa: E402
from benchmarks._runner import (  # noqa: E402
    checkpoint_description,
    prepare_images_and_checkpoint,
    run_benchmark,
)

TEMPLATE = "a photo of a {}."
INPUT_BUCKET = "bench-input"
OUTPUT_BUCKET = "bench-output"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time a full run against a relabel of stored embeddings. See docs/benchmarks.md.")
    parser.add_argument("--quick", action="store_true", help="tiny test checkpoint, 8 images, 5 labels; checks that the script works, its speed figures mean nothing")
    parser.add_argument("--images", type=positive_int, default=None, help="number of generated JPEGs (default 256, 8 with --quick)")
    parser.add_argument("--labels", type=positive_int, default=None, help="labels per job (default 10, 5 with --quick)")
    parser.add_argument("--task-batch-size", type=positive_int, default=None, help="images per task (default 64, 4 with --quick)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="CLIPFLEET_DTYPE of the worker")
    parser.add_argument("--embeddings-dtype", default="float16", choices=["float16", "float32"], help="dtype of the stored embeddings (default float16)")
    parser.add_argument("--json", type=Path, default=None, help="also write the RESULT object to this file")
    args = parser.parse_args(argv)
    fill_defaults(args, {"images": (8, 256), "labels": (5, 10), "task_batch_size": (4, 64)})
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), run, "clipfleet-relabel-bench-")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    info, photos, checkpoint = prepare_images_and_checkpoint(args.quick, args.images, workdir)
    result: dict[str, Any] = {
        "machine": info, "quick": args.quick, "images": len(photos), "labels": args.labels,
        "task_batch_size": args.task_batch_size, "embeddings_dtype": args.embeddings_dtype,
        "checkpoint": checkpoint_description(args.quick),
    }
    result.update(measure(args, checkpoint, photos, workdir))
    return result


def measure(args: argparse.Namespace, checkpoint: Path, photos: list[tuple[str, bytes]], workdir: Path) -> dict[str, Any]:
    """Start the services and run the four jobs; return their timings, sizes and the score comparison."""
    import boto3

    from producer.client import Client
    from producer.settings import Settings
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
        client = Client(Settings(redis_url=redis_server.url, s3_endpoint_url=moto.endpoint_url, model=str(checkpoint)))
        return run_jobs(args, client, s3)


def run_jobs(args: argparse.Namespace, client: Any, s3: Any) -> dict[str, Any]:
    all_labels = _images.make_labels(3 * args.labels)
    source_labels, full_labels, relabel_labels = (all_labels[i * args.labels : (i + 1) * args.labels] for i in range(3))
    timeout_s = 300.0 if args.quick else 3600.0
    common = {"templates": [TEMPLATE], "top_k": args.labels}
    source = timed(lambda: client.submit(
        source=f"s3://{INPUT_BUCKET}/images/", labels=source_labels, output=f"s3://{OUTPUT_BUCKET}/source/",
        batch_size=args.task_batch_size, store_embeddings=True, embeddings_dtype=args.embeddings_dtype, **common,
    ), timeout_s)
    full = timed(lambda: client.submit(
        source=f"s3://{INPUT_BUCKET}/images/", labels=full_labels, output=f"s3://{OUTPUT_BUCKET}/full/",
        batch_size=args.task_batch_size, **common,
    ), timeout_s)
    relabel = timed(lambda: client.relabel(source["job"].id, relabel_labels, f"s3://{OUTPUT_BUCKET}/relabel/", **common), timeout_s)
    same = timed(lambda: client.relabel(source["job"].id, full_labels, f"s3://{OUTPUT_BUCKET}/same/", **common), timeout_s)
    result = {
        name: summary(row) for name, row in (("source", source), ("full", full), ("relabel", relabel), ("relabel_same_labels", same))
    }
    result["speedup_wall"] = full["wall_s"] / relabel["wall_s"]
    result["max_abs_score_difference"] = max_score_difference(full["job"], same["job"])
    result["stored_bytes"] = stored_bytes(s3, f"source/{source['job'].id}/")
    print_table(result)
    return result


def timed(submit: Any, timeout_s: float) -> dict[str, Any]:
    """Submit a job and wait for it; return the job, its final status and the seconds from submit to the end."""
    started = time.perf_counter()
    job = submit()
    status = job.wait(timeout_s=timeout_s, progress=False, poll_s=0.1)
    return {"job": job, "status": status, "wall_s": time.perf_counter() - started}


def summary(row: dict[str, Any]) -> dict[str, Any]:
    status = row["status"]
    job_s = (status.finished_at or math.nan) - (status.started_at or math.nan)
    return {
        "state": status.state, "succeeded": status.succeeded, "failed": status.failed, "wall_s": row["wall_s"],
        "job_s": job_s, "images_per_s": status.succeeded / row["wall_s"] if row["wall_s"] > 0 else math.nan,
    }


def max_score_difference(full: Any, relabelled: Any) -> float:
    """Return the largest absolute difference of any label's score between two jobs with the same labels."""
    expected = {row["uri"]: {item["label"]: item["score"] for item in row["top_k"]} for row in full.results()}
    differences = [
        abs(item["score"] - expected[row["uri"]][item["label"]])
        for row in relabelled.results() if row["error"] is None for item in row["top_k"]
    ]
    return max(differences) if differences else math.nan


def stored_bytes(s3: Any, prefix: str) -> dict[str, int]:
    """Return the bytes of the source job's embeddings files and of its result shards."""
    sizes = {"embeddings": 0, "shards": 0}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=OUTPUT_BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            if item["Key"].endswith(".embeddings.parquet"):
                sizes["embeddings"] += item["Size"]
            elif item["Key"].rsplit("/", 1)[-1].startswith("part-"):
                sizes["shards"] += item["Size"]
    return sizes


def print_table(result: dict[str, Any]) -> None:
    print("\n== Jobs (wall: submit to succeeded; job: first batch start to last shard)")
    for name in ("source", "full", "relabel", "relabel_same_labels"):
        row = result[name]
        print(f"  {name:<20} {row['state']:<10} {row['succeeded']:>6} ok  wall {row['wall_s']:8.2f} s  job {row['job_s']:8.2f} s  {row['images_per_s']:9.1f} images/s")
    print(f"  relabel speed-up over the full run (wall): {result['speedup_wall']:.1f}x")
    print(f"  largest score difference, relabel against full run with the same labels: {result['max_abs_score_difference']:.2e}")
    print(f"  stored: {result['stored_bytes']['embeddings']} bytes of embeddings, {result['stored_bytes']['shards']} bytes of shards")


if __name__ == "__main__":
    sys.exit(main())
