"""Job control: listing jobs, cancelling with a summary in `_CANCELLED.json`, and the text that `status`,
`jobs` and `wait --progress` print.

Workers import this module to rewrite the cancel summary, so it imports neither Celery nor the client.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, TextIO

from producer.constants import (
    CANCELLED_MARKER,
    FINAL_STATES,
    JOBS_INDEX_KEY,
    STATE_CANCELLED,
    STATE_QUEUED,
    STATE_RUNNING,
)
from producer.errors import StorageError
from producer.messages import InvalidJobId, check_job_id
from producer.results import build_summary, job_output
from producer.state import PRODUCER_LOST, JobStatus, JobStore
from producer.storage import Storage, join_location

logger = logging.getLogger(__name__)

JOB_STATES = (STATE_QUEUED, STATE_RUNNING, *FINAL_STATES)
LISTING = "listing…"
# Job ids read from the index per Redis round trip while listing jobs.
LIST_CHUNK = 100
# Writes of `_CANCELLED.json` in one call at most, when batches keep being counted while it is written.
MAX_SUMMARY_WRITES = 5
# Seconds between progress lines when the output is not a terminal, so that logs stay short.
PROGRESS_LOG_INTERVAL_S = 5.0
PROGRESS_BAR_WIDTH = 20


# --- Listing ---------------------------------------------------------------------------------------------


def list_jobs(store: JobStore, limit: int = 20, state: str | None = None, now: float | None = None) -> list[JobStatus]:
    """Return up to `limit` jobs of the jobs index, newest first, only those in `state` when it is given.

    Ids whose job hash is gone (deleted, or lost in a restart of a Redis without persistence) are left out
    and removed from the index. Raises ValueError for a `limit` below 1 or an unknown state.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit!r}")
    if state is not None and state not in JOB_STATES:
        raise ValueError(f"unknown job state {state!r}: use one of {', '.join(JOB_STATES)}")
    found: list[JobStatus] = []
    seen: set[str] = set()
    offset = 0
    while raw := store.redis.zrevrange(JOBS_INDEX_KEY, offset, offset + LIST_CHUNK - 1):
        # A job created meanwhile shifts the ranks by one, so an id may come twice.
        job_ids = [job_id for job_id in _valid_ids(raw) if job_id not in seen]
        seen.update(job_ids)
        statuses = store.statuses(job_ids, now)
        missing_ids = [job_id for job_id in job_ids if statuses[job_id] is None]
        if missing_ids:
            logger.info("Removing %d ids without a job hash from the jobs index, such as %s", len(missing_ids), missing_ids[0])
            store.redis.zrem(JOBS_INDEX_KEY, *missing_ids)
        # The removed ids no longer take up ranks, so the next chunk starts that much earlier.
        offset += len(raw) - len(missing_ids)
        for job_id in job_ids:
            status = statuses[job_id]
            if status is None or (state is not None and status.state != state):
                continue
            found.append(status)
            if len(found) == limit:
                return found
    return found


def _valid_ids(raw: list[bytes]) -> list[str]:
    """Return the ids of a chunk of the jobs index. Invalid ids are logged and skipped."""
    job_ids = []
    for item in raw:
        job_id = item.decode(errors="replace")
        try:
            job_ids.append(check_job_id(job_id))
        except InvalidJobId:
            logger.warning("Skipping %r in the jobs index: it is not a valid job id", job_id)
    return job_ids


# --- Cancel summary --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CancelSummary:
    """The contents of `_CANCELLED.json`, its location, and whether writing it succeeded."""

    summary: dict[str, Any]
    location: str
    written: bool


def cancel_job(store: JobStore, storage: Storage, job_id: str) -> CancelSummary | None:
    """Cancel a job and write its `_CANCELLED.json`. Returns None when the job had already ended or is
    being finalized (see `JobStore.cancel`).

    A failed write is logged and reported as `written=False`, because the job stays cancelled all the same.
    Raises JobNotFound.
    """
    if not store.cancel(job_id):
        return None
    try:
        written = write_cancel_summary(store, storage, job_id)
    except StorageError as e:
        logger.warning("Job %s was cancelled, but writing %s failed: %s", job_id, CANCELLED_MARKER, e)
        written = None
    # None also when a retry round started right after the cancel, so the job is no longer cancelled.
    return written or CancelSummary(build_cancel_summary(store, job_id), cancel_marker_location(store, job_id), written=False)


def refresh_cancel_summary(store: JobStore, storage: Storage, job_id: str) -> None:
    """Rewrite `_CANCELLED.json` when the job is cancelled. Workers call it after counting a batch, and
    the producer after it finished listing, since both change the summary's counts.

    Errors are logged and not raised, because what changed the counts has happened already.
    """
    try:
        if store.state(job_id) == STATE_CANCELLED:
            write_cancel_summary(store, storage, job_id)
    except Exception:  # noqa: BLE001 - the summary is a convenience, the counted batch matters more
        logger.warning("Job %s: rewriting %s failed", job_id, CANCELLED_MARKER, exc_info=True)


