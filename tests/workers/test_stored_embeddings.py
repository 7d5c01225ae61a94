"""The worker's embeddings file per batch: row order, failed images, retry-round merges and stale files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from producer.embeddings import decode_embeddings, embeddings_name
from producer.spec import JobSpec, build_spec
from producer.storage import Storage
from workers.stored_embeddings import EmbeddingCollector, write_batch_embeddings

JOB_ID = "job-1"


def job_spec(tmp_path: Path, dtype: str = "float16") -> JobSpec:
    return build_spec(
        source=str(tmp_path / "in"), labels=["cat"], output=str(tmp_path / "out"), model="model-a",
        store_embeddings=True, embeddings_dtype=dtype,
    )


def ok(uri: str) -> dict[str, Any]:
    return {"uri": uri, "label": "cat", "score": 1.0, "top_k": [{"label": "cat", "score": 1.0}], "error": None}


def failed(uri: str) -> dict[str, Any]:
    return {"uri": uri, "label": None, "score": None, "top_k": [], "error": {"code": "not_found", "message": "gone"}}


def collector_with(uris: list[str], seed: int = 0) -> EmbeddingCollector:
    vectors = torch.nn.functional.normalize(torch.randn(len(uris), 8, generator=torch.Generator().manual_seed(seed)), dim=-1)
    collector = EmbeddingCollector("rev-1", 8)
    collector.add(uris, vectors)
    return collector


def read(tmp_path: Path, batch: int = 0) -> Any:
    return decode_embeddings((tmp_path / "out" / JOB_ID / embeddings_name(batch)).read_bytes())


def test_rows_in_shard_order_without_failures(tmp_path: Path) -> None:
    spec = job_spec(tmp_path)
    collector = collector_with(["b", "a"])
    rows = [ok("a"), failed("x"), ok("b")]
    write_batch_embeddings(Storage(), spec, JOB_ID, 0, rows, collector)
    stored = read(tmp_path)
    assert stored.uris == ["a", "b"]
    assert np.array_equal(stored.vectors[0], collector.vectors["a"].astype(np.float16))
    assert stored.model == "model-a"
    assert stored.model_revision == "rev-1"


def test_all_failed_batch_gets_empty_file(tmp_path: Path) -> None:
    write_batch_embeddings(Storage(), job_spec(tmp_path), JOB_ID, 3, [failed("x")], EmbeddingCollector(None, 8))
    stored = read(tmp_path, 3)
    assert stored.uris == []
    assert stored.vectors.shape == (0, 8)


def test_retry_merge_keeps_earlier_vectors(tmp_path: Path) -> None:
    spec = job_spec(tmp_path, "float32")
    first = collector_with(["a", "c"], seed=1)
    write_batch_embeddings(Storage(), spec, JOB_ID, 0, [ok("a"), failed("b"), ok("c")], first)
    retried = collector_with(["b"], seed=2)
    write_batch_embeddings(Storage(), spec, JOB_ID, 0, [ok("a"), ok("b"), ok("c")], retried, merge=True)
    stored = read(tmp_path)
    assert stored.uris == ["a", "b", "c"]
    assert np.array_equal(stored.vectors[0], first.vectors["a"])
    assert np.array_equal(stored.vectors[1], retried.vectors["b"])


def test_delivery_cap_removes_stale_file(tmp_path: Path) -> None:
    spec = job_spec(tmp_path)
    write_batch_embeddings(Storage(), spec, JOB_ID, 0, [ok("a")], collector_with(["a"]))
    written = write_batch_embeddings(Storage(), spec, JOB_ID, 0, [failed("a")], None)
    assert written is None
    assert not (tmp_path / "out" / JOB_ID / embeddings_name(0)).exists()


def test_redelivery_rewrites_same_file(tmp_path: Path) -> None:
    spec = job_spec(tmp_path)
    collector = collector_with(["a", "b"])
    first = write_batch_embeddings(Storage(), spec, JOB_ID, 0, [ok("a"), ok("b")], collector)
    second = write_batch_embeddings(Storage(), spec, JOB_ID, 0, [ok("a"), ok("b")], collector)
    assert first == second
    assert read(tmp_path).uris == ["a", "b"]
