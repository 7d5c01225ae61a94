"""Result shards and the job summary in object storage.

Layout: `{output}/{job_id}/part-{batch:06d}.jsonl` (or `.parquet` for a job with `format="parquet"`), one
shard per batch, and `{output}/{job_id}/_SUCCESS.json`, written when every batch has finished, and written
again at the end of each retry round. `producer.formats` encodes and decodes the shards.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from producer.constants import REDELIVERIES_FIELD, STATE_CANCELLED, SUCCESS_MARKER
from producer.errors import StorageError
from producer.formats import (
    CONTENT_TYPES,
    decode_shard,
    encode_shard,
    parse_shard_name,
    shard_name,
)
from producer.spec import JobSpec
from producer.state import JobStore, error_counts, giveup_counts, retry_counts
from producer.storage import Storage, join_location

logger = logging.getLogger(__name__)


def job_output(spec: JobSpec, job_id: str) -> str:
    return join_location(spec.output, job_id)


def shard_location(spec: JobSpec, job_id: str, batch: int) -> str:
    return join_location(spec.output, job_id, shard_name(batch, spec.format))


def write_shard(storage: Storage, spec: JobSpec, job_id: str, batch: int, rows: list[dict[str, Any]]) -> str:
    """Write one batch's rows in the job's format, replacing an earlier shard of the same batch. Idempotent.

    Returns the location. Raises StorageError when the write fails, and ValueError when a Parquet job's row
    does not match `producer.formats.RESULT_SCHEMA`.
    """
    location = shard_location(spec, job_id, batch)
    body = encode_shard(rows, spec.format)
    storage.put_bytes(location, body, content_type=CONTENT_TYPES[spec.format], job_id=job_id, batch=batch)
    return location


def iter_results(storage: Storage, spec: JobSpec, job_id: str) -> Iterator[dict[str, Any]]:
    """Yield every result row of a job, shard by shard in batch order."""
    for _, rows in iter_shards(storage, spec, job_id):
        yield from rows


def iter_shards(storage: Storage, spec: JobSpec, job_id: str) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Yield `(batch, rows)` for each shard of a job in batch order, reading one shard at a time.

    Reads shards of either format. Raises StorageError when a shard cannot be read or decoded, or when the
    job's folder contains shards of both formats.
    """
    folder = job_output(spec, job_id)
    for batch, name in list_shards(storage, folder):
        yield batch, read_rows(storage, join_location(folder, name))


def list_shards(storage: Storage, folder: str) -> list[tuple[int, str]]:
    """Return `(batch, file name)` of every shard directly in `folder`, sorted by batch number.

    Raises StorageError naming the folder when it contains shards of both formats, since each job writes one.
    """
    shards: list[tuple[int, str]] = []
    names_by_format: dict[str, str] = {}
    for name in storage.list_names(folder):
        parsed = parse_shard_name(name)
        if parsed is not None:
            shards.append((parsed[0], name))
            names_by_format.setdefault(parsed[1], name)
    if len(names_by_format) > 1:
        examples = " and ".join(sorted(names_by_format.values()))
        raise StorageError(
            f"result folder {folder!r} contains shards of both formats (such as {examples}); a job writes one format, "
            "so move the shards that another job or tool wrote out of the folder"
        )
    # Sorted by number, because `part-1000000` sorts before `part-100001` as text.
    return sorted(shards)


class ShardBitmap:
    """The batch numbers that have a shard in a job's folder, one bit each, so memory is one byte per 8 batches."""

    def __init__(self) -> None:
        self._bits = bytearray()

    @classmethod
    def of_folder(cls, storage: Storage, folder: str) -> "ShardBitmap":
        """Read the shard names of `folder` (an S3 prefix or a local folder) as a stream. Raises StorageError."""
        bitmap = cls()
        for name in storage.iter_names(folder):
            parsed = parse_shard_name(name)
            if parsed is not None:
                bitmap.add(parsed[0])
        return bitmap

    def add(self, batch: int) -> None:
        index, bit = divmod(batch, 8)
        if index >= len(self._bits):
            self._bits.extend(bytes(index + 1 - len(self._bits)))
        self._bits[index] |= 1 << bit

    def __contains__(self, batch: object) -> bool:
        if not isinstance(batch, int) or batch < 0:
            return False
        index, bit = divmod(batch, 8)
        return index < len(self._bits) and bool(self._bits[index] & (1 << bit))


def read_shard(storage: Storage, spec: JobSpec, job_id: str, batch: int) -> list[dict[str, Any]]:
    """Return the rows of one batch's shard, in the job's format. Raises StorageError when it cannot be read
    or decoded, a missing shard included."""
    return read_rows(storage, shard_location(spec, job_id, batch))


