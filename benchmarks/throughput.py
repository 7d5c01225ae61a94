#!/usr/bin/env python
"""Side-by-side CPU throughput: the bare image tower, clipfleet end to end, and transformers' pipeline.

Run from the repository root, because it imports the test helpers in tests/support:

    python benchmarks/throughput.py            # full run: ViT-B/32-sized random checkpoint, 512 images
    python benchmarks/throughput.py --quick    # tiny checkpoint, 8 images, small label sets

It prints a table and ends with one line `RESULT {json}` for scripts, with the keys `a` (bare image tower,
images/s), `b` and `c` (clipfleet and the pipeline, per label count), `ratios`, `goals`, `precision`, `decode`
and `machine`. The figures vary from run to run on machines shared with other work.

Every service (redis-server, moto's S3 server, a Celery worker) runs as a child process on 127.0.0.1 and is
stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import _images, _model, _stack  # noqa: E402
from benchmarks._options import fill_defaults, positive_float, positive_int  # noqa: E402
from benchmarks._runner import checkpoint_description, run_benchmark  # noqa: E402
from workers.model import usable_cpus  # noqa: E402

TEMPLATE = "a photo of a {}."
DEFAULT_MODEL_BATCH_SIZE = 32
PIPELINE_SWEEP_BATCH_SIZES = (1, 8, 32)
PIPELINE_SWEEP_IMAGES = 32
# With more labels than this the pipeline encodes every label for every image, so it runs on a small subset.
PIPELINE_MANY_LABELS = 100
WARMUP_JOB_IMAGES = 16
IN_PROCESS_IMAGES = 64  # images of the forward-rate, precision and decode measurements
# Stages that the worker times in its fetch threads; the others are timed on the task thread.
FETCH_THREAD_STAGES = ("fetch", "decode", "preprocess")
INPUT_BUCKET = "bench-input"
OUTPUT_BUCKET = "bench-output"
GOAL_B_OVER_A = 0.85
GOALS_B_OVER_C = {10: 2.0, 1000: 100.0}




def positive_int_list(text: str) -> list[int]:
    """Parse a comma-separated list of positive integers, such as 10,1000."""
    return [positive_int(part) for part in text.split(",")]


# argparse names the expected type in its error message after "invalid ... value".
positive_int_list.__name__ = "comma-separated list of positive integers"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Side-by-side throughput of (a) the bare image tower, (b) clipfleet end to end on a real worker, "
        "and (c) transformers' zero-shot pipeline, on the same generated JPEGs. See docs/benchmarks.md.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny test checkpoint, 8 images, labels 10,50, short timings; checks that the script works, its speed figures mean nothing")
    parser.add_argument("--images", type=positive_int, default=None, help="number of generated JPEGs (default 512, 8 with --quick)")
    parser.add_argument("--labels", type=positive_int_list, default=None, help="comma-separated label counts (default 10,1000; 10,50 with --quick)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="CLIPFLEET_DEVICE of the worker, (a) and (c)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="CLIPFLEET_DTYPE of the worker and of measurement (a)")
    parser.add_argument("--batch-sizes", type=positive_int_list, default=None, help="comma-separated model batch sizes for (a); default: the worker's model batch size")
    parser.add_argument("--task-batch-size", type=positive_int, default=None, help="images per task of the jobs (default: the product default, 64)")
    parser.add_argument("--worker-processes", type=positive_int, default=1, help="pool processes of the worker (clipfleet worker --concurrency), default 1; on a GPU several share it")
    parser.add_argument("--skip-pipeline", action="store_true", help="skip measurement (c), transformers' pipeline")
    parser.add_argument("--pipeline-seconds", type=positive_float, default=None, help="time budget of the pipeline's main timing per label set, in seconds (default 60, 5 with --quick)")
    parser.add_argument("--pipeline-images-1000", type=positive_int, default=None, help=f"images for the pipeline when a job has more than {PIPELINE_MANY_LABELS} labels (default 8, 2 with --quick)")
    parser.add_argument("--seconds", type=positive_float, default=None, help="minimum timed seconds per forward-rate measurement (default 5, 1 with --quick)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result JSON to this file")
    args = parser.parse_args(argv)
    defaults = {
        "images": (8, 512), "labels": ([10, 50], [10, 1000]), "pipeline_seconds": (5.0, 60.0),
        "pipeline_images_1000": (2, 8), "seconds": (1.0, 5.0),
    }
    fill_defaults(args, defaults)
    return args


def model_batch_size() -> int:
    from producer.settings import Settings

    return int(getattr(Settings(), "model_batch_size", DEFAULT_MODEL_BATCH_SIZE))


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), run, "clipfleet-bench-")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    info = _images.machine_info()
    _section("Machine")
    for key, value in info.items():
        print(f"  {key}: {value}")
    result: dict[str, Any] = {"machine": info, "quick": args.quick, "labels": args.labels, "template": TEMPLATE}

    _section("Setup")
    started = time.perf_counter()
    photos = _images.generate_photos(args.images)
    print(f"  images: {_images.describe_photos(photos)} (generated in {time.perf_counter() - started:.1f} s)")
    image_dir = workdir / "images"
    image_dir.mkdir()
    for name, data in photos:
        (image_dir / name).write_bytes(data)
    checkpoint = _build_checkpoint(args, workdir / "checkpoint")
    result["images"] = len(photos)
    result["checkpoint"] = checkpoint_description(args.quick)

    models = load_models(args, checkpoint, photos)
    result["a"], result["precision"], result["decode"] = measure_in_process(args, models, photos)
    result["b"] = measure_end_to_end(args, checkpoint, photos, workdir, models)
    del models
    gc.collect()
    if not args.skip_pipeline:
        paths = [str(image_dir / name) for name, _ in photos]
        result["c"] = measure_pipeline(args, checkpoint, paths)
    result["ratios"], result["goals"] = report_ratios(result)
    return result


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _build_checkpoint(args: argparse.Namespace, directory: Path) -> Path:
    started = time.perf_counter()
    if args.quick:
        from tests.support.checkpoints import build_tiny_clip

        build_tiny_clip(directory)
    else:
        _model.build_vit_b32(directory)
    size_mb = sum(file.stat().st_size for file in directory.iterdir()) / 2**20
    print(f"  checkpoint: {'tiny test CLIP' if args.quick else 'ViT-B/32 size, random weights'}, {size_mb:.0f} MiB, built in {time.perf_counter() - started:.1f} s")
    return directory


@dataclass
class InProcessModels:
    """The checkpoint loaded in float32 and in the worker's dtype, with normalised pixels of some benchmark images."""

    fp32: Any
    worker: Any
    pixels: Any


