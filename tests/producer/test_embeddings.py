"""Stored-embedding files, the spec fields that request them, and how shard listings treat them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from producer.embeddings import StoredEmbeddings, decode_embeddings, embeddings_name, encode_embeddings
from producer.errors import InvalidJobSpec
from producer.formats import parse_shard_name
from producer.results import ShardBitmap, list_shards
from producer.spec import JobSpec, build_spec
from producer.storage import Storage


def unit_vectors(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def stored(dtype: str = "float16", rows: int = 3) -> StoredEmbeddings:
    uris = [f"s3://bucket-a/img-{index}.jpg" for index in range(rows)]
    return StoredEmbeddings(uris, unit_vectors(rows, 8), "openai/clip-vit-base-patch32", "abc123", dtype)


def spec_fields(**extra: object) -> dict[str, object]:
    return {"source": "s3://bucket-a/in/", "labels": ["cat"], "output": "s3://bucket-b/out/", **extra}


def test_round_trip_float16() -> None:
    original = stored("float16")
    decoded = decode_embeddings(encode_embeddings(original))
    assert decoded.uris == original.uris
    assert decoded.vectors.dtype == np.float16
    assert np.array_equal(decoded.vectors, original.vectors.astype(np.float16))
    assert decoded.model == "openai/clip-vit-base-patch32"
    assert decoded.model_revision == "abc123"


def test_round_trip_float32_is_exact() -> None:
    original = stored("float32")
    decoded = decode_embeddings(encode_embeddings(original))
    assert decoded.vectors.dtype == np.float32
    assert np.array_equal(decoded.vectors, original.vectors)


def test_empty_file_keeps_dimension(tmp_path: Path) -> None:
    empty = StoredEmbeddings([], np.zeros((0, 8), dtype=np.float32), "m", None, "float16")
    path = tmp_path / embeddings_name(0)
    path.write_bytes(encode_embeddings(empty))
    table = pq.read_table(path)
    assert table.num_rows == 0
    assert table.schema.field("embedding").type.list_size == 8
    assert decode_embeddings(path.read_bytes()).vectors.shape == (0, 8)


def test_file_read_by_pyarrow_and_numpy(tmp_path: Path) -> None:
    original = stored("float16")
    path = tmp_path / embeddings_name(42)
    path.write_bytes(encode_embeddings(original))
    table = pq.read_table(path)
    vectors = table.column("embedding").combine_chunks().values.to_numpy().reshape(table.num_rows, -1)
    assert table.schema.metadata[b"clipfleet.normalised"] == b"true"
    assert table.schema.metadata[b"clipfleet.dtype"] == b"float16"
    assert vectors.dtype == np.float16
    assert vectors.shape == (3, 8)
    assert np.all(np.abs(np.linalg.norm(vectors.astype(np.float64), axis=1) - 1) <= 2.0**-11)


def test_rows_must_match_uris() -> None:
    mismatched = StoredEmbeddings(["s3://bucket-a/one.jpg"], unit_vectors(2, 8), "m", None, "float16")
    with pytest.raises(ValueError, match="do not match 1 URIs"):
        encode_embeddings(mismatched)


def test_other_bytes_rejected() -> None:
    with pytest.raises(ValueError, match="not a Parquet file"):
        decode_embeddings(b'{"uri": "s3://bucket-a/x.jpg"}\n')


def test_name_is_not_a_shard_name() -> None:
    assert embeddings_name(42) == "part-000042.embeddings.parquet"
    assert parse_shard_name(embeddings_name(42)) is None


def test_shard_listing_ignores_embeddings(tmp_path: Path) -> None:
    for name in ("part-000000.jsonl", "part-000000.embeddings.parquet", "part-000001.jsonl", "part-000001.embeddings.parquet"):
        (tmp_path / name).write_bytes(b"")
    bitmap = ShardBitmap.of_folder(Storage(), str(tmp_path))
    assert list_shards(Storage(), str(tmp_path)) == [(0, "part-000000.jsonl"), (1, "part-000001.jsonl")]
    assert 1 in bitmap
    assert 2 not in bitmap


def test_spec_defaults_leave_old_specs_readable() -> None:
    old = JobSpec.model_validate_json('{"source": "s3://bucket-a/in/", "labels": ["cat"], "output": "s3://bucket-b/out/"}')
    assert old.store_embeddings is False
    assert old.embeddings_dtype == "float16"
    assert old.relabel is None


def test_spec_default_fields_not_serialised() -> None:
    spec = build_spec(**spec_fields())
    assert "store_embeddings" not in spec.model_dump_json(exclude_defaults=True)


def test_spec_dtype_needs_store_embeddings() -> None:
    with pytest.raises(InvalidJobSpec, match=r"applies only with --store-embeddings \(store_embeddings=True\)"):
        build_spec(**spec_fields(embeddings_dtype="float32"))


def test_spec_unknown_dtype_rejected() -> None:
    with pytest.raises(InvalidJobSpec, match="embeddings_dtype"):
        build_spec(**spec_fields(store_embeddings=True, embeddings_dtype="int8"))


def test_relabel_spec_cannot_store_embeddings() -> None:
    with pytest.raises(InvalidJobSpec, match="cannot store embeddings"):
        build_spec(**spec_fields(source="s3://bucket-b/out/job-1", store_embeddings=True, relabel={"job_id": "job-1"}))


def test_relabel_spec_rejects_invalid_job_id() -> None:
    with pytest.raises(InvalidJobSpec, match="invalid job id"):
        build_spec(**spec_fields(source="s3://bucket-b/out/job-1", relabel={"job_id": "../up"}))


def test_relabel_spec_round_trips() -> None:
    spec = build_spec(**spec_fields(source="s3://bucket-b/out/job-1", relabel={"job_id": "job-1", "format": "parquet"}))
    again = JobSpec.model_validate_json(spec.model_dump_json(exclude_defaults=True))
    assert again.relabel is not None
    assert again.relabel.job_id == "job-1"
    assert again.relabel.format == "parquet"
