#!/usr/bin/env python
"""Cold and warm start of a job's label embeddings: the text tower, the Redis prompt cache and the process cache.

Run from the repository root, because it imports the test helpers in tests/support:

    python benchmarks/prompt_cache.py            # ViT-B/32-sized random checkpoint, 1,000 labels x the "photo" set
    python benchmarks/prompt_cache.py --quick    # tiny checkpoint, 20 labels; checks that the script works

It measures, on a private redis-server on 127.0.0.1 that it starts and stops:

- the text tower's prompts/s at several text batch sizes (`workers.classify.TEXT_BATCH_SIZE`);
- cold start: `PromptCache.get` with empty caches, which runs the batched text tower and writes Redis;
- warm from Redis: `PromptCache.get` from a new PromptCache (an empty process cache, as in a new worker);
- warm in process: `PromptCache.get` again on the same PromptCache;
- the bytes of one entry: its embedding data and Redis' MEMORY USAGE of the whole hash.

It prints a table and ends with one line `RESULT {json}` for scripts. Figures vary between runs on shared machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import redis
import torch

from benchmarks import _images, _model
from benchmarks._options import positive_int
from benchmarks._runner import run_benchmark
from producer.constants import PROMPT_CACHE_KEY
from producer.spec import JobSpec, build_spec
from producer.templates import TEMPLATE_SETS
from tests.support.checkpoints import build_tiny_clip
from tests.support.servers import RedisServer
from workers import classify, prompts
from workers.model import LoadedModel, load_model
from workers.prompts import PromptCache, cache_digest

FULL = {"labels": 1000, "repeats": 5, "sweep_prompts": 1024, "batch_sizes": [16, 32, 64, 128, 256]}
QUICK = {"labels": 20, "repeats": 3, "sweep_prompts": 32, "batch_sizes": [8, 16]}


def positive_int_list(text: str) -> list[int]:
    """Parse a comma-separated list of positive integers, such as 64,256."""
    return [positive_int(part) for part in text.split(",")]


positive_int_list.__name__ = "comma-separated list of positive integers"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Cold and warm start of a job's label embeddings. See docs/benchmarks.md.")
    parser.add_argument("--quick", action="store_true", help="tiny test checkpoint and 20 labels; checks that the script works, its figures mean nothing")
    parser.add_argument("--labels", type=positive_int, default=None, help="number of labels (default 1000, 20 with --quick)")
    parser.add_argument("--template-set", default="photo", choices=sorted(TEMPLATE_SETS), help="built-in template set of the job (default photo)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repeats of each warm start; the median is reported (default 5)")
    parser.add_argument("--batch-sizes", type=positive_int_list, default=None, help="text batch sizes to time (default 16,32,64,128,256)")
    parser.add_argument("--sweep-prompts", type=positive_int, default=None, help="prompts encoded at each text batch size (default 1024)")
    parser.add_argument("--json", type=Path, default=None, help="also write the RESULT line's JSON to this file")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), run, "clipfleet-prompt-bench-")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": _images.machine_info(), "quick": args.quick, "labels": args.labels, "template_set": args.template_set}
    checkpoint = build_tiny_clip(workdir / "tiny-clip") if args.quick else _model.build_vit_b32(workdir / "vit-b32")
    loaded = load_model(str(checkpoint), device="cpu", dtype="float32")
    spec = build_spec(
        source="s3://bench-input/photos/", labels=_images.make_labels(args.labels),
        templates=list(TEMPLATE_SETS[args.template_set]), output="s3://bench-output/results/",
    )
    prompt_count = sum(len(label_prompts) for label_prompts in spec.prompts.values())
    result.update(prompts=prompt_count, model_load_s=loaded.load_s, mean_prompt_tokens=mean_tokens(loaded, spec))
    print(f"{args.labels} labels x {len(spec.templates)} templates = {prompt_count} prompts; model loaded in {loaded.load_s:.1f} s")

    # The cold start runs first, on a text tower that has not run yet, as in a worker that just loaded the model.
    with RedisServer(data_dir=workdir / "redis") as server:
        client = redis.Redis.from_url(server.url, socket_timeout=60.0)
        try:
            result["redis_version"] = client.info("server")["redis_version"]
            result.update(measure_cache(client, spec, loaded, args.repeats))
        finally:
            client.close()
    result["text_batch_sweep"] = sweep_text_batch_sizes(loaded, spec, args.batch_sizes, args.sweep_prompts)
    print_table(result)
    return result


def mean_tokens(loaded: LoadedModel, spec: JobSpec) -> float:
    """Return the mean token count of the job's prompts, start and end tokens included."""
    flat = [prompt for label_prompts in spec.prompts.values() for prompt in label_prompts]
    ids = loaded.tokenizer(flat, truncation=True)["input_ids"]
    return sum(len(row) for row in ids) / len(ids)