def load_models(args: argparse.Namespace, checkpoint: Path, photos: list[tuple[str, bytes]]) -> InProcessModels:
    from workers.model import load_model

    fp32 = load_model(str(checkpoint), None, args.device, "float32")
    worker = load_model(str(checkpoint), None, args.device, args.dtype)
    return InProcessModels(fp32, worker, _model.reference_pixels(photos[:IN_PROCESS_IMAGES], fp32.processor))


def measure_in_process(args: argparse.Namespace, models: InProcessModels, photos: list[tuple[str, bytes]]) -> tuple[dict, dict, dict]:
    """Measure (a), precision and decode in this process. Returns their three result dicts."""
    a = measure_forward_rates(args, models.fp32, models.worker, models.pixels)
    precision = measure_precision(args, models.fp32, models.worker, models.pixels, a)
    decode = measure_decode(photos[:IN_PROCESS_IMAGES], models.fp32.processor)
    return a, precision, decode


def bracket_rate(args: argparse.Namespace, models: InProcessModels) -> float:
    """Return (a) at the worker's model batch size, the faster of float32 and the worker's dtype, timed right
    before or after a job so that both see the same machine load. Uses the mean rate, as the job's rate is a mean."""
    batch_size = model_batch_size()
    rates = [_model.images_per_second(models.fp32, models.pixels, batch_size, args.seconds / 2, statistic="mean")]
    if models.worker.dtype != models.fp32.dtype:
        rates.append(_model.images_per_second(models.worker, models.pixels, batch_size, args.seconds, statistic="mean"))
    return max(rates)


