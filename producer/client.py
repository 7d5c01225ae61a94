"""The Python API: submit a job, follow it, read its results."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis

from producer.constants import ERROR_CODES, SHARD_NAME, STATE_CANCELLED, STATE_SUCCEEDED
from producer.errors import ClipfleetError, InvalidJobSpec
from producer.messages import BatchMessage, check_job_id
from producer.queue import BatchSender, make_celery
from producer.redact import redact_url
from producer.results import count_rows, finalize_job, iter_results, iter_shards, job_output
from producer.settings import Settings
from producer.sources import ListingStats, iter_source
from producer.spec import JobSpec, build_spec, check_job_size, find_long_prompts
from producer.state import JobStatus, JobStore, RetryNotStarted, batch_counts_json
from producer.storage import Storage

logger = logging.getLogger(__name__)

REDIS_OUTAGE_S = 60.0


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

    @classmethod
    def from_env(cls) -> "Client":
        """Build a client from the `CLIPFLEET_*` environment variables."""
        return cls(Settings())

    def submit(
        self,
        source: str,
        labels: Sequence[str] | Mapping[str, Sequence[str]],
        output: str,
        templates: Sequence[str] | None = None,
        model: str | None = None,
        batch_size: int | None = None,
        top_k: int = 5,
        extensions: Sequence[str] | None = None,
    ) -> "Job":
        """Validate a job, list its source and enqueue one task per batch. Returns once every batch is enqueued.

        Raises InvalidJobSpec for an invalid spec, a bucket outside CLIPFLEET_ALLOWED_BUCKETS, more labels
        than CLIPFLEET_MAX_LABELS, an output that cannot be written or a malformed manifest line. Raises
        SourceError for a source that cannot be listed. Nothing is enqueued in any of these cases. Prompts
        longer than the model's text context are only logged as warnings.
        """
        spec = make_spec(self.settings, source, labels, output, templates, model, batch_size, top_k, extensions)
        return self.submit_spec(spec)

    def submit_spec(self, spec: JobSpec, on_created: Callable[[str], None] | None = None) -> "Job":
        """Enqueue a validated job; see `submit`. `on_created` is called with the job id as soon as the job
        exists in Redis, before its batches are enqueued, which can take long behind a full queue.

        Raises OutputNotWritable (a StorageError and an InvalidJobSpec) when the output is not writable.
        """
        self.storage.check_writable(spec.output)
        stats = ListingStats()
        uris = iter_source(spec.source, self.storage, spec.extensions, stats, self.settings.allowed_buckets)
        first = _first_or_none(uris)
        job_id = new_job_id()
        self.store.create(job_id, spec)
        logger.info("Job %s created: %s -> %s", job_id, spec.source, job_output(spec, job_id))
        if on_created is not None:
            on_created(job_id)
        # NOTE: a producer killed with SIGKILL from here on leaves the job running forever; the user must
        # cancel it and submit again.
        remaining = itertools.chain([first], uris) if first is not None else iter(())
        try:
            batches = self._enqueue(job_id, spec, remaining)
        except BaseException as e:
            self.store.fail(job_id, f"enqueueing stopped ({_describe_stop(e)}); the batches already enqueued are dropped")
            raise
        if self.store.finish_listing(job_id, stats.listed, stats.skipped, batches):
            finalize_job(self.store, self.storage, job_id)
        logger.info(
            "Job %s enqueued: %d images in %d batches, %d skipped, %d repeated manifest entries dropped",
            job_id, stats.listed, batches, stats.skipped, stats.duplicates,
        )
        return Job(self, job_id)

    def job(self, job_id: str) -> "Job":
        """Return the job with this id. Raises InvalidJobId for an id of another form, JobNotFound if Redis has no such job."""
        self.store.state(job_id)
        return Job(self, job_id)

    def _enqueue(self, job_id: str, spec: JobSpec, uris: Iterator[str]) -> int:
        sender = BatchSender(self._celery, self.settings.queue, self.settings.queue_high_water)
        batch = 0
        try:
            while chunk := list(itertools.islice(uris, spec.batch_size)):
                if self.store.state(job_id) == STATE_CANCELLED:
                    logger.info("Job %s was cancelled; enqueueing stopped after %d batches", job_id, batch)
                    break
                sender.send(BatchMessage(job_id=job_id, batch=batch, uris=chunk))
                self.store.add_listed(job_id, len(chunk))
                batch += 1
        finally:
            sender.close()
        return batch


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
        Raises TimeoutError when `timeout_s` passes first; the job keeps running.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = _ProgressBar() if progress else None
        try:
            while True:
                status = self._status_through_outage(poll_s)
                if bar:
                    bar.update(status)
                if on_poll:
                    on_poll(status)
                if status.is_final:
                    return status
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
        """Stop the job: workers drop its remaining batches. Returns False if it had already ended."""
        return self.client.store.cancel(self.id)

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
            names = ", ".join(SHARD_NAME.format(batch=batch) for batch in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise RetryNotStarted(
                f"job {self.id} has no shard for {len(missing)} of its {batches_total} batches ({names}{more}), "
                "so their images have no rows to retry; restore the shards or submit the job again"
            )

    def _enqueue_retry(self, retry_round: int, failed_uris: Mapping[int, list[str]]) -> None:
        """Send one task per batch. An error cancels the round, so a later `retry` can start again."""
        settings = self.client.settings
        sender = BatchSender(self.client._celery, settings.queue, settings.queue_high_water)
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


class _ProgressBar:
    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(unit="img", dynamic_ncols=True, desc="classifying")

    def update(self, status: JobStatus) -> None:
        if status.total is not None and self._bar.total != status.total:
            self._bar.total = status.total
            self._bar.refresh()
        self._bar.update(status.done - self._bar.n)
        if status.failed:
            self._bar.set_postfix(failed=status.failed, refresh=False)

    def close(self) -> None:
        self._bar.close()


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


def make_spec(
    settings: Settings,
    source: str,
    labels: Sequence[str] | Mapping[str, Sequence[str]],
    output: str,
    templates: Sequence[str] | None = None,
    model: str | None = None,
    batch_size: int | None = None,
    top_k: int = 5,
    extensions: Sequence[str] | None = None,
) -> JobSpec:
    """Validate a job, filling unset fields from `settings`, and log a warning for each prompt the model truncates.

    Raises InvalidJobSpec naming each invalid field, more labels than CLIPFLEET_MAX_LABELS, or a bucket outside
    CLIPFLEET_ALLOWED_BUCKETS.
    """
    spec = build_spec(**_spec_fields(settings, source, labels, output, templates, model, batch_size, top_k, extensions))
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
