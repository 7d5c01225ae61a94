"""Result shards and the job summary in object storage.

Layout: `{output}/{job_id}/part-{batch:06d}.jsonl`, one shard per batch, and `{output}/{job_id}/_SUCCESS.json`,
written when every batch has finished, and written again at the end of each retry round.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from producer.constants import REDELIVERIES_FIELD, SHARD_NAME, STATE_CANCELLED, SUCCESS_MARKER
from producer.errors import StorageError
from producer.spec import JobSpec
from producer.state import JobStore, error_counts, giveup_counts, retry_counts
from producer.storage import Storage, join_location

logger = logging.getLogger(__name__)

SHARD_NAME_RE = re.compile(r"^part-(\d{6,})\.jsonl$")


def job_output(spec: JobSpec, job_id: str) -> str:
    return join_location(spec.output, job_id)


def shard_location(spec: JobSpec, job_id: str, batch: int) -> str:
    return join_location(spec.output, job_id, SHARD_NAME.format(batch=batch))


def write_shard(storage: Storage, spec: JobSpec, job_id: str, batch: int, rows: list[dict[str, Any]]) -> str:
    """Write one batch's rows, replacing an earlier shard of the same batch. Idempotent. Returns the location."""
    location = shard_location(spec, job_id, batch)
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    storage.put_bytes(location, body, content_type="application/x-ndjson", job_id=job_id, batch=batch)
    return location


def iter_results(storage: Storage, spec: JobSpec, job_id: str) -> Iterator[dict[str, Any]]:
    """Yield every result row of a job, shard by shard in batch order."""
    for _, rows in iter_shards(storage, spec, job_id):
        yield from rows


def iter_shards(storage: Storage, spec: JobSpec, job_id: str) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Yield `(batch, rows)` for each shard of a job in batch order, reading one shard at a time."""
    folder = job_output(spec, job_id)
    for name in storage.list_names(folder):
        match = SHARD_NAME_RE.match(name)
        if match:
            yield int(match.group(1)), parse_shard(storage.get_bytes(join_location(folder, name)))


def read_shard(storage: Storage, spec: JobSpec, job_id: str, batch: int) -> list[dict[str, Any]]:
    """Return the rows of one batch's shard. Raises StorageError when it cannot be read, a missing shard included."""
    return parse_shard(storage.get_bytes(shard_location(spec, job_id, batch)))


def parse_shard(body: bytes) -> list[dict[str, Any]]:
    # Split at "\n" only: rows hold U+2028 and U+0085 unescaped, and str.splitlines splits at both.
    return [json.loads(line) for line in body.decode().split("\n") if line]


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
        "source": spec.source,
        "output": job_output(spec, job_id),
        "created_at": _iso(float(fields["created_at"])),
        "started_at": _iso(float(fields["started_at"])) if fields.get("started_at") else None,
        "finished_at": _iso(finished_at),
    }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")
