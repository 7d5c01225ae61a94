"""Relabel jobs: new labels scored against a finished job's stored image embeddings.

A relabel job's `source` is the source job's result folder and its `relabel` field names that job. Its
batches are the source job's batches, same numbers and same URIs, so the producer lists the source
shards instead of images (`iter_relabel_uris`). Workers read each batch's embeddings file and shard
(`workers.relabel`), so no image is fetched and the image tower does not run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from producer.compact import COMPACTED_FOLDER, MANIFEST_NAME
from producer.constants import STATE_QUEUED, STATE_RUNNING, STATE_SUCCEEDED
from producer.embeddings import embeddings_name
from producer.errors import ClipfleetError
from producer.results import job_output, list_shards, read_rows
from producer.sources import ListingStats
from producer.spec import JobSpec, build_spec
from producer.state import JobStore
from producer.storage import Storage, join_location

if TYPE_CHECKING:
    from producer.settings import Settings

logger = logging.getLogger(__name__)


class RelabelNotPossible(ClipfleetError):
    """The source job has no usable stored embeddings for the requested relabel job; nothing was enqueued."""


def check_relabel_source(store: JobStore, storage: Storage, job_id: str, model: str | None, model_revision: str | None) -> JobSpec:
    """Return the spec of source job `job_id` after checking that a relabel job can use its embeddings.

    `model` and `model_revision` are the ones requested for the relabel job, None for the source job's.
    Raises JobNotFound for an unknown job, and RelabelNotPossible for a job that stored no embeddings,
    has not succeeded, was run with another model or revision, or misses shards.
    """
    source = store.spec(job_id)
    if not source.store_embeddings:
        raise RelabelNotPossible(
            f"job {job_id} was run without --store-embeddings, so it has no stored embeddings to relabel; "
            "run it again with --store-embeddings, or submit a full job with the new labels"
        )
    state = store.state(job_id)
    if state != STATE_SUCCEEDED:
        fix = "wait for it to finish (`clipfleet wait`)" if state in (STATE_QUEUED, STATE_RUNNING) else "submit it again with --store-embeddings, or `clipfleet submit --resume` it"
        raise RelabelNotPossible(f"job {job_id} is {state}: only a succeeded job has an embeddings file for every batch; {fix}")
    if model is not None and model != source.model:
        raise RelabelNotPossible(
            f"job {job_id} stored embeddings of model {source.model!r}, not {model!r}: text and image embeddings "
            "of different models cannot be compared; leave --model out, or submit a full job with the new model"
        )
    revision = store.fields(job_id).get("model_revision") or source.model_revision
    known = {source.model_revision, revision} - {None, ""}
    if model_revision is not None and known and model_revision not in known:
        raise RelabelNotPossible(
            f"job {job_id} stored embeddings of revision {revision!r} of {source.model!r}, not {model_revision!r}; "
            "unset CLIPFLEET_MODEL_REVISION or set it to the source job's revision"
        )
    _check_shards(store, storage, job_id, source)
    return source


def _check_shards(store: JobStore, storage: Storage, job_id: str, source: JobSpec) -> None:
    """Raise RelabelNotPossible when a batch of the source job has no shard, since its rows would be lost, or
    has classified images but no embeddings file."""
    batches_total = int(store.fields(job_id).get("batches_total") or 0)
    folder = job_output(source, job_id)
    names = set(storage.list_names(folder))
    found = {batch for batch, _ in list_shards(storage, folder)}
    missing = sorted(set(range(batches_total)) - found)
    if missing and storage.exists(join_location(folder, f"{COMPACTED_FOLDER}/{MANIFEST_NAME}")):
        raise RelabelNotPossible(
            f"job {job_id} has no shard for {len(missing)} of its {batches_total} batches, such as batch {missing[0]}, "
            "because `clipfleet compact --delete-shards` removed them; relabel reads each batch's shard with its "
            "embeddings file, so submit a full job with the new labels"
        )
    if missing:
        raise RelabelNotPossible(
            f"job {job_id} has no shard for {len(missing)} of its {batches_total} batches, such as batch {missing[0]}; "
            "restore its shards or submit a full job with the new labels"
        )
    for batch, name in list_shards(storage, folder):
        if embeddings_name(batch) in names:
            continue
        # A batch stopped by the delivery cap before its model ran has only error rows and no embeddings file.
        if any(row["error"] is None for row in read_rows(storage, join_location(folder, name))):
            raise RelabelNotPossible(
                f"job {job_id} has no embeddings file {embeddings_name(batch)!r} for batch {batch}, whose shard lists "
                f"classified images, in {folder!r}; restore the file or submit a full job with the new labels"
            )


def relabel_spec(
    settings: "Settings",
    store: JobStore,
    storage: Storage,
    job_id: str,
    labels: Sequence[str] | Mapping[str, Sequence[str]],
    output: str,
    *,
    model: str | None = None,
    **options: Any,
) -> JobSpec:
    """Return the spec of a job that scores job `job_id`'s stored embeddings against `labels`.

    `options` are the scoring options of `producer.client.make_spec` (templates, top_k, format,
    template_set, threshold, multi_label). The model, its revision and the batch size are the source
    job's. Raises RelabelNotPossible (see `check_relabel_source`) and InvalidJobSpec as `make_spec` does.
    """
    from producer.client import make_spec  # producer.client imports this module

    source = check_relabel_source(store, storage, job_id, model, settings.model_revision)
    folder = job_output(source, job_id)
    checked = make_spec(settings, folder, labels, output, model=source.model, batch_size=source.batch_size, **options)
    # The revision the source job's workers resolved, so the text tower is the one that wrote the embeddings.
    # NOTE: a hub model submitted without a revision is then cached by workers twice, under None and under
    # its commit hash, while both kinds of job run (workers keep the last two models used).
    revision = store.fields(job_id).get("model_revision") or source.model_revision
    fields = {**checked.model_dump(), "model_revision": revision, "relabel": {"job_id": job_id, "format": source.format}}
    return build_spec(**fields)


def iter_relabel_uris(storage: Storage, spec: JobSpec, stats: ListingStats) -> Iterator[str]:
    """Yield the URIs of the source job's shards in batch order, so that cutting them into `spec.batch_size`
    batches gives back the source job's batches. Counts each URI in `stats.listed`.

    Raises RelabelNotPossible when a shard other than the last has fewer rows than the batch size, and
    StorageError when a shard cannot be read.
    """
    shards = list_shards(storage, str(spec.source))
    for position, (batch, name) in enumerate(shards):
        rows = read_rows(storage, join_location(str(spec.source), name))
        is_last = position == len(shards) - 1
        if batch != position or (not is_last and len(rows) != spec.batch_size):
            raise RelabelNotPossible(
                f"source shard {name!r} in {spec.source!r} does not line up with batches of {spec.batch_size} images "
                f"(position {position}, {len(rows)} rows); its job's shards were changed, so submit a full job instead"
            )
        for row in rows:
            stats.listed += 1
            yield row["uri"]