def one_thread_rate(args: argparse.Namespace, models: InProcessModels) -> float | None:
    """Return the worker dtype's mean rate on one torch thread at the worker's model batch size, on the CPU only.

    One thread costs the least CPU per image: with more threads, each forward pass also spends CPU on threads
    that wait for one another. None on a GPU, where the tower does not run on the CPU."""
    if models.worker.device.type != "cpu":
        return None
    with _model.torch_threads(1):
        return _model.images_per_second(models.worker, models.pixels, model_batch_size(), args.seconds / 2, statistic="mean")


def measure_forward_rates(args: argparse.Namespace, fp32: Any, worker: Any, pixels: Any) -> dict[str, Any]:
    """Measure (a): images/s of the bare image tower in float32 and the worker's dtype, per batch size."""
    import torch

    worker_dtype = str(worker.dtype).removeprefix("torch.")
    batch_size = model_batch_size()
    _section(f"(a) bare image tower, images/s (torch threads {torch.get_num_threads()}, median of >= {args.seconds:g} s each)")
    sizes = args.batch_sizes or [batch_size]
    sweep: dict[str, dict[str, float]] = {}
    for size in sorted(set(sizes) | {batch_size}):
        sweep[str(size)] = {"float32": _model.images_per_second(fp32, pixels, size, args.seconds)}
        if worker_dtype != "float32":
            sweep[str(size)][worker_dtype] = _model.images_per_second(worker, pixels, size, args.seconds)
        rates = "  ".join(f"{name} {rate:7.1f}" for name, rate in sweep[str(size)].items())
        marker = "   <- worker's model batch size" if size == batch_size else ""
        print(f"  batch {size:4d}: {rates}{marker}")
    at_batch = sweep[str(batch_size)]
    return {
        "batch_size": batch_size, "worker_dtype": worker_dtype, "float32": at_batch["float32"],
        "worker_dtype_rate": at_batch.get(worker_dtype, at_batch["float32"]), "best": max(at_batch.values()), "sweep": sweep,
    }


def measure_precision(args: argparse.Namespace, fp32: Any, worker: Any, pixels: Any, a: dict[str, Any]) -> dict[str, Any]:
    """Compare the worker's dtype with float32 on the same images, per label count."""
    worker_dtype = a["worker_dtype"]
    _section(f"Precision: {worker_dtype} against float32 on {len(pixels)} images")
    if worker_dtype == "float32":
        print("  the worker's dtype is float32, so the scores are identical")
    precision: dict[str, Any] = {"dtype": worker_dtype, "speedup": a["worker_dtype_rate"] / a["float32"]}
    for count in args.labels:
        if worker_dtype == "float32":
            row = {"max_abs_diff": 0.0, "top1_agreement": 1.0}
        else:
            row = _model.compare_precision(fp32, worker, pixels, _images.make_labels(count), TEMPLATE)
        precision[str(count)] = row
        print(f"  {count:5d} labels: max |p diff| {row['max_abs_diff']:.2e}, top-1 agreement {100 * row['top1_agreement']:.1f}%")
    print(f"  speed-up of {worker_dtype} over float32 in (a): {precision['speedup']:.2f}x")
    return precision


def measure_decode(photos: list[tuple[str, bytes]], processor: Any) -> dict[str, Any]:
    from producer.settings import Settings

    _section(f"Decode and preprocess, ms/image on {len(photos)} images (pixel differences in 8-bit levels)")
    decode = _model.compare_decode(photos, processor, Settings().max_image_pixels)
    print(f"  Pillow full decode + CLIPImageProcessorPil (reference): {decode['reference_ms']:.1f} ms")
    for name in ("draft_on", "draft_off"):
        if name in decode:
            row = decode[name]
            print(f"  worker decode_image + resize_and_crop, {name.replace('_', ' ')}: {row['ms']:.1f} ms, "
                  f"max diff {row['max_abs_diff']:.0f}, mean diff {row['mean_abs_diff']:.2f}")
    if "error" in decode:
        print(f"  {decode['error']}")
    return decode