def sweep_text_batch_sizes(loaded: LoadedModel, spec: JobSpec, batch_sizes: list[int], prompt_count: int) -> dict[str, float]:
    """Return prompts/s of `encode_prompts` per text batch size, on the job's first `prompt_count` prompts."""
    flat = [prompt for label_prompts in spec.prompts.values() for prompt in label_prompts][:prompt_count]
    default = classify.TEXT_BATCH_SIZE
    rates: dict[str, float] = {}
    try:
        classify.encode_prompts(loaded, flat)  # warm-up at the default size, so no size pays for first calls
        for batch_size in batch_sizes:
            classify.TEXT_BATCH_SIZE = batch_size
            started = time.perf_counter()
            classify.encode_prompts(loaded, flat)
            rates[str(batch_size)] = len(flat) / (time.perf_counter() - started)
            print(f"text batch {batch_size}: {rates[str(batch_size)]:.0f} prompts/s")
    finally:
        classify.TEXT_BATCH_SIZE = default
    return rates


def measure_cache(client: redis.Redis, spec: JobSpec, loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    """Time a cold `PromptCache.get`, warm ones from Redis and from the process, and measure the stored entry."""
    client.flushall()
    encoding_s: list[float] = []
    original = prompts.label_embeddings
    prompts.label_embeddings = _timed(original, encoding_s)
    try:
        cache = PromptCache(client)
        cold_s, embeddings = _time_call(lambda: cache.get(spec, loaded))
    finally:
        prompts.label_embeddings = original
    print(f"cold start: {cold_s:.2f} s, of which the text tower {encoding_s[0]:.2f} s")

    redis_s = [_time_call(lambda: _check_hit(PromptCache(client), spec, loaded, embeddings))[0] for _ in range(repeats)]
    process_s = [_time_call(lambda: cache.get(spec, loaded))[0] for _ in range(repeats)]
    entry_key = PROMPT_CACHE_KEY.format(digest=cache_digest(spec, loaded))
    return {
        "cold_s": cold_s,
        "cold_text_tower_s": encoding_s[0],
        "cold_prompts_per_s": sum(len(label_prompts) for label_prompts in spec.prompts.values()) / encoding_s[0],
        "warm_redis_s": statistics.median(redis_s),
        "warm_redis_all_s": redis_s,
        "warm_process_s": statistics.median(process_s),
        "entry_data_bytes": int(client.hstrlen(entry_key, "data")),
        "entry_memory_usage_bytes": int(client.memory_usage(entry_key, samples=0)),
        "shape": list(embeddings.shape),
    }


def _check_hit(cache: PromptCache, spec: JobSpec, loaded: LoadedModel, expected: torch.Tensor) -> None:
    """Get the embeddings from a new PromptCache and raise RuntimeError unless Redis served them unchanged."""
    reused = cache.get(spec, loaded)
    if cache.hits != 1 or not torch.equal(reused, expected):
        raise RuntimeError(f"the warm start did not read the Redis entry (hits={cache.hits}, misses={cache.misses})")


def _timed(function: Callable[..., Any], durations_s: list[float]) -> Callable[..., Any]:
    def timed(*args: Any) -> Any:
        elapsed_s, value = _time_call(lambda: function(*args))
        durations_s.append(elapsed_s)
        return value

    return timed


def _time_call(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("prompts (labels x templates)", f"{result['prompts']:,} ({result['labels']:,} x {result['prompts'] // result['labels']})"),
        ("mean tokens per prompt", f"{result['mean_prompt_tokens']:.1f}"),
        ("model load", f"{result['model_load_s']:.2f} s"),
        ("cold start (text tower + Redis write)", f"{result['cold_s']:.2f} s ({result['cold_prompts_per_s']:.0f} prompts/s)"),
        ("warm from Redis (new process cache)", f"{1000 * result['warm_redis_s']:.2f} ms"),
        ("warm in process", f"{1e6 * result['warm_process_s']:.1f} us"),
        ("entry: data / Redis MEMORY USAGE", f"{result['entry_data_bytes']:,} / {result['entry_memory_usage_bytes']:,} bytes"),
    ]
    rows += [(f"text batch {size}", f"{rate:.0f} prompts/s") for size, rate in result["text_batch_sweep"].items()]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
