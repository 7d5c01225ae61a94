"""The Python API: submit a job, follow it, read its results."""

from __future__ import annotations

import itertools
import logging
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from producer.checkpoint import LeaseLost
from producer.constants import (
    CANCELLED_MARKER,
    ERROR_CODES,
    FINAL_STATES,
    SHARD_NAMES,
    STATE_CANCELLED,
    STATE_SUCCEEDED,
)
from producer.enqueue import (
    ListingCheckpoint,
    check_log_path,
    detached_log_path,
    enqueue_listing,
    index_spec,
    job_for_spec,
    restart_job,
    spawn_producer,
    spec_digest,
    verify_listing,
)
from producer.errors import ClipfleetError, InvalidJobSpec, SourceError
from producer.jobs import ProgressLine, cancel_job, list_jobs, refresh_cancel_summary
from producer.lease import ProducerLease
from producer.messages import BatchMessage, check_job_id
from producer.queue import BatchSender, make_celery
from producer.redact import redact_url
from producer.results import (
    ShardBitmap,
    count_rows,
    finalize_job,
    iter_results,
    iter_shards,
    job_output,
    read_shard,
)
from producer.settings import Settings
from producer.skip import ClassifiedUris, check_skip_existing
from producer.sources import ListingStats, is_read_at_submit, iter_sources
from producer.spec import JobSpec, build_spec, check_job_size, find_long_prompts
from producer.state import (
    PRODUCER_LOST,
    JobStatus,
    JobStore,
    RetryNotStarted,
    batch_counts_json,
)
from producer.storage import Storage, join_location
from producer.uris import is_s3_uri, parse_s3_uri

logger = logging.getLogger(__name__)

REDIS_OUTAGE_S = 60.0


class ProducerBusy(ClipfleetError):
    """Another producer holds the job's lease, so this one does not enqueue it."""


class ProducerLost(ClipfleetError):
    """A job's listing is unfinished and no producer is enqueueing it, so waiting for it would never end."""


class ResumeNotPossible(ClipfleetError):
    """The job cannot be resumed in its state; the message tells the user what to do instead."""