def measure_end_to_end(
    args: argparse.Namespace, checkpoint: Path, photos: list[tuple[str, bytes]], workdir: Path, models: InProcessModels
) -> dict[str, Any]:
    """Run a warm-up job and a measured job per label count on a real worker, Redis and moto S3 server."""
    import boto3

    from producer.client import Client
    from producer.settings import Settings
    from tests.support.servers import RedisServer
    from tests.support.worker import start_worker

    _stack.use_test_credentials()
    _section("(b) clipfleet end to end")
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        moto = _stack.MotoProcess().start()
        stack.callback(moto.stop)
        s3 = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1")
        for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        started = time.perf_counter()
        _stack.upload(s3, INPUT_BUCKET, "images/", photos)
        _stack.upload(s3, INPUT_BUCKET, "warmup/", photos[:WARMUP_JOB_IMAGES])
        print(f"  uploaded {len(photos)} images to moto on port {moto.port} in {time.perf_counter() - started:.1f} s")

        default_fetch_threads = Settings.model_fields["fetch_threads"].default
        env = {"CLIPFLEET_DTYPE": args.dtype, "CLIPFLEET_DEVICE": args.device, "CLIPFLEET_FETCH_THREADS": str(default_fetch_threads)}
        started = time.perf_counter()
        worker = start_worker(workdir, redis_server.url, checkpoint, moto.endpoint_url, extra_env=env, concurrency=args.worker_processes)
        stack.callback(worker.stop)
        log_text = worker.log_path.read_text(errors="replace")
        load_s = _stack.model_load_s(log_text)
        tower_dtype = _stack.image_tower_dtype(log_text) or "a dtype that the worker log does not name"
        print(f"  worker ready in {time.perf_counter() - started:.1f} s (model load {load_s} s); "
              f"CLIPFLEET_DTYPE={args.dtype}, image tower in {tower_dtype}, {args.worker_processes} pool process(es)")
        results.update(model_load_s=load_s, worker_dtype=tower_dtype)
        uris = [f"s3://{INPUT_BUCKET}/images/{name}" for name, _ in photos[:IN_PROCESS_IMAGES]]
        results["s3_client_cpu_ms_per_image"] = _stack.fetch_cpu_ms(moto.endpoint_url, uris, default_fetch_threads)
        print(f"  S3 client CPU: {results['s3_client_cpu_ms_per_image']:.2f} ms per image "
              f"(the worker's fetch code reading {len(uris)} images in this process, {default_fetch_threads} threads)")

        client = Client(Settings(redis_url=redis_server.url, s3_endpoint_url=moto.endpoint_url, model=str(checkpoint)))
        for count in args.labels:
            results[str(count)] = run_label_set(args, client, worker, moto, count, len(photos), models)
    return results


def run_label_set(
    args: argparse.Namespace, client: Any, worker: Any, moto: _stack.MotoProcess, count: int, images: int, models: InProcessModels
) -> dict[str, Any]:
    """Run the warm-up job, then the measured job over all images, with `count` labels, between two timings of (a)."""
    labels = _images.make_labels(count)
    timeout_s = 300.0 if args.quick else 3600.0
    warmup = _submit(args, client, "warmup/", labels, f"warmup-{count}")
    warmup_status = warmup.wait(timeout_s=timeout_s, progress=False, poll_s=0.2)
    log_text = worker.log_path.read_text(errors="replace")
    cold_prompt_s = _stack.cold_prompt_s(log_text, warmup.id)

    a_before, one_thread_before = bracket_rate(args, models), one_thread_rate(args, models)
    before = _stack.sample_resources(moto.pid, worker.process.pid)
    job = _submit(args, client, "images/", labels, f"measured-{count}")
    status = job.wait(timeout_s=timeout_s, progress=False, poll_s=0.2)
    after = _stack.sample_resources(moto.pid, worker.process.pid)
    a_after, one_thread_after = bracket_rate(args, models), one_thread_rate(args, models)
    shares = _stack.cpu_shares(before, after, images)
    rss = _stack.peak_rss_mb(worker.process.pid)
    profile = _stack.stage_profile(worker.log_path.read_text(errors="replace"), job.id)

    job_s = (status.finished_at or math.nan) - (status.started_at or math.nan)
    row = {
        "state": status.state, "total": status.total, "succeeded": status.succeeded, "failed": status.failed,
        "warmup_state": warmup_status.state, "cold_prompt_s": cold_prompt_s, "job_s": job_s,
        "images_per_s": images / job_s if job_s > 0 else math.nan, "a_before": a_before, "a_after": a_after,
        "a_bracket": (a_before + a_after) / 2,
        "a_one_thread": (one_thread_before + one_thread_after) / 2 if one_thread_before and one_thread_after else None,
        "peak_rss_main_mb": rss["main_mb"],
        "peak_rss_pool_mb": rss["pool_mb"], **shares, "batches": profile.batches, "stages_s": profile.seconds,
    }
    _print_label_set(count, row)
    return row