def write_cancel_summary(store: JobStore, storage: Storage, job_id: str) -> CancelSummary | None:
    """Write `{output}/{job_id}/_CANCELLED.json` for a cancelled job. Returns None when it is not cancelled.

    Workers may count batches that were past their last cancel check while this runs. So after each write
    the batch counters are read again, and the summary is written again (MAX_SUMMARY_WRITES times at most)
    until they did not change. Any later count calls `refresh_cancel_summary`, so the last write wins with
    exact numbers. Raises StorageError when a write fails.
    """
    location = cancel_marker_location(store, job_id)
    summary: dict[str, Any] = {}
    for _ in range(MAX_SUMMARY_WRITES):
        before = _batch_progress(store.fields(job_id))
        if before[0] != STATE_CANCELLED:
            return None
        summary = build_cancel_summary(store, job_id)
        storage.put_bytes(location, json.dumps(summary, indent=2, ensure_ascii=False).encode(), "application/json", job_id=job_id)
        if _batch_progress(store.fields(job_id)) == before:
            return CancelSummary(summary, location, written=True)
    logger.warning("Job %s: batches were still being counted after %d writes of %s", job_id, MAX_SUMMARY_WRITES, CANCELLED_MARKER)
    return CancelSummary(summary, location, written=True)


def build_cancel_summary(store: JobStore, job_id: str) -> dict[str, Any]:
    """Return the contents of `_CANCELLED.json`: the fields of `_SUCCESS.json` (see `build_summary`) and
    `state`, `batches_done` and `batches_total`.

    `total` and `batches_total` are None while the producer is still listing. `finished_at` is the time of
    the cancel.
    """
    fields = store.fields(job_id)
    listing_done = fields.get("listing_done") == "1"
    finished_at = float(fields.get("finished_at") or time.time())
    summary = build_summary(store, job_id, finished_at)
    summary["total"] = summary["total"] if listing_done else None
    summary["state"] = fields["state"]
    summary["batches_done"] = int(fields.get("batches_done", 0))
    summary["batches_total"] = int(fields["batches_total"]) if listing_done else None
    return summary


def cancel_marker_location(store: JobStore, job_id: str) -> str:
    return join_location(job_output(store.spec(job_id), job_id), CANCELLED_MARKER)


def _batch_progress(fields: dict[str, str]) -> tuple[str, ...]:
    """Return the job fields that change when a batch is counted or listing ends, to detect a stale summary."""
    names = ("state", "batches_done", "round_batches_done", "listing_done", "batches_total")
    return tuple(fields.get(name, "") for name in names)


# --- Text ------------------------------------------------------------------------------------------------


def status_dict(status: JobStatus) -> dict[str, Any]:
    """Return the JSON object that `clipfleet status --json` and `clipfleet wait` print."""
    return {
        "job_id": status.job_id,
        "state": status.state,
        "total": status.total,
        "done": status.done,
        "succeeded": status.succeeded,
        "failed": status.failed,
        "skipped": status.skipped,
        "skipped_existing": status.skipped_existing,
        "images_per_s": _rounded(status.images_per_s, 2),
        "eta_s": _rounded(status.eta_s, 1),
        "error": status.error,
        "errors": status.errors,
        "retries": status.retries,
        "retries_total": status.retries_total,
        "giveups": status.giveups,
        "redeliveries": status.redeliveries,
        "retry_round": status.retry_round,
        "round_batches_done": status.round_batches_done,
        "round_batches_total": status.round_batches_total,
        "images_per_s_last_minute": _rounded(status.images_per_s_last_minute, 2),
        "listing": status.listing,
        "listed": status.listed,
        "producer": status.producer,
        "source": status.source,
        "created_at": status.created_at,
        "started_at": status.started_at,
        "finished_at": status.finished_at,
    }


def describe_source(source: str | list[str] | None) -> str:
    """Return a job's source for a table: the source, or the first of several and how many more."""
    if isinstance(source, list):
        return source[0] if len(source) == 1 else f"{source[0]} (and {len(source) - 1} more)"
    return source or "-"


def format_status(status: JobStatus, output: str) -> str:
    """Return the readable summary that `clipfleet status` prints, one field per line. `output` is the
    job's result folder."""
    lines = [f"job {status.job_id}: {status.state}"]
    if status.error:
        lines.append(f"  error:       {status.error}")
    lines.append(f"  total:       {_total_text(status)}")
    lines.append(f"  done:        {status.done:,} ({status.succeeded:,} classified, {status.failed:,} failed)")
    lines.append(f"  failed:      {status.failed:,}{_codes_text(status.errors)}")
    lines.append(f"  skipped:     {status.skipped:,} (not images)")
    if status.skipped_existing:
        lines.append(f"  skipped:     {status.skipped_existing:,} (classified by earlier jobs)")
    lines.append(f"  rate:        {_rate_text(status)}")
    lines.append(f"  ETA:         {format_duration(status.eta_s)}")
    lines.append(f"  producer:    {_producer_text(status)}")
    retries = ", ".join(f"{kind} {count:,}" for kind, count in status.retries.items())
    lines.append(f"  retries:     {status.retries_total:,}{f' ({retries})' if retries else ''}; redeliveries: {status.redeliveries:,}")
    if status.retry_round:
        lines.append(f"  retry round: {status.retry_round}, {status.round_batches_done:,} of {status.round_batches_total:,} batches done")
    lines.append(f"  results:     {output}")
    return "\n".join(lines)