class Client:
    """Submits jobs to the Redis queue that the workers read, and looks jobs up by id."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        if not self.settings.redis_url:
            raise ClipfleetError(
                "CLIPFLEET_REDIS_URL is not set: point it at the Redis the workers use "
                "(for example redis://localhost:6379/0), or use `clipfleet run` to start a private one"
            )
        try:
            self.store = JobStore.from_url(self.settings.redis_url)
        except ValueError as e:
            raise ClipfleetError(
                # redis-py's message may quote a malformed password, so only its type is shown.
                f"CLIPFLEET_REDIS_URL={redact_url(self.settings.redis_url)!r} is not a valid Redis URL "
                f"({type(e).__name__}); use the form redis://:PASSWORD@host:6379/0"
            ) from e
        self.storage = Storage(self.settings.s3_endpoint_url, timeout_s=self.settings.fetch_timeout_s)
        self._celery = make_celery(self.settings, name="clipfleet-producer")

    @property
    def celery(self) -> Celery:
        """The Celery app that sends this client's tasks."""
        return self._celery

    @classmethod
    def from_env(cls) -> "Client":
        """Build a client from the `CLIPFLEET_*` environment variables."""
        return cls(Settings())

    def submit(
        self,
        source: str | Sequence[str],
        labels: Sequence[str] | Mapping[str, Sequence[str]],
        output: str,
        templates: Sequence[str] | None = None,
        model: str | None = None,
        batch_size: int | None = None,
        top_k: int = 5,
        extensions: Sequence[str] | None = None,
        format: str = "jsonl",
        *,
        template_set: str | None = None,
        threshold: float | None = None,
        multi_label: bool = False,
        store_embeddings: bool = False,
        embeddings_dtype: str = "float16",
        detach: bool = False,
        resume: bool = False,
        skip_existing: str | None = None,
    ) -> "Job":
        """Validate a job, list its sources and enqueue one task per batch. Returns once every batch is enqueued,
        or with `detach`, once the job exists (see `submit_spec` for `detach`, `resume` and `skip_existing`).

        `template_set` names a built-in set of producer.templates.TEMPLATE_SETS to use instead of `templates`.
        `multi_label` scores each label by its raw cosine similarity instead of a softmax over the labels, and
        `threshold` drops top-k entries scoring below it (see README.md, Results). `store_embeddings` writes
        each image's normalised embedding, as `embeddings_dtype`, next to its shard (see producer.embeddings).

        Raises InvalidJobSpec for an invalid spec, a bucket outside CLIPFLEET_ALLOWED_BUCKETS, more labels
        than CLIPFLEET_MAX_LABELS, an output that cannot be written or a malformed manifest line. Raises
        SourceError for a source that cannot be listed. Nothing is enqueued in any of these cases. Prompts
        longer than the model's text context are only logged as warnings.
        """
        spec = make_spec(
            self.settings, source, labels, output, templates, model, batch_size, top_k, extensions, format,
            template_set=template_set, threshold=threshold, multi_label=multi_label,
            store_embeddings=store_embeddings, embeddings_dtype=embeddings_dtype,
        )
        return self.submit_spec(spec, detach=detach, resume=resume, skip_existing=skip_existing)

    def relabel(
        self,
        job_id: str,
        labels: Sequence[str] | Mapping[str, Sequence[str]],
        output: str,
        templates: Sequence[str] | None = None,
        top_k: int = 5,
        format: str = "jsonl",
        *,
        model: str | None = None,
        detach: bool = False,
        **options: Any,
    ) -> "Job":
        """Submit a job that scores the stored embeddings of job `job_id` against `labels`; see producer.relabel.

        No image is fetched and the image tower does not run. `options` are `submit`'s scoring options
        (template_set, threshold, multi_label). Raises JobNotFound for an unknown job, RelabelNotPossible for
        a job without stored embeddings, unfinished, or of another model than `model`, and InvalidJobSpec
        as `submit` does.
        """
        from producer.relabel import relabel_spec

        spec = relabel_spec(
            self.settings, self.store, self.storage, job_id, labels, output,
            model=model, templates=templates, top_k=top_k, format=format, **options,
        )
        return self.submit_spec(spec, detach=detach)

    def submit_spec(
        self,
        spec: JobSpec,
        on_created: Callable[[str], None] | None = None,
        *,
        detach: bool = False,
        resume: bool = False,
        skip_existing: str | None = None,
        log_path: Path | None = None,
    ) -> "Job":
        """Enqueue a validated job; see `submit`. `on_created` is called with the job id as soon as the job
        exists in Redis, before its batches are enqueued, which can take long behind a full queue.

        `detach`: return once the job exists, and enqueue its batches from a background producer process
        that logs to `log_path` (see `detached_log_path`). `resume`: when Redis holds an earlier job with the
        same spec, run that job again, enqueueing only its batches that have neither a shard nor a count (see
        `resume`); without such a job, submit a new one. `skip_existing`: leave out the images that earlier jobs
        under this prefix or folder classified without error, with the same model, prompts and top-k.

        Raises OutputNotWritable (a StorageError and an InvalidJobSpec) when the output is not writable.
        """
        self.storage.check_writable(spec.output)
        if skip_existing is not None:
            skip_existing = check_skip_existing(skip_existing)
        self._check_prefixes_listable(spec)
        if resume:
            earlier = job_for_spec(self.store.redis, spec_digest(spec))
            if earlier is not None:
                logger.info("Job %s has the same spec; resuming it", earlier)
                if on_created is not None:
                    on_created(earlier)
                return self.resume(earlier, restart=True, detach=detach, log_path=log_path)
        job_id = new_job_id()
        log_path = log_path or detached_log_path(job_id)
        if detach:
            check_log_path(log_path)
        stats = ListingStats()
        uris, classified = self._listing(spec, stats, skip_existing)
        first = _first_or_none(uris)  # a manifest is checked line by line before the job exists
        lease = ProducerLease(self.store.redis, job_id, self.settings.producer_lease_s)
        lease.acquire()  # before the job exists, so the job is never seen without its producer
        self.store.create(job_id, spec)
        self.store.set_fields(job_id, skip_existing=skip_existing or "")
        index_spec(self.store.redis, spec_digest(spec), job_id)
        logger.info("Job %s created: %s -> %s", job_id, spec.source, job_output(spec, job_id))
        if on_created is not None:
            on_created(job_id)
        if detach:
            spawn_producer(job_id, lease.token, log_path, self.settings)
            return Job(self, job_id)
        remaining = itertools.chain([first], uris) if first is not None else iter(())
        return self._enqueue(job_id, spec, lease, remaining, stats, classified, start_batch=0)

    def resume(
        self,
        job_id: str,
        restart: bool = False,
        detach: bool = False,
        lease_token: str | None = None,
        log_path: Path | None = None,
    ) -> "Job":
        """Continue enqueueing a job whose producer stopped (a crash, Ctrl-C, a lost machine).

        The sources are listed again and the batches before the job's checkpoint are passed over, so no batch
        is sent twice. With `restart`, a cancelled or failed job runs again: every batch that has no shard and
        was not counted is enqueued, and a shard left uncounted is counted from its rows. Returns at once for
        a job that has every batch enqueued or has succeeded. Raises ProducerBusy when another producer has
        the job, and ResumeNotPossible for a cancelled or failed job without `restart`.
        """
        fields = self.store.fields(job_id)
        state = fields["state"]
        if state == STATE_SUCCEEDED or (fields["listing_done"] == "1" and state not in FINAL_STATES):
            logger.info("Job %s is %s with every batch enqueued; nothing to resume", job_id, state)
            return Job(self, job_id)
        if state in FINAL_STATES and not restart:
            raise ResumeNotPossible(
                f"job {job_id} is {state}, so its remaining batches were dropped; run it again with "
                "`clipfleet submit --resume` and the same spec, which enqueues only the batches without results"
            )
        log_path = log_path or detached_log_path(job_id)
        if detach:
            check_log_path(log_path)
        spec = self.store.spec(job_id)
        checkpoint = ListingCheckpoint.from_fields(fields)
        if restart and checkpoint is not None:
            # Batches before the checkpoint that never finished are sent again, so the listing is checked first.
            uris, _ = self._listing(spec, ListingStats(), fields.get("skip_existing") or None)
            verify_listing(uris, spec.batch_size, checkpoint, job_id)
        lease = ProducerLease(self.store.redis, job_id, self.settings.producer_lease_s, token=lease_token)
        if not lease.acquire():
            remaining_s = lease.remaining_s()
            raise ProducerBusy(
                f"job {job_id} is being enqueued by another producer; if that producer stopped, its claim expires "
                f"in {remaining_s or 0:.0f} s and the job can be resumed then"
            )
        if restart:
            self._restart(job_id, spec)
        if detach:
            # The background producer resumes the job as it now is: running, from its first batch.
            spawn_producer(job_id, lease.token, log_path, self.settings)
            return Job(self, job_id)
        is_done = self._done_batches(job_id, spec)
        stats = ListingStats()
        uris, classified = self._listing(spec, stats, fields.get("skip_existing") or None)
        start_batch = 0 if restart else int(fields.get("next_batch", 0))
        self.store.set_fields(job_id, error="")
        logger.info("Job %s: enqueueing from batch %d", job_id, start_batch)
        return self._enqueue(job_id, spec, lease, uris, stats, classified, start_batch, is_done, None if restart else checkpoint)

    def _check_prefixes_listable(self, spec: JobSpec) -> None:
        """List one key of each S3 prefix source, so a missing bucket or a denied listing fails before the job exists.

        Raises SourceError naming the prefix.
        """
        for source in spec.sources:
            if is_s3_uri(source) and not is_read_at_submit(source):
                prefix = parse_s3_uri(source)
                try:
                    self.storage.client.list_objects_v2(Bucket=prefix.bucket, Prefix=prefix.key, MaxKeys=1)
                except Storage.client_errors() as e:
                    raise SourceError(f"source {source!r} cannot be listed: {e}") from e

    def _listing(
        self, spec: JobSpec, stats: ListingStats, skip_existing: str | None
    ) -> tuple[Iterator[str], ClassifiedUris | None]:
        """Return the job's image URIs as a stream, without those `skip_existing` finds classified already."""
        if spec.relabel is not None:
            from producer.relabel import iter_relabel_uris

            return iter_relabel_uris(self.storage, spec, stats), None
        uris = iter_sources(spec.sources, self.storage, spec.extensions, stats, self.settings.allowed_buckets)
        if not skip_existing:
            return uris, None
        classified = ClassifiedUris.scan(self.storage, skip_existing, spec)
        return classified.filter(uris), classified

    def _restart(self, job_id: str, spec: JobSpec) -> None:
        """Move a cancelled or failed job back to running, with its listing and checkpoint started over."""
        restart_job(self.store.redis, job_id)
        self.storage.delete(join_location(job_output(spec, job_id), CANCELLED_MARKER))

    def _done_batches(self, job_id: str, spec: JobSpec) -> Callable[[int], bool]:
        """Return a test for batches that need not run again: counted, or with a shard (which is then counted)."""
        shards = ShardBitmap.of_folder(self.storage, job_output(spec, job_id))

        def is_done(batch: int) -> bool:
            if self.store.is_batch_done(job_id, batch):
                return True
            if batch not in shards:
                return False
            succeeded, failed, errors = count_rows(read_shard(self.storage, spec, job_id, batch))
            self.store.record_batch(job_id, batch, succeeded, failed, errors)
            return True

        return is_done

    def job(self, job_id: str) -> "Job":
        """Return the job with this id. Raises InvalidJobId for an id of another form, JobNotFound if Redis has no such job."""
        self.store.state(job_id)
        return Job(self, job_id)

    def jobs(self, limit: int = 20, state: str | None = None) -> list[JobStatus]:
        """Return the statuses of up to `limit` jobs, newest first, only those in `state` when it is given.

        Raises ValueError for a `limit` below 1 or an unknown state. See `producer.jobs.list_jobs`.
        """
        return list_jobs(self.store, limit=limit, state=state)

    def _enqueue(
        self,
        job_id: str,
        spec: JobSpec,
        lease: ProducerLease,
        uris: Iterator[str],
        stats: ListingStats,
        classified: ClassifiedUris | None,
        start_batch: int,
        is_done: Callable[[int], bool] | None = None,
        checkpoint: ListingCheckpoint | None = None,
    ) -> "Job":
        """Publish the job's batches under `lease`, record the totals, and release the lease.

        When enqueueing stops on an error or an interrupt, the batches sent stay queued and the job waits for
        `clipfleet resume`, as its `error` field states.
        """
        lease.start_refreshing()
        sender = BatchSender.for_settings(self._celery, self.settings)
        try:
            outcome = enqueue_listing(
                sender, lease, job_id, spec.batch_size, uris, start_batch, is_done,
                job_ended=lambda: self.store.state(job_id) in FINAL_STATES, checkpoint=checkpoint,
            )
            if not outcome.cancelled:
                self._finish_listing(job_id, stats, classified, outcome.batches)
        except LeaseLost:
            raise
        except BaseException as e:
            self._record_stop(job_id, e)
            raise
        finally:
            sender.close()
            lease.release()
        logger.info(
            "Job %s enqueued: %d images in %d batches (%d sent now, %d passed over), %d skipped, %d already classified, "
            "%d repeated manifest entries dropped, %.1f s paused by backpressure",
            job_id, stats.listed, outcome.batches, outcome.sent, outcome.passed_over, stats.skipped,
            classified.skipped if classified else 0, stats.duplicates, outcome.paused_s,
        )
        return Job(self, job_id)

    def _finish_listing(self, job_id: str, stats: ListingStats, classified: ClassifiedUris | None, batches: int) -> None:
        skipped_existing = classified.skipped if classified else 0
        self.store.set_fields(job_id, skipped_existing=str(skipped_existing))
        if self.store.finish_listing(job_id, stats.listed - skipped_existing, stats.skipped, batches):
            finalize_job(self.store, self.storage, job_id)
        # A job cancelled while listing gets its final totals in _CANCELLED.json.
        refresh_cancel_summary(self.store, self.storage, job_id)

    def _record_stop(self, job_id: str, error: BaseException) -> None:
        """Note in the job why enqueueing stopped, and how to go on. Logs instead of raising a second error."""
        message = (
            f"enqueueing stopped ({_describe_stop(error)}); the batches already enqueued still run. "
            f"Continue with `clipfleet resume {job_id}`, or stop the job with `clipfleet cancel {job_id}`"
        )
        try:
            if self.store.state(job_id) not in FINAL_STATES:
                self.store.set_fields(job_id, error=message)
        except Exception:
            logger.warning("Job %s: could not record why enqueueing stopped: %s", job_id, message, exc_info=True)


