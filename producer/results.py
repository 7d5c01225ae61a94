"""Result shards and the job summary in object storage.

Layout: `{output}/{job_id}/part-{batch:06d}.jsonl`, one shard per batch, and `{output}/{job_id}/_SUCCESS.json`,
written once when every batch has finished.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from producer.constants import SHARD_NAME, STATE_CANCELLED, SUCCESS_MARKER
from producer.errors import StorageError
from producer.spec import JobSpec
from producer.state import JobStore
from producer.storage import Storage, join_location

logger = logging.getLogger(__name__)


def job_output(spec: JobSpec, job_id: str) -> str:
    return join_location(spec.output, job_id)


def shard_location(spec: JobSpec, job_id: str, batch: int) -> str:
    return join_location(spec.output, job_id, SHARD_NAME.format(batch=batch))


def write_shard(storage: Storage, spec: JobSpec, job_id: str, batch: int, rows: list[dict[str, Any]]) -> str:
    """Write one batch's rows, replacing an earlier shard of the same batch. Idempotent. Returns the location."""
    location = shard_location(spec, job_id, batch)
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    storage.put_bytes(location, body, content_type="application/x-ndjson")
    return location


def iter_results(storage: Storage, spec: JobSpec, job_id: str) -> Iterator[dict[str, Any]]:
    """Yield every result row of a job, shard by shard in batch order."""
    folder = job_output(spec, job_id)
    for name in storage.list_names(folder):
        if name.startswith("part-") and name.endswith(".jsonl"):
            text = storage.get_bytes(join_location(folder, name)).decode()
            # Split at "\n" only: rows hold U+2028 and U+0085 unescaped, and str.splitlines splits at both.
            for line in text.split("\n"):
                if line:
                    yield json.loads(line)


def finalize_job(store: JobStore, storage: Storage, job_id: str) -> bool:
    """Write `_SUCCESS.json` and mark the job succeeded, once per job.

    Call it when `JobStore.record_batch` or `JobStore.finish_listing` reports that the job completed.
    Returns False when another process already finalized it, or the job was cancelled.
    """
    # NOTE: a cancel that lands between this check and mark_succeeded is overwritten by "succeeded".
    if store.state(job_id) == STATE_CANCELLED:
        logger.info("Job %s was cancelled; no success marker is written", job_id)
        return False
    if not store.claim_finalization(job_id):
        return False
    finished_at = time.time()
    summary = build_summary(store, job_id, finished_at)
    spec = store.spec(job_id)
    marker = join_location(job_output(spec, job_id), SUCCESS_MARKER)
    try:
        storage.put_bytes(marker, json.dumps(summary, indent=2, ensure_ascii=False).encode(), "application/json")
    except StorageError as e:
        logger.exception("Job %s: writing %s failed; the job is marked failed", job_id, marker)
        store.fail(job_id, f"writing {marker} failed: {e}")
        return False
    store.mark_succeeded(job_id, finished_at)
    logger.info("Job %s finished: %d succeeded, %d failed", job_id, summary["succeeded"], summary["failed"])
    return True


def build_summary(store: JobStore, job_id: str, finished_at: float) -> dict[str, Any]:
    fields = store.fields(job_id)
    spec = JobSpec.model_validate_json(fields["spec"])
    return {
        "job_id": job_id,
        "total": int(fields["total"]),
        "succeeded": int(fields["succeeded"]),
        "failed": int(fields["failed"]),
        "skipped": int(fields["skipped"]),
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