def format_jobs(statuses: list[JobStatus], now: float | None = None) -> str:
    """Return the table that `clipfleet jobs` prints: a header and one line per job."""
    now = time.time() if now is None else now
    header = ("JOB", "STATE", "DONE/TOTAL", "FAILED", "IMAGES/S (1 MIN)", "ETA", "AGE", "SOURCE")
    rows = [header]
    for status in statuses:
        total = LISTING if status.total is None else f"{status.total:,}"
        rate = "-" if status.images_per_s_last_minute is None else f"{status.images_per_s_last_minute:.1f}"
        rows.append((
            status.job_id, status.state, f"{status.done:,}/{total}", f"{status.failed:,}", rate,
            format_duration(status.eta_s), format_duration(now - status.created_at), describe_source(status.source),
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]) for row in rows)


def format_progress(status: JobStatus) -> str:
    """Return one progress line: a bar once the total is known, done/total, failed, the rate over the last
    minute and the ETA."""
    if status.total is None:
        counts = f"{status.done:,}/{LISTING} images ({status.listed:,} enqueued)"
    else:
        counts = f"{_bar(status.done, status.total)} {status.done:,}/{status.total:,} images"
    rate = "-" if status.images_per_s_last_minute is None else f"{status.images_per_s_last_minute:.1f}"
    return f"{status.state}: {counts}, {status.failed:,} failed, {rate} images/s (last minute), ETA {format_duration(status.eta_s)}"


def format_duration(seconds: float | None) -> str:
    """Return a duration such as `45 s`, `12 min 5 s`, `3 h 20 min` or `2 d 4 h`, or `-` for None."""
    if seconds is None:
        return "-"
    whole = max(int(round(seconds)), 0)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def _total_text(status: JobStatus) -> str:
    if status.total is None:
        return f"{LISTING} ({status.listed:,} images enqueued so far)"
    return f"{status.total:,}"


def _codes_text(errors: dict[str, int]) -> str:
    if not errors:
        return ""
    ordered = sorted(errors.items(), key=lambda item: (-item[1], item[0]))
    return " (" + ", ".join(f"{code} {count:,}" for code, count in ordered) + ")"


def _rate_text(status: JobStatus) -> str:
    last_minute = "-" if status.images_per_s_last_minute is None else f"{status.images_per_s_last_minute:.1f}"
    average = "-" if status.images_per_s is None else f"{status.images_per_s:.1f}"
    return f"{last_minute} images/s over the last minute, {average} images/s on average"


def _producer_text(status: JobStatus) -> str:
    if status.producer == PRODUCER_LOST:
        return (
            f"{PRODUCER_LOST}: the producer stopped before it enqueued every batch; "
            f"run `clipfleet resume {status.job_id}` to enqueue the rest"
        )
    return status.producer


def _bar(done: int, total: int) -> str:
    filled = PROGRESS_BAR_WIDTH if total <= 0 else min(PROGRESS_BAR_WIDTH, PROGRESS_BAR_WIDTH * done // total)
    return "[" + "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled) + "]"


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class ProgressLine:
    """Draws `format_progress` lines for `Job.wait` on a text stream. Not thread-safe.

    On a terminal the line is redrawn in place at each update. Elsewhere (a pipe, a log file) a new line is
    written when the counts or the state changed, at most every `log_interval_s` seconds, and the last
    status is always written by `close`.
    """

    def __init__(self, stream: TextIO, log_interval_s: float = PROGRESS_LOG_INTERVAL_S) -> None:
        self._stream = stream
        self._terminal = _is_terminal(stream)
        self._log_interval_s = log_interval_s
        self._last_written_key: tuple[Any, ...] | None = None
        self._last_written_at = float("-inf")
        self._pending: str | None = None
        self._width = 0

    def update(self, status: JobStatus) -> None:
        text = format_progress(status)
        if self._terminal:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self._stream.flush()
            return
        key = (status.state, status.total, status.done, status.failed)
        self._pending = None if key == self._last_written_key else text
        if self._pending is not None and time.monotonic() - self._last_written_at >= self._log_interval_s:
            self._write_line(text, key)

    def close(self) -> None:
        if self._terminal:
            self._stream.write("\n")
        elif self._pending is not None:
            self._stream.write(self._pending + "\n")
        self._stream.flush()

    def _write_line(self, text: str, key: tuple[Any, ...]) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()
        self._last_written_key = key
        self._last_written_at = time.monotonic()
        self._pending = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
