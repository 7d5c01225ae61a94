"""Writing a batch's image embeddings next to its shard, for jobs with `store_embeddings` (see producer.embeddings)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from producer.embeddings import (
    EMBEDDINGS_CONTENT_TYPE,
    StoredEmbeddings,
    decode_embeddings,
    embeddings_location,
    encode_embeddings,
)
from producer.errors import StorageError
from producer.results import job_output
from producer.spec import JobSpec
from producer.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class EmbeddingCollector:
    """The normalised image embeddings of one batch delivery, by URI, as the model produces them. One thread only."""

    model_revision: str | None
    dim: int | None = None  # the image embedding size, so a batch whose images all failed still gets a file
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def for_model(cls, loaded: Any) -> "EmbeddingCollector":
        """Return an empty collector for the `LoadedModel` `loaded`."""
        dim = getattr(loaded.model.config, "projection_dim", None)
        return cls(loaded.revision, dim if isinstance(dim, int) else None)

    def add(self, uris: list[str], image_embeddings: torch.Tensor) -> None:
        """Keep `image_embeddings` `[len(uris), dim]`, L2-normalised float32, one row per URI."""
        for uri, vector in zip(uris, image_embeddings.float().cpu().numpy()):
            self.vectors[uri] = vector


def write_batch_embeddings(
    storage: Storage,
    spec: JobSpec,
    job_id: str,
    batch: int,
    rows: list[dict[str, Any]],
    collector: EmbeddingCollector | None,
    *,
    merge: bool = False,
) -> str | None:
    """Write the embeddings file of a batch whose shard will contain `rows`, before that shard is written.

    The file contains one vector per row without an error, in row order, so a redelivery rewrites the same
    file. With `merge` (a retry round's rewrite of the shard), vectors of the existing file are kept for
    rows this delivery did not encode. Without vectors or a known dimension (a batch that reached the
    delivery cap before any model ran, and has no earlier file) no file is written and an earlier one is
    deleted, so a failed image never keeps an embedding.
    Returns the location written, or None. Raises StorageError when reading or writing fails.
    """
    location = embeddings_location(job_output(spec, job_id), batch)
    vectors = _earlier_vectors(storage, location) if merge else {}
    if collector is not None:
        vectors.update(collector.vectors)
    succeeded = [row["uri"] for row in rows if row["error"] is None]
    missing = [uri for uri in succeeded if uri not in vectors]
    if missing:
        logger.warning("Job %s batch %d: %d classified images have no embedding to store, such as %r", job_id, batch, len(missing), missing[0])
    stored_uris = [uri for uri in succeeded if uri in vectors]
    dim = _dimension(vectors, collector)
    if dim is None:
        if storage.exists(location):
            storage.delete(location)
        return None
    matrix = np.stack([vectors[uri] for uri in stored_uris]) if stored_uris else np.zeros((0, dim), dtype=np.float32)
    stored = StoredEmbeddings(stored_uris, matrix, spec.model, _revision(collector, storage, location), spec.embeddings_dtype)
    storage.put_bytes(location, encode_embeddings(stored), content_type=EMBEDDINGS_CONTENT_TYPE, job_id=job_id, batch=batch)
    return location


def read_embeddings(storage: Storage, location: str) -> StoredEmbeddings:
    """Return the embeddings file at `location`. Raises StorageError naming it when it is missing or invalid."""
    body = storage.get_bytes(location)
    try:
        return decode_embeddings(body)
    except ValueError as e:
        raise StorageError(f"embeddings file {location!r} is invalid: {e}; replace the file, or run its job again with --store-embeddings") from e


def _earlier_vectors(storage: Storage, location: str) -> dict[str, np.ndarray]:
    if not storage.exists(location):
        return {}
    return {uri: vector.astype(np.float32) for uri, vector in read_embeddings(storage, location).by_uri().items()}


def _dimension(vectors: dict[str, np.ndarray], collector: EmbeddingCollector | None) -> int | None:
    """Return the embedding size: of the vectors at hand, else the collector's model's, else None."""
    if vectors:
        return int(next(iter(vectors.values())).shape[0])
    return collector.dim if collector is not None else None


def _revision(collector: EmbeddingCollector | None, storage: Storage, location: str) -> str | None:
    """Return the model revision to record: this delivery's, or, when no model ran, the existing file's."""
    if collector is not None:
        return collector.model_revision
    return read_embeddings(storage, location).model_revision if storage.exists(location) else None
