"""The label-embedding cache against a real Redis: in process first, then Redis, then the text tower."""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import os
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from pydantic import ValidationError

from producer.constants import PROMPT_CACHE_KEY
from producer.settings import Settings
from producer.spec import JobSpec, build_spec
from workers import classify, prompts
from workers.model import LoadedModel, checkpoint_fingerprint, load_model
from workers.prompts import REDIS_TTL_S, PromptCache, cache_digest
from workers.runtime import WorkerRuntime

LABELS = ["cat", "rocket"]
TEMPLATE = "a photo of a {}."
EMBEDDING_DIM = 16  # PROJECTION_DIM of the checkpoint built by tests.support.checkpoints


class TextTowerCalled(AssertionError):
    """Raised when a test that expects a cache hit reaches the model."""


class ExplodingModel:
    """A placeholder for the CLIP model that raises on any attribute access but `dtype`, so a bypassed cache fails the test."""

    dtype = torch.float32  # read by cache_digest, as the text tower's dtype

    def __getattr__(self, name: str) -> Any:
        raise TextTowerCalled(f"the model was used ({name}), but the cache was expected to return the embeddings")


@pytest.fixture(scope="module")
def loaded(tiny_clip_dir: Path) -> LoadedModel:
    return load_model(str(tiny_clip_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def no_model(loaded: LoadedModel) -> LoadedModel:
    """The loaded model with its CLIP module replaced by one that raises on any use."""
    return dataclasses.replace(loaded, model=ExplodingModel())


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def make_spec(templates: list[str] | None = None) -> JobSpec:
    return build_spec(
        source="s3://input-bucket/photos/",
        labels=LABELS,
        templates=templates or [TEMPLATE],
        output="s3://output-bucket/results/",
    )


def cache_key(spec: JobSpec, loaded: LoadedModel) -> str:
    return PROMPT_CACHE_KEY.format(digest=cache_digest(spec, loaded))


def test_first_get_is_miss(client: redis.Redis, loaded: LoadedModel) -> None:
    cache = PromptCache(client)
    embeddings = cache.get(make_spec(), loaded)
    assert cache.misses == 1
    assert cache.hits == 0
    assert tuple(embeddings.shape) == (len(LABELS), EMBEDDING_DIM)
    assert embeddings.dtype == torch.float32


def test_miss_writes_redis_hash(client: redis.Redis, loaded: LoadedModel) -> None:
    spec = make_spec()
    embeddings = PromptCache(client).get(spec, loaded)
    entry = client.hgetall(cache_key(spec, loaded))
    assert entry[b"shape"] == f"{len(LABELS)},{EMBEDDING_DIM}".encode()
    assert entry[b"data"] == embeddings.numpy().astype(np.float32).tobytes()
    assert entry[b"sha256"].decode() == hashlib.sha256(entry[b"data"]).hexdigest()


def test_redis_entry_expires(client: redis.Redis, loaded: LoadedModel) -> None:
    spec = make_spec()
    PromptCache(client).get(spec, loaded)
    ttl_s = client.ttl(cache_key(spec, loaded))
    assert 0 < ttl_s <= REDIS_TTL_S


def test_second_get_served_in_process(client: redis.Redis, loaded: LoadedModel, no_model: LoadedModel) -> None:
    spec = make_spec()
    cache = PromptCache(client)
    first = cache.get(spec, loaded)
    client.delete(cache_key(spec, loaded))

    second = cache.get(spec, no_model)

    assert second is first
    assert cache.hits == 0
    assert cache.misses == 1
    assert client.exists(cache_key(spec, loaded)) == 0


def test_second_instance_hits_redis(client: redis.Redis, loaded: LoadedModel, no_model: LoadedModel) -> None:
    spec = make_spec()
    computed = PromptCache(client).get(spec, loaded)
    other_worker = PromptCache(client)

    reused = other_worker.get(spec, no_model)

    assert other_worker.hits == 1
    assert other_worker.misses == 0
    assert torch.equal(reused, computed)


def test_hit_matches_text_tower(client: redis.Redis, loaded: LoadedModel, no_model: LoadedModel) -> None:
    """An entry read back from Redis equals what the text tower computes from scratch."""
    spec = make_spec()
    PromptCache(client).get(spec, loaded)
    reused = PromptCache(client).get(spec, no_model)
    client.delete(cache_key(spec, loaded))
    recomputed = PromptCache(client).get(spec, loaded)
    assert torch.allclose(reused, recomputed, atol=1e-6)


def test_corrupt_data_recomputed(client: redis.Redis, loaded: LoadedModel) -> None:
    spec = make_spec()
    expected = PromptCache(client).get(spec, loaded)
    data = bytearray(client.hget(cache_key(spec, loaded), "data"))
    data[0] ^= 0xFF
    client.hset(cache_key(spec, loaded), "data", bytes(data))
    cache = PromptCache(client)

    embeddings = cache.get(spec, loaded)

    assert cache.misses == 1
    assert cache.hits == 0
    assert torch.allclose(embeddings, expected, atol=1e-6)


def test_corrupt_entry_rewritten(client: redis.Redis, loaded: LoadedModel) -> None:
    spec = make_spec()
    PromptCache(client).get(spec, loaded)
    data = bytearray(client.hget(cache_key(spec, loaded), "data"))
    data[0] ^= 0xFF
    client.hset(cache_key(spec, loaded), "data", bytes(data))

    PromptCache(client).get(spec, loaded)

    entry = client.hgetall(cache_key(spec, loaded))
    assert entry[b"sha256"].decode() == hashlib.sha256(entry[b"data"]).hexdigest()


def test_shape_longer_than_data_recomputed(client: redis.Redis, loaded: LoadedModel) -> None:
    spec = make_spec()
    expected = PromptCache(client).get(spec, loaded)
    client.hset(cache_key(spec, loaded), "shape", f"{len(LABELS) + 1},{EMBEDDING_DIM}")
    cache = PromptCache(client)

    embeddings = cache.get(spec, loaded)

    assert cache.misses == 1
    assert tuple(embeddings.shape) == tuple(expected.shape)


def test_shape_swapped_recomputed(client: redis.Redis, loaded: LoadedModel) -> None:
    """A stored shape with the right byte count but the wrong number of labels is not trusted."""
    spec = make_spec()
    expected = PromptCache(client).get(spec, loaded)
    client.hset(cache_key(spec, loaded), "shape", f"1,{len(LABELS) * EMBEDDING_DIM}")
    cache = PromptCache(client)

    embeddings = cache.get(spec, loaded)

    assert tuple(embeddings.shape) == tuple(expected.shape)


def test_changed_template_new_key(client: redis.Redis, loaded: LoadedModel) -> None:
    first = make_spec([TEMPLATE])
    second = make_spec(["a blurry photo of a {}."])
    cache = PromptCache(client)

    cache.get(first, loaded)
    cache.get(second, loaded)

    assert cache_key(first, loaded) != cache_key(second, loaded)
    assert cache.misses == 2
    assert sorted(client.keys(PROMPT_CACHE_KEY.format(digest="*"))) == sorted(
        [cache_key(first, loaded).encode(), cache_key(second, loaded).encode()]
    )


def test_changed_template_new_embeddings(client: redis.Redis, loaded: LoadedModel) -> None:
    cache = PromptCache(client)
    plain = cache.get(make_spec([TEMPLATE]), loaded)
    blurry = cache.get(make_spec(["a blurry photo of a {}."]), loaded)
    assert not torch.allclose(plain, blurry, atol=1e-4)


def test_replaced_checkpoint_changes_key(loaded: LoadedModel, tmp_path: Path) -> None:
    copy = tmp_path / "checkpoint"
    shutil.copytree(loaded.path, copy)
    before = checkpoint_fingerprint(str(copy))
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # same path, new modification time
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    after = checkpoint_fingerprint(str(copy))
    assert before != after
    spec = make_spec()
    assert cache_digest(spec, dataclasses.replace(loaded, fingerprint=before)) != cache_digest(spec, dataclasses.replace(loaded, fingerprint=after))


def make_revision_spec(revision: str | None) -> JobSpec:
    return build_spec(
        source="s3://input-bucket/photos/", labels=LABELS, templates=[TEMPLATE],
        output="s3://output-bucket/results/", model_revision=revision,
    )


def test_entry_stores_dtype(client: redis.Redis, loaded: LoadedModel) -> None:
    spec = make_spec()
    PromptCache(client).get(spec, loaded)
    assert client.hget(cache_key(spec, loaded), "dtype") == b"float32"


def test_changed_label_new_key(loaded: LoadedModel) -> None:
    other = build_spec(source="s3://input-bucket/photos/", labels=["cat", "rockets"], templates=[TEMPLATE], output="s3://output-bucket/results/")
    assert cache_digest(make_spec(), loaded) != cache_digest(other, loaded)


def test_changed_label_order_new_key(loaded: LoadedModel) -> None:
    other = build_spec(source="s3://input-bucket/photos/", labels=LABELS[::-1], templates=[TEMPLATE], output="s3://output-bucket/results/")
    assert cache_digest(make_spec(), loaded) != cache_digest(other, loaded)


def test_job_revision_changes_key(loaded: LoadedModel) -> None:
    assert cache_digest(make_revision_spec("v1"), loaded) != cache_digest(make_revision_spec("v2"), loaded)


def test_loaded_revision_changes_key(loaded: LoadedModel) -> None:
    spec = make_spec()
    assert cache_digest(spec, dataclasses.replace(loaded, revision="a" * 40)) != cache_digest(spec, dataclasses.replace(loaded, revision="b" * 40))


def test_text_tower_dtype_changes_key(loaded: LoadedModel) -> None:
    half = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to(torch.bfloat16))
    assert cache_digest(make_spec(), loaded) != cache_digest(make_spec(), half)


def test_image_tower_dtype_keeps_key(loaded: LoadedModel) -> None:
    """The image tower's autocast type does not change text embeddings, so bfloat16 and float32 workers share entries."""
    assert cache_digest(make_spec(), loaded) == cache_digest(make_spec(), dataclasses.replace(loaded, dtype=torch.bfloat16))


def test_tokenizer_class_changes_key(loaded: LoadedModel) -> None:
    class OtherTokenizer:
        pass

    assert cache_digest(make_spec(), loaded) != cache_digest(make_spec(), dataclasses.replace(loaded, tokenizer=OtherTokenizer()))


def test_format_version_changes_key(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache_digest(make_spec(), loaded)
    monkeypatch.setattr(prompts, "FORMAT_VERSION", prompts.FORMAT_VERSION + 1)
    assert cache_digest(make_spec(), loaded) != before


def test_hub_snapshot_key_ignores_mtimes(loaded: LoadedModel, tmp_path: Path) -> None:
    """Two hosts that downloaded one hub commit at different times share entries; another commit does not."""
    commit = "c" * 40
    first = dataclasses.replace(loaded, path=str(tmp_path / "host1/snapshots" / commit), fingerprint="mtimes-1")
    second = dataclasses.replace(loaded, path=str(tmp_path / "host2/snapshots" / commit), fingerprint="mtimes-2")
    other_commit = dataclasses.replace(first, path=str(tmp_path / "host1/snapshots" / ("d" * 40)))
    assert cache_digest(make_spec(), first) == cache_digest(make_spec(), second)
    assert cache_digest(make_spec(), first) != cache_digest(make_spec(), other_commit)


@pytest.mark.parametrize(
    ("field", "value"),
    [("dtype", b"float16"), ("shape", f"{len(LABELS)},{EMBEDDING_DIM + 1}".encode()), ("sha256", b"0" * 64)],
)
def test_invalid_entry_recomputed(client: redis.Redis, loaded: LoadedModel, field: str, value: bytes) -> None:
    spec = make_spec()
    expected = PromptCache(client).get(spec, loaded)
    client.hset(cache_key(spec, loaded), field, value)
    cache = PromptCache(client)

    embeddings = cache.get(spec, loaded)

    assert cache.misses == 1
    assert cache.hits == 0
    assert torch.allclose(embeddings, expected, atol=1e-6)
    entry = client.hgetall(cache_key(spec, loaded))
    assert entry[b"dtype"] == b"float32"
    assert entry[b"shape"] == f"{len(LABELS)},{EMBEDDING_DIM}".encode()
    assert entry[b"sha256"].decode() == hashlib.sha256(entry[b"data"]).hexdigest()


def test_evicted_entry_recomputed(client: redis.Redis, loaded: LoadedModel) -> None:
    entry_bytes = len(LABELS) * EMBEDDING_DIM * 4
    first, second = make_spec([TEMPLATE]), make_spec(["a blurry photo of a {}."])
    PromptCache(client, max_bytes=entry_bytes).get(first, loaded)
    PromptCache(client, max_bytes=entry_bytes).get(second, loaded)
    cache = PromptCache(client, max_bytes=entry_bytes)

    cache.get(first, loaded)

    assert cache.misses == 1
    assert client.exists(cache_key(second, loaded)) == 0


def test_entry_above_bound_still_returned(client: redis.Redis, loaded: LoadedModel) -> None:
    spec = make_spec()
    cache = PromptCache(client, max_bytes=16)
    embeddings = cache.get(spec, loaded)
    assert tuple(embeddings.shape) == (len(LABELS), EMBEDDING_DIM)
    assert client.exists(cache_key(spec, loaded)) == 0


def test_cleared_process_cache_reads_redis(client: redis.Redis, loaded: LoadedModel, no_model: LoadedModel) -> None:
    spec = make_spec()
    cache = PromptCache(client)
    computed = cache.get(spec, loaded)
    cache.clear_process_entries()

    reused = cache.get(spec, no_model)

    assert cache.hits == 1
    assert torch.equal(reused, computed)


def varied_prompts(count: int) -> list[str]:
    """Return prompts from 1 to about 40 words, so batches pad to different lengths."""
    words = ["cat", "rocket", "coffee", "cup", "astronaut", "on", "a", "red", "chair", "near", "the", "sea"]
    return [" ".join(words[(i + j) % len(words)] for j in range(1 + (i * 7) % 40)) for i in range(count)]


def test_batched_text_tower_matches_one_pass(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = varied_prompts(23)
    batch_sizes: list[int] = []
    hook = loaded.model.text_model.register_forward_hook(lambda module, args, kwargs, output: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        monkeypatch.setattr(classify, "TEXT_BATCH_SIZE", len(prompts))
        one_pass = classify.encode_prompts(loaded, prompts)
        monkeypatch.setattr(classify, "TEXT_BATCH_SIZE", 5)
        batched = classify.encode_prompts(loaded, prompts)
    finally:
        hook.remove()
    unpadded = torch.cat([classify.encode_prompts(loaded, [prompt]) for prompt in prompts])

    assert batch_sizes == [23, 5, 5, 5, 5, 3]
    assert tuple(batched.shape) == (len(prompts), EMBEDDING_DIM)
    assert float((batched - one_pass).abs().max()) <= 1e-6
    assert float((batched - unpadded).abs().max()) <= 1e-6


def test_digest_computed_once_per_spec(client: redis.Redis, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting_digest(spec: JobSpec, model: LoadedModel) -> str:
        calls.append(spec.prompts_digest())
        return cache_digest(spec, model)

    monkeypatch.setattr(prompts, "cache_digest", counting_digest)
    cache = PromptCache(client)
    spec = make_spec()
    for _ in range(3):
        cache.get(spec, loaded)
    cache.get(make_spec(), loaded)  # an equal spec in a new object

    assert len(calls) == 2
    assert cache.misses == 1


def test_max_mb_setting_reaches_cache(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFLEET_PROMPT_CACHE_MAX_MB", "3")
    runtime = WorkerRuntime(Settings(redis_url=redis_url, s3_endpoint_url="http://127.0.0.1:9"))
    try:
        assert runtime.prompts.store.max_bytes == 3 * 1024 * 1024
    finally:
        runtime.pool.shutdown()
        runtime.store.redis.close()


def test_max_mb_setting_zero_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFLEET_PROMPT_CACHE_MAX_MB", "0")
    with pytest.raises(ValidationError, match="prompt_cache_max_mb"):
        Settings()


def test_digest_memo_keeps_no_model(client: redis.Redis, loaded: LoadedModel) -> None:
    """A model the worker unloads is not kept in memory by the remembered digests."""
    cache = PromptCache(client)
    copy_of_model = dataclasses.replace(loaded)
    reference = weakref.ref(copy_of_model)
    cache.get(make_spec(), copy_of_model)

    del copy_of_model
    gc.collect()

    assert reference() is None
