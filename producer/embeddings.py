"""Stored image embeddings: one Parquet file per result shard, written by jobs with `store_embeddings`.

Layout: `{output}/{job_id}/part-{batch:06d}.embeddings.parquet` next to the batch's shard. Columns:
`uri` (string) and `embedding` (fixed_size_list<float16 or float32>[dim]), one row per image of the shard
that has no error, in the shard's row order. Schema metadata (keys below, UTF-8 values) records the model
id, its revision, the dtype, the dimension and `normalised=true`: each embedding is the image tower's output
divided by its L2 norm in float32, then cast to the stored dtype.

The shard-name pattern of `producer.formats` does not match these names, so listings of shards, shard
bitmaps and compaction leave them alone. This module needs numpy and pyarrow only, not torch.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, field_validator

from producer.messages import check_job_id
from producer.storage import join_location

logger = logging.getLogger(__name__)

EMBEDDINGS_NAME = "part-{batch:06d}.embeddings.parquet"
EMBEDDINGS_CONTENT_TYPE = "application/vnd.apache.parquet"
EMBEDDING_DTYPES = ("float16", "float32")
EmbeddingDtype = Literal["float16", "float32"]
DEFAULT_EMBEDDING_DTYPE: EmbeddingDtype = "float16"
# Schema metadata keys.
MODEL_KEY = "clipfleet.model"
REVISION_KEY = "clipfleet.model_revision"
DTYPE_KEY = "clipfleet.dtype"
DIM_KEY = "clipfleet.dim"
NORMALISED_KEY = "clipfleet.normalised"
_ARROW_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


@dataclass(frozen=True)
class StoredEmbeddings:
    """The embeddings of one shard, where `uris[i]` has `vectors[i]` and `vectors` is `[rows, dim]` in `dtype`."""

    uris: list[str]
    vectors: np.ndarray
    model: str
    model_revision: str | None
    dtype: str

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def by_uri(self) -> dict[str, np.ndarray]:
        """Return each URI's vector. A URI listed twice keeps its last vector."""
        return dict(zip(self.uris, self.vectors))


def embeddings_name(batch: int) -> str:
    """Return the file name of a batch's embeddings, such as `part-000042.embeddings.parquet`."""
    return EMBEDDINGS_NAME.format(batch=batch)


def embeddings_location(job_folder: str, batch: int) -> str:
    """Return where a batch's embeddings are, in the job's result folder `job_folder` (`{output}/{job_id}`)."""
    return join_location(job_folder, embeddings_name(batch))


def encode_embeddings(stored: StoredEmbeddings) -> bytes:
    """Return the Parquet bytes of `stored`, its vectors cast to `stored.dtype`.

    Raises ValueError for an unknown dtype, for vectors that are not 2-D, or for a row count that differs
    from the number of URIs.
    """
    if stored.dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding dtype {stored.dtype!r} is not supported: use one of {', '.join(EMBEDDING_DTYPES)}")
    vectors = np.asarray(stored.vectors, dtype=stored.dtype)
    if vectors.ndim != 2 or vectors.shape[0] != len(stored.uris):
        raise ValueError(f"embeddings of shape {vectors.shape} do not match {len(stored.uris)} URIs: expected [uris, dim]")
    dim = vectors.shape[1]
    values = pa.array(vectors.reshape(-1), type=_ARROW_TYPES[stored.dtype])
    column = pa.FixedSizeListArray.from_arrays(values, dim)
    metadata = {
        MODEL_KEY: stored.model,
        REVISION_KEY: stored.model_revision or "",
        DTYPE_KEY: stored.dtype,
        DIM_KEY: str(dim),
        NORMALISED_KEY: "true",
    }
    schema = pa.schema(
        [pa.field("uri", pa.string(), nullable=False), pa.field("embedding", pa.list_(_ARROW_TYPES[stored.dtype], dim), nullable=False)],
        metadata=metadata,
    )
    table = pa.Table.from_arrays([pa.array(stored.uris, type=pa.string()), column], schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def decode_embeddings(body: bytes) -> StoredEmbeddings:
    """Return the embeddings of a file that `encode_embeddings` wrote. Raises ValueError for any other bytes."""
    try:
        table = pq.read_table(io.BytesIO(body))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"not a Parquet file: {e}") from e
    metadata = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
    missing = [key for key in (MODEL_KEY, DTYPE_KEY, DIM_KEY) if key not in metadata]
    if missing or table.column_names != ["uri", "embedding"]:
        raise ValueError(f"not an embeddings file: columns {table.column_names!r}, missing metadata {missing!r}")
    dtype, dim = metadata[DTYPE_KEY], int(metadata[DIM_KEY])
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding dtype {dtype!r} is not supported: use one of {', '.join(EMBEDDING_DTYPES)}")
    column = table.column("embedding").combine_chunks()
    vectors = column.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, dim)
    return StoredEmbeddings(
        uris=table.column("uri").to_pylist(),
        vectors=vectors,
        model=metadata[MODEL_KEY],
        model_revision=metadata.get(REVISION_KEY) or None,
        dtype=dtype,
    )


class RelabelSource(BaseModel):
    """The job whose stored embeddings a relabel job scores: its id and its shard format.

    The relabel job's `source` is that job's result folder, `{output}/{job_id}`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    format: Literal["jsonl", "parquet"] = "jsonl"

    @field_validator("job_id")
    @classmethod
    def _check_job_id(cls, value: str) -> str:
        return check_job_id(value)


def check_embeddings_dtype(embeddings_dtype: str, store_embeddings: bool) -> str:
    """Return `embeddings_dtype`; raise ValueError when it differs from the default without `store_embeddings`."""
    if embeddings_dtype != DEFAULT_EMBEDDING_DTYPE and not store_embeddings:
        raise ValueError(
            f"--embeddings-dtype {embeddings_dtype} applies only with --store-embeddings (store_embeddings=True); "
            "add --store-embeddings, or leave the dtype out"
        )
    return embeddings_dtype


def check_embedding_options(store_embeddings: bool, embeddings_dtype: str, relabel: RelabelSource | None, source: object) -> None:
    """Raise ValueError for a job spec whose embedding fields contradict each other.

    `embeddings_dtype` other than the default needs `store_embeddings`. A relabel job stores no
    embeddings (its images are the source job's) and has exactly one source, the source job's folder.
    """
    check_embeddings_dtype(embeddings_dtype, store_embeddings)
    if relabel is None:
        return
    if store_embeddings:
        raise ValueError("a relabel job cannot store embeddings: its images already have the source job's; leave store_embeddings off")
    if not isinstance(source, str):
        raise ValueError(f"a relabel job has one source, the source job's result folder, not {source!r}")