@dataclass(frozen=True)
class RetryRound:
    """The retry round that `Job.retry` started: `images` failed images sent in `batches` tasks.

    `round` is None when the job had no failed images to retry, and then nothing was enqueued.
    """

    job_id: str
    round: int | None
    images: int
    batches: int


class Job:
    """A submitted job. Methods read Redis and object storage, so the object keeps no state of its own."""

    def __init__(self, client: Client, job_id: str) -> None:
        """Raises InvalidJobId when `job_id` does not have the form `check_job_id` accepts."""
        self.client = client
        self.id = check_job_id(job_id)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def spec(self) -> JobSpec:
        return self.client.store.spec(self.id)

    @property
    def output(self) -> str:
        """The folder or prefix that contains this job's shards and `_SUCCESS.json`."""
        return job_output(self.spec, self.id)

    def status(self) -> JobStatus:
        return self.client.store.status(self.id)

    def wait(
        self,
        timeout_s: float | None = None,
        progress: bool = True,
        poll_s: float = 0.5,
        on_poll: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        """Block until the job succeeds, fails or is cancelled, and return its final status.

        `on_poll` is called with each status read, for callers that supervise processes while waiting.
        Raises TimeoutError when `timeout_s` passes first; the job keeps running. Raises ProducerLost when the
        job's listing is unfinished and no producer holds its lease, because it would then never finish.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = ProgressLine(sys.stderr) if progress else None
        try:
            while True:
                status = self._status_through_outage(poll_s)
                if bar:
                    bar.update(status)
                if on_poll:
                    on_poll(status)
                if status.is_final:
                    return status
                if status.producer == PRODUCER_LOST:
                    raise ProducerLost(_lost_message(status))
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.id} still {status.state} after {timeout_s} s ({status.done} images done)")
                time.sleep(poll_s)
        finally:
            if bar:
                bar.close()

    def _status_through_outage(self, poll_s: float) -> JobStatus:
        """Read the status, retrying for up to REDIS_OUTAGE_S while Redis is unreachable (a restart, a failover)."""
        deadline = time.monotonic() + REDIS_OUTAGE_S
        while True:
            try:
                return self.status()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                if time.monotonic() >= deadline:
                    raise
                logger.warning("Reading job %s failed (%s); retrying", self.id, e)
                time.sleep(max(poll_s, 1.0))

    def results(self) -> Iterator[dict[str, Any]]:
        """Yield result rows in batch order. Rows of a running job's finished batches are included."""
        return iter_results(self.client.storage, self.spec, self.id)

    def cancel(self) -> bool:
        """Stop the job: workers drop its remaining batches and abandon running ones at their next model batch.

        Writes `_CANCELLED.json` next to the shards (see `producer.jobs.cancel_job`). Returns False if the
        job had already ended or is being finalized.
        """
        return cancel_job(self.client.store, self.client.storage, self.id) is not None

    def retry(self, codes: Collection[str] | None = None) -> RetryRound:
        """Enqueue the failed images of a finished job again, as a new retry round, and return at once.

        Failed images are the result rows with an `error`, limited to the error codes in `codes` when it
        is given (by default every code, since the data behind any failure may have been fixed). Each
        retried batch replaces those rows in its own shard, so the results keep one row per input. The job
        runs again and is finalized, with a new `_SUCCESS.json`, once the round's batches finish; follow it
        with `wait()`. A job without such rows is left as it is, and the result has `round=None`.

        A succeeded job can be retried, and so can a cancelled one whose every first-run batch finished
        (such as one whose earlier retry round was cancelled). Raises RetryNotStarted for a job in any
        other state, JobNotFound when Redis has no such job, ValueError for an unknown error code in
        `codes`, and StorageError when a shard cannot be read.
        """
        selected = check_error_codes(codes)
        store = self.client.store
        seen_round = store.retry_round(self.id)
        state = store.state(self.id)
        if state not in (STATE_SUCCEEDED, STATE_CANCELLED):
            raise RetryNotStarted(
                f"job {self.id} is {state}: only a succeeded or cancelled job can be retried; "
                "wait for a running job to finish (`clipfleet wait`), and submit a failed job again"
            )
        failed_uris, baseline = self._failed_uris(selected)
        if not failed_uris:
            logger.info("Job %s has no failed images with codes %s; nothing to retry", self.id, sorted(selected))
            return RetryRound(self.id, None, 0, 0)
        retry_round = store.start_retry(self.id, seen_round, len(failed_uris), baseline)
        images = sum(len(uris) for uris in failed_uris.values())
        logger.info("Job %s retry round %d: %d failed images in %d batches", self.id, retry_round, images, len(failed_uris))
        self._enqueue_retry(retry_round, failed_uris)
        return RetryRound(self.id, retry_round, images, len(failed_uris))

    def _failed_uris(self, codes: Collection[str]) -> tuple[dict[int, list[str]], dict[int, str]]:
        """Return the URIs to retry by batch, and the counts of each of those batches' shards as JSON."""
        failed_uris: dict[int, list[str]] = {}
        baseline: dict[int, str] = {}
        found: set[int] = set()
        for batch, rows in iter_shards(self.client.storage, self.spec, self.id):
            found.add(batch)
            uris = [row["uri"] for row in rows if row["error"] is not None and row["error"]["code"] in codes]
            if uris:
                failed_uris[batch] = uris
                baseline[batch] = batch_counts_json(*count_rows(rows))
        self._check_shards_present(found)
        return failed_uris, baseline

    def _check_shards_present(self, found: set[int]) -> None:
        """Raise RetryNotStarted naming the missing shards when some batch of the job has none."""
        batches_total = int(self.client.store.fields(self.id).get("batches_total", 0))
        missing = sorted(set(range(batches_total)) - found)
        if missing:
            names = ", ".join(SHARD_NAMES[self.spec.format].format(batch=batch) for batch in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise RetryNotStarted(
                f"job {self.id} has no shard for {len(missing)} of its {batches_total} batches ({names}{more}), "
                "so their images have no rows to retry; restore the shards or submit the job again"
            )

    def _enqueue_retry(self, retry_round: int, failed_uris: Mapping[int, list[str]]) -> None:
        """Send one task per batch. An error cancels the round, so a later `retry` can start again."""
        settings = self.client.settings
        sender = BatchSender.for_settings(self.client._celery, settings)
        try:
            for batch, uris in failed_uris.items():
                if self.client.store.state(self.id) == STATE_CANCELLED:
                    logger.info("Job %s was cancelled; retry round %d stopped enqueueing", self.id, retry_round)
                    return
                sender.send(BatchMessage(job_id=self.id, batch=batch, uris=uris, retry_round=retry_round))
        except BaseException as e:
            if self.client.store.cancel(self.id):
                self.client.store.set_fields(self.id, error=f"retry round {retry_round} stopped while enqueueing ({_describe_stop(e)})")
            raise
        finally:
            sender.close()


def check_error_codes(codes: Collection[str] | None) -> frozenset[str]:
    """Return `codes` as a set, or every code of ERROR_CODES for None. Raises ValueError naming unknown codes."""
    if codes is None:
        return frozenset(ERROR_CODES)
    unknown = sorted(set(codes) - set(ERROR_CODES))
    if unknown:
        raise ValueError(f"unknown error code(s) {unknown!r}: use some of {', '.join(ERROR_CODES)}")
    if not codes:
        raise ValueError(f"no error code given: use some of {', '.join(ERROR_CODES)}, or leave codes out to retry all")
    return frozenset(codes)


def new_job_id() -> str:
    """Return a new job id: UTC time to the second and 8 random hex digits, so ids sort by creation.

    The form is `producer.messages.GENERATED_JOB_ID_RE`, for example 20260101-120000-0123abcd.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{uuid.uuid4().hex[:8]}"


def _first_or_none(items: Iterator[str]) -> str | None:
    return next(items, None)


def _lost_message(status: JobStatus) -> str:
    """Describe a job whose producer is gone: the error it recorded, or what to do."""
    if status.error:
        return f"job {status.job_id}: {status.error}"
    return (
        f"job {status.job_id} is {status.state}, but no producer is enqueueing its batches; continue with "
        f"`clipfleet resume {status.job_id}` or stop it with `clipfleet cancel {status.job_id}`"
    )


def make_spec(
    settings: Settings,
    source: str | Sequence[str],
    labels: Sequence[str] | Mapping[str, Sequence[str]],
    output: str,
    templates: Sequence[str] | None = None,
    model: str | None = None,
    batch_size: int | None = None,
    top_k: int = 5,
    extensions: Sequence[str] | None = None,
    format: str = "jsonl",
    *,
    template_set: str | None = None,
    threshold: float | None = None,
    multi_label: bool = False,
    store_embeddings: bool = False,
    embeddings_dtype: str = "float16",
) -> JobSpec:
    """Validate a job, filling unset fields from `settings`, and log a warning for each prompt the model truncates.

    Raises InvalidJobSpec naming each invalid field, more labels than CLIPFLEET_MAX_LABELS, a bucket outside
    CLIPFLEET_ALLOWED_BUCKETS, an unknown `template_set` or one given together with `templates`.
    """
    spec = build_spec(
        **_spec_fields(settings, source, labels, output, templates, model, batch_size, top_k, extensions),
        format=format, template_set=template_set, threshold=threshold, multi_label=multi_label,
        store_embeddings=store_embeddings, embeddings_dtype=embeddings_dtype,
    )
    check_job_size(spec, settings.max_labels, settings.max_prompts)
    allowed = set(settings.allowed_buckets)
    outside = sorted(spec.buckets() - allowed) if allowed else []
    if outside:
        raise InvalidJobSpec(
            f"bucket(s) {outside!r} are not in CLIPFLEET_ALLOWED_BUCKETS={sorted(allowed)!r}; "
            "add them to that setting or use an allowed bucket"
        )
    find_long_prompts(spec)
    return spec


def _spec_fields(
    settings: Settings,
    source: str,
    labels: Any,
    output: str,
    templates: Sequence[str] | None,
    model: str | None,
    batch_size: int | None,
    top_k: int,
    extensions: Sequence[str] | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "source": source,
        "labels": dict(labels) if isinstance(labels, Mapping) else labels,
        "output": output,
        "model": settings.model if model is None else model,
        "model_revision": settings.model_revision,
        "batch_size": settings.batch_size if batch_size is None else batch_size,
        "top_k": top_k,
    }
    if templates is not None:
        fields["templates"] = list(templates)
    if extensions is not None:
        fields["extensions"] = list(extensions)
    return fields


def _describe_stop(error: BaseException) -> str:
    """Describe why enqueueing stopped: an interrupt by name, any other error with its message."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
