"""The label-embedding cache against a real Redis: in process first, then Redis, then the text tower."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from producer.constants import PROMPT_CACHE_KEY
from producer.spec import JobSpec, build_spec
from workers.model import LoadedModel, checkpoint_fingerprint, load_model
from workers.prompts import REDIS_TTL_S, PromptCache, cache_digest

LABELS = ["cat", "rocket"]
TEMPLATE = "a photo of a {}."
EMBEDDING_DIM = 16  # PROJECTION_DIM of the checkpoint built by tests.support.checkpoints


class TextTowerCalled(AssertionError):
    """Raised when a test that expects a cache hit reaches the model."""


class ExplodingModel:
    """A placeholder for the CLIP model that raises on any attribute access, so a bypassed cache fails the test."""

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