def _submit(args: argparse.Namespace, client: Any, prefix: str, labels: list[str], output_name: str) -> Any:
    return client.submit(
        source=f"s3://{INPUT_BUCKET}/{prefix}",
        labels=labels,
        templates=[TEMPLATE],
        output=f"s3://{OUTPUT_BUCKET}/{output_name}/",
        batch_size=args.task_batch_size,
    )


def _print_label_set(count: int, row: dict[str, Any]) -> None:
    cold = f"{row['cold_prompt_s']:.2f} s" if row["cold_prompt_s"] is not None else "not in the log"
    print(f"  {count} labels: {row['state']}, {row['succeeded']}/{row['total']} ok, {row['images_per_s']:.1f} images/s "
          f"({row['job_s']:.2f} s from first batch start to last shard); cold prompt encoding {cold} (warm-up job)")
    print(f"    peak RSS since the worker started: main {row['peak_rss_main_mb']:.0f} MiB, pool process {row['peak_rss_pool_mb']:.0f} MiB; "
          f"moto CPU {row['moto_cpu_percent']:.1f}% of all cores; machine CPU {row['machine_cpu_percent']:.0f}%")
    model_cpu_ms = 1000.0 * usable_cpus() / row["a_bracket"]
    print(f"    (a) right before / after the job: {row['a_before']:.1f} / {row['a_after']:.1f} images/s; CPU per image: worker "
          f"{row['worker_cpu_ms_per_image']:.1f} ms (the bare tower would take {model_cpu_ms:.1f} ms at (a) on all cores), "
          f"moto {row['moto_cpu_ms_per_image']:.1f} ms")
    thread_stages = {key: value for key, value in row["stages_s"].items() if key in FETCH_THREAD_STAGES}
    task_stages = {key: value for key, value in row["stages_s"].items() if key not in FETCH_THREAD_STAGES}
    print(f"    stages over {row['batches']} batches, fetch threads (thread-seconds summed over threads): {_shares(thread_stages)}")
    print(f"    stages over {row['batches']} batches, task thread (wall seconds): {_shares(task_stages)}")


def _shares(stages_s: dict[str, float]) -> str:
    total_s = sum(stages_s.values())
    if not stages_s or total_s <= 0:
        return "none logged"
    return ", ".join(f"{key} {seconds:.2f} s ({100 * seconds / total_s:.0f}%)" for key, seconds in stages_s.items())


def measure_pipeline(args: argparse.Namespace, checkpoint: Path, paths: list[str]) -> dict[str, Any]:
    """Measure (c): transformers' zero-shot pipeline on the JPEG files, which it reads and decodes itself."""
    from transformers import pipeline

    _section("(c) transformers pipeline('zero-shot-image-classification'), given file paths (it decodes them)")
    from workers.model import choose_device

    pipe = pipeline("zero-shot-image-classification", model=str(checkpoint), device=choose_device(args.device))
    results: dict[str, Any] = {}
    for count in args.labels:
        labels = _images.make_labels(count)
        pipe(paths[:1], candidate_labels=labels, hypothesis_template=TEMPLATE)  # warm-up
        if count > PIPELINE_MANY_LABELS:
            subset = paths[: args.pipeline_images_1000]
            rate = _model.pipeline_rate(pipe, subset, labels, TEMPLATE, 1)
            results[str(count)] = {"images_per_s": rate, "images": len(subset), "batch_size": 1, "sweep": {}}
            print(f"  {count} labels: {rate:.3f} images/s on a subset of {len(subset)} images, batch size 1 "
                  "(the pipeline encodes every label for every image)")
            continue
        sweep_paths = paths[:PIPELINE_SWEEP_IMAGES]
        sweep = {str(size): _model.pipeline_rate(pipe, sweep_paths, labels, TEMPLATE, size)
                 for size in PIPELINE_SWEEP_BATCH_SIZES if size <= len(sweep_paths)}
        best_size = int(max(sweep, key=lambda size: sweep[size]))
        images = min(len(paths), max(len(sweep_paths), int(sweep[str(best_size)] * args.pipeline_seconds)))
        rate = _model.pipeline_rate(pipe, paths[:images], labels, TEMPLATE, best_size)
        results[str(count)] = {"images_per_s": rate, "images": images, "batch_size": best_size, "sweep": sweep}
        sweep_text = ", ".join(f"batch {size}: {value:.1f}" for size, value in sweep.items())
        print(f"  {count} labels: {rate:.1f} images/s on {images} images at batch size {best_size} "
              f"(sweep on {len(sweep_paths)} images: {sweep_text})")
    return results


