"""Relabelling: score a source job's stored image embeddings against a relabel job's labels.

No image is fetched or decoded and the image tower does not run. The text tower runs for the new labels
through the prompt cache, and rows are built by `workers.rows.build_result_rows`, as in a full run.
Images that failed in the source job keep their error rows.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from producer.embeddings import (
    RelabelSource,
    StoredEmbeddings,
    decode_embeddings,
    embeddings_location,
)
from producer.errors import ClipfleetError, StorageError
from producer.formats import shard_name
from producer.results import read_rows
from producer.spec import JobSpec
from producer.storage import join_location
from workers.model import LoadedModel
from workers.rows import build_result_rows
from workers.runtime import WorkerRuntime

logger = logging.getLogger(__name__)


class RelabelRejected(ClipfleetError):
    """The stored embeddings cannot serve the relabel job (missing, invalid, or of another model, revision or
    dimension), so the job fails."""


def relabel_uris(
    runtime: WorkerRuntime, spec: JobSpec, loaded: LoadedModel, uris: list[str], job_id: str, batch: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Return one result row per URI of source batch `batch`, in order, and the seconds per stage.

    Stages are `read_source` (the source shard and embeddings file) and `score` (text tower, when its
    prompts are not cached, and scoring). Raises RelabelRejected when the stored embeddings came from
    another model, or the embeddings file is missing, invalid or lacks a vector of the batch. Raises
    StorageError when the source shard cannot be read or does not list a URI of the batch.
    """
    if spec.relabel is None:
        raise ValueError(f"job spec for source {spec.source!r} is not a relabel job; call classify_uris instead")
    durations: dict[str, float] = {}
    started = time.perf_counter()
    source_rows = _source_rows(runtime, spec.relabel, str(spec.source), batch, uris)
    succeeded = [uri for uri in uris if source_rows[uri]["error"] is None]
    vectors = _stored_vectors(runtime, spec, loaded, batch, succeeded)
    durations["read_source"] = time.perf_counter() - started

    started = time.perf_counter()
    label_embeddings = runtime.prompts.get(spec, loaded)  # [labels, dim]
    check_dimension(vectors, label_embeddings, spec)
    image_embeddings = _normalised(vectors).to(label_embeddings.device)
    scored = iter(build_result_rows(succeeded, image_embeddings, label_embeddings, spec, loaded.logit_scale) if succeeded else [])
    rows = [next(scored) if source_rows[uri]["error"] is None else _error_row(source_rows[uri]) for uri in uris]
    durations["score"] = time.perf_counter() - started
    logger.info(
        "Job %s batch %d: %d images scored from the stored embeddings of job %s; no image fetched, image tower not run",
        job_id, batch, len(succeeded), spec.relabel.job_id,
    )
    return rows, durations


def _source_rows(
    runtime: WorkerRuntime, relabel: RelabelSource, folder: str, batch: int, uris: list[str]
) -> dict[str, dict[str, Any]]:
    """Return the source shard's row of each URI. Raises StorageError when a URI has none."""
    location = join_location(folder, shard_name(batch, relabel.format))
    by_uri = {row["uri"]: row for row in read_rows(runtime.storage, location)}
    missing = [uri for uri in uris if uri not in by_uri]
    if missing:
        raise StorageError(
            f"source shard {location!r} has no row for {len(missing)} URIs of the batch, such as {missing[0]!r}; "
            f"the source job {relabel.job_id} changed after the relabel job was submitted, so submit the relabel again"
        )
    return by_uri


def _stored_vectors(runtime: WorkerRuntime, spec: JobSpec, loaded: LoadedModel, batch: int, uris: list[str]) -> np.ndarray:
    """Return the stored vectors of `uris`, `[len(uris), dim]` float32, after checking the file's model."""
    if not uris:
        return np.zeros((0, 0), dtype=np.float32)
    location = embeddings_location(str(spec.source), batch)
    # A missing or invalid file stays so on every retry, so the job fails at once instead.
    if not runtime.storage.exists(location):
        raise RelabelRejected(
            f"embeddings file {location!r} is missing, so the {len(uris)} classified images of batch {batch} cannot "
            "be relabelled; restore the file, or submit a full job with the new labels"
        )
    try:
        stored = decode_embeddings(runtime.storage.get_bytes(location))
    except ValueError as e:
        raise RelabelRejected(f"embeddings file {location!r} is invalid: {e}; restore the file, or submit a full job with the new labels") from e
    check_stored_model(stored, spec, loaded, location)
    by_uri = stored.by_uri()
    missing = [uri for uri in uris if uri not in by_uri]
    if missing:
        raise RelabelRejected(
            f"embeddings file {location!r} has no vector for {len(missing)} classified images, such as {missing[0]!r}; "
            "run the source job again with --store-embeddings"
        )
    return np.stack([by_uri[uri] for uri in uris]).astype(np.float32)


def check_stored_model(stored: StoredEmbeddings, spec: JobSpec, loaded: LoadedModel, location: str) -> None:
    """Raise RelabelRejected when `stored` was written by another model or revision than the job's."""
    if stored.model != spec.model:
        raise RelabelRejected(
            f"embeddings file {location!r} was written by model {stored.model!r}, but the relabel job uses {spec.model!r}; "
            "relabel with the source job's model, or run a full job with this one"
        )
    if stored.model_revision and loaded.revision and stored.model_revision != loaded.revision:
        raise RelabelRejected(
            f"embeddings file {location!r} was written by revision {stored.model_revision!r} of {spec.model!r}, but this "
            f"worker loaded revision {loaded.revision!r}, so its text embeddings do not match; run a full job with the new labels"
        )


def check_dimension(vectors: np.ndarray, label_embeddings: torch.Tensor, spec: JobSpec) -> None:
    """Raise RelabelRejected when the stored vectors and the text embeddings differ in dimension."""
    if vectors.shape[0] and vectors.shape[1] != label_embeddings.shape[1]:
        raise RelabelRejected(
            f"the stored embeddings of {spec.source!r} have {vectors.shape[1]} dimensions, but model {spec.model!r} "
            f"embeds text in {label_embeddings.shape[1]}; relabel with the source job's model"
        )


def _normalised(vectors: np.ndarray) -> torch.Tensor:
    """Return `vectors` as float32 rows of unit L2 norm; rounding to float16 moves norms by up to about 2**-11."""
    tensor = torch.from_numpy(vectors)
    if tensor.shape[0] == 0:
        return tensor
    return tensor / tensor.norm(p=2, dim=-1, keepdim=True)


def _error_row(source: dict[str, Any]) -> dict[str, Any]:
    """Return the source job's error row of an image, unchanged but for the empty result fields."""
    return {"uri": source["uri"], "label": None, "score": None, "top_k": [], "error": dict(source["error"])}