def read_rows(storage: Storage, location: str) -> list[dict[str, Any]]:
    """Return the rows of the shard at `location`, in either format. Raises StorageError naming the location."""
    body = storage.get_bytes(location)
    try:
        return parse_shard(body)
    except ValueError as e:
        raise StorageError(f"shard {location!r} is not a valid result shard: {e}; remove or replace the file, or submit the job again") from e


def parse_shard(body: bytes) -> list[dict[str, Any]]:
    """Return the rows of a JSONL or Parquet shard. Raises ValueError for bytes that are neither."""
    return decode_shard(body)


def count_rows(rows: Iterable[dict[str, Any]]) -> tuple[int, int, dict[str, int]]:
    """Return `(succeeded, failed, {error code: rows})` of result rows."""
    succeeded = 0
    errors: Counter[str] = Counter()
    for row in rows:
        if row["error"] is None:
            succeeded += 1
        else:
            errors[row["error"]["code"]] += 1
    return succeeded, sum(errors.values()), dict(errors)


def replace_rows(rows: list[dict[str, Any]], replacements: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Return `rows` with each row whose URI has a replacement swapped for it, in the same order.

    Also returns the URIs of replacements that match no row; they are not added, so the shard keeps exactly
    one row per input.
    """
    by_uri = {row["uri"]: row for row in replacements}
    merged = [by_uri.get(row["uri"], row) for row in rows]
    present = {row["uri"] for row in rows}
    return merged, [uri for uri in by_uri if uri not in present]


def finalize_job(store: JobStore, storage: Storage, job_id: str) -> bool:
    """Write `_SUCCESS.json` and mark the job succeeded, once per job and retry round.

    Call it when `JobStore.record_batch`, `JobStore.record_retry_batch` or `JobStore.finish_listing` reports
    that the job or its current round completed. Returns False when another process already finalized this
    round, or the job was cancelled.
    """
    # JobStore.cancel rejects a job whose batches are all counted, so no cancel lands after this check.
    fields = store.fields(job_id)
    if fields["state"] == STATE_CANCELLED:
        logger.info("Job %s was cancelled; no success marker is written", job_id)
        return False
    if not store.claim_finalization(job_id, int(fields.get("retry_round", 0))):
        return False
    finished_at = time.time()
    summary = build_summary(store, job_id, finished_at)
    spec = store.spec(job_id)
    marker = join_location(job_output(spec, job_id), SUCCESS_MARKER)
    try:
        storage.put_bytes(marker, json.dumps(summary, indent=2, ensure_ascii=False).encode(), "application/json", job_id=job_id)
    except StorageError as e:
        logger.exception("Job %s: writing %s failed; the job is marked failed", job_id, marker)
        store.fail(job_id, f"writing {marker} failed: {e}")
        return False
    store.mark_succeeded(job_id, finished_at)
    logger.info(
        "Job %s finished round %d: %d succeeded, %d failed", job_id, summary["retry_round"], summary["succeeded"], summary["failed"]
    )
    return True


def build_summary(store: JobStore, job_id: str, finished_at: float) -> dict[str, Any]:
    """Return the contents of `_SUCCESS.json`: counts by outcome and error code, retries, and the job's spec."""
    fields = store.fields(job_id)
    spec = JobSpec.model_validate_json(fields["spec"])
    retries = retry_counts(fields)
    return {
        "job_id": job_id,
        "total": int(fields["total"]),
        "succeeded": int(fields["succeeded"]),
        "failed": int(fields["failed"]),
        "skipped": int(fields["skipped"]),
        "skipped_existing": int(fields.get("skipped_existing") or 0),
        "errors": error_counts(fields),
        "retries": retries,
        "retries_total": sum(retries.values()),
        "giveups": giveup_counts(fields),
        "redeliveries": int(fields.get(REDELIVERIES_FIELD, 0)),
        "retry_round": int(fields.get("retry_round", 0)),
        "model": spec.model,
        "model_revision": fields.get("model_revision") or spec.model_revision,
        "labels": spec.label_names,
        "prompts": spec.prompts,
        "templates": spec.templates,
        "template_set": spec.template_set,
        "top_k": spec.top_k,
        "multi_label": spec.multi_label,
        "threshold": spec.threshold,
        "source": spec.source,
        "output": job_output(spec, job_id),
        "created_at": _iso(float(fields["created_at"])),
        "started_at": _iso(float(fields["started_at"])) if fields.get("started_at") else None,
        "finished_at": _iso(finished_at),
    }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")