def report_ratios(result: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Print b/a and b/c per label count next to their goals. Returns the ratios and the goal checks."""
    _section("Ratios (a = faster of float32 and the worker's dtype at the worker's model batch size, mean of its rates timed right before and after the job)")
    ratios: dict[str, Any] = {"b_over_a": {}, "b_over_a_bound": {}, "b_over_c": {}}
    goals = []
    for count in result["labels"]:
        b = result["b"][str(count)]["images_per_s"]
        ratios["b_over_a"][str(count)] = b / result["b"][str(count)]["a_bracket"]
        goals.append(_goal(f"b/a, {count} labels", ratios["b_over_a"][str(count)], GOAL_B_OVER_A, result["quick"]))
        ratios["b_over_a_bound"][str(count)] = _print_cpu_bound(result, count)
        if "c" in result:
            ratios["b_over_c"][str(count)] = b / result["c"][str(count)]["images_per_s"]
            goals.append(_goal(f"b/c, {count} labels", ratios["b_over_c"][str(count)], GOALS_B_OVER_C.get(count), result["quick"]))
    return ratios, goals


def _print_cpu_bound(result: dict[str, Any], count: int) -> float | None:
    """Print and return the highest b/a that the CPU work per image allows, or None when the model runs on a GPU.

    The tower needs at least the CPU per image of its one-thread rate, and at most cores / a, since it keeps
    every core busy while (a) runs. End to end, the S3 server, the S3 client and the decoding share the same
    cores. Even with no idle core and no other overhead, b is then at most
    cores / (model + S3 server + S3 client + decode) images/s.
    """
    row = result["b"][str(count)]
    if row.get("a_one_thread") is None:
        print(f"  {'b/a upper bound':22s} not computed: the tower does not run on the CPU")
        return None
    decode = result["decode"].get("draft_on") or result["decode"].get("draft_off") or {"ms": math.nan}
    cores = usable_cpus()
    one_thread_ms, all_cores_ms = 1000.0 / row["a_one_thread"], 1000.0 * cores / row["a_bracket"]
    model_ms, model_name = (one_thread_ms, "model on one thread") if one_thread_ms <= all_cores_ms else (all_cores_ms, "model at a")
    other_ms = {"S3 server": row["moto_cpu_ms_per_image"], "S3 client": result["b"]["s3_client_cpu_ms_per_image"], "decode and preprocess": decode["ms"]}
    bound = 1000.0 * cores / (model_ms + sum(other_ms.values())) / row["a_bracket"]
    parts = " + ".join(f"{value:.1f} {name}" for name, value in other_ms.items())
    print(f"  {f'b/a bound, {count} labels':22s} {bound:10.3f}   = {cores} cores / ({model_ms:.1f} {model_name} + {parts}) ms "
          f"of CPU per image, divided by a")
    if not result["quick"] and bound < GOAL_B_OVER_A:
        print(f"  {'':22s} below the goal: the CPU work per image leaves no way to reach b/a >= {GOAL_B_OVER_A:g} on this machine")
    return bound


def _goal(name: str, value: float, minimum: float | None, quick: bool) -> dict[str, Any]:
    if minimum is None:
        verdict = "no goal"
    elif quick:
        verdict = "not judged: the goals apply to the full run with the ViT-B/32-sized checkpoint"
    elif value >= minimum:
        verdict = "PASS"
    else:
        verdict = "FAIL"
    goal_text = f">= {minimum:g}" if minimum is not None else "-"
    print(f"  {name:22s} {value:10.2f}   goal {goal_text:8s} {verdict}")
    return {"name": name, "value": value, "goal": minimum, "verdict": verdict}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("Interrupted. The services that the benchmark started are stopped.", file=sys.stderr)
        sys.exit(130)
