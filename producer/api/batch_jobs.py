"""The batch driver: a background thread of the API server that runs each batch as clipfleet jobs.

A batch moves validating -> in_progress -> finalizing -> completed, or to failed when its input file is invalid,
or through cancelling to cancelled (and to expired after its completion window) with the results finished so far.

- /v1/classifications: the requests with the same model, labels and scoring options form a group, and each group
  runs as one job whose manifest lists the group's images. Images sent as data URIs are stored under the files
  folder first. The job's result rows are mapped back to the requests by URI.
- /v1/embeddings: the images of the requests of one model run as one job that stores float32 embeddings (with a
  placeholder label), and the texts go through the realtime path (`producer.api.embeddings.embed`), whose
  transient failures are retried with backoff (`producer.api.batch_retry`).

Each pass takes the lease API_BATCH_LEASE_KEY of every active batch (or refreshes it), so several API servers
never drive one batch at the same time, and a batch left by a stopped server is taken over once its lease
expires. Every step reads its progress from Redis (`job:GROUP`, `group_error:GROUP`, `texts_done` fields of the
batch hash), so a driver that takes over, or a restarted server, goes on where the last one stopped.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from producer.api import embeddings as realtime
from producer.api.batch_outcome import Outcome
from producer.api.batch_plan import Group, Plan, PlanBuilder, Planned, batch_folder
from producer.api.batch_retry import TextRetry, TextsInterrupted
from producer.api.batches import (
    MAX_LISTED_ERRORS,
    batch_key,
    load_fields,
    parse_input,
    save_object,
)
from producer.api.errors import ApiError
from producer.api.files import read_bytes, store_stream
from producer.api.schemas import EmbeddingsRequest
from producer.api.state import ApiState
from producer.client import Job, ProducerBusy, make_spec
from producer.constants import API_BATCH_LEASE_KEY, API_BATCHES_ACTIVE_KEY, FINAL_STATES
from producer.errors import InvalidJobSpec
from producer.lease import acquire_key, refresh_key, release_key
from producer.state import PRODUCER_LOST
from producer.storage import join_location

logger = logging.getLogger(__name__)

POLL_S = 0.5
WORK_THREADS = 4
# Realtime requests of one batch's texts in flight at once; each carries the texts of one batch request.
TEXT_THREADS = 8

class BatchDriver:
    """Advances every active batch, one step per pass, from a daemon thread. `start` once, `stop` once.

    A second daemon thread refreshes the leases held, every third of the lease time, so a slow step (a large
    plan or output file) does not let a lease expire while this driver still works on the batch.
    """

    def __init__(self, state: ApiState, poll_s: float = POLL_S, lease_s: float | None = None) -> None:
        """`lease_s`: seconds after the last refresh before another server may take a batch over.

        It defaults to CLIPFLEET_PRODUCER_LEASE_S, because the API server is the producer of its batches' jobs.
        """
        self.state = state
        self.redis = state.client.store.redis  # retries through a Redis restart, unlike the request handlers' client
        self.poll_s = poll_s
        self.lease_ms = int((state.settings.producer_lease_s if lease_s is None else lease_s) * 1000)
        self.token = secrets.token_hex(16)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._held: set[str] = set()  # batches whose lease this driver holds
        self._held_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(WORK_THREADS, thread_name_prefix="clipfleet-batch")
        self._tasks: dict[str, Future[None]] = {}  # "batch_id:task" -> the running task
        self._plans: dict[str, Plan] = {}

    def start(self) -> None:
        logger.info("Batch driver started (lease %d ms)", self.lease_ms)
        for target, name in ((self._run, "clipfleet-batch-driver"), (self._refresh_leases, "clipfleet-batch-leases")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop driving and hand the leases back, so another server (or this one restarted) goes on at once."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._held_lock:
            held = sorted(self._held)
        for batch_id in held:
            self._release(batch_id)
        logger.info("Batch driver stopped")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.advance_all()
            except Exception:
                logger.exception("Batch driver pass failed; retrying in %.1f s", self.poll_s)
            self._stop.wait(self.poll_s)

    def advance_all(self) -> None:
        """Advance each active batch whose lease this driver holds or can take."""
        members = self.redis.smembers(API_BATCHES_ACTIVE_KEY)
        for batch_id in sorted(member.decode() for member in members):
            if self._stop.is_set():
                return
            if not self._acquire(batch_id):
                self._plans.pop(batch_id, None)
                continue
            try:
                self.advance(batch_id)
            except Exception:
                logger.exception("Batch %s: step failed; retrying in %.1f s", batch_id, self.poll_s)

    def _refresh_leases(self) -> None:
        while not self._stop.wait(self.lease_ms / 3000):
            with self._held_lock:
                held = sorted(self._held)
            for batch_id in held:
                key = API_BATCH_LEASE_KEY.format(batch_id=batch_id)
                try:
                    if not refresh_key(self.redis, key, self.token, self.lease_ms):
                        logger.info("Batch %s: lease released or taken by another server", batch_id)
                except Exception:
                    logger.exception("Batch %s: refreshing the lease failed; retrying", batch_id)

    def _acquire(self, batch_id: str) -> bool:
        """Take the batch's lease, or refresh it when this driver holds it already. Returns False when another holds it."""
        key = API_BATCH_LEASE_KEY.format(batch_id=batch_id)
        held = acquire_key(self.redis, key, self.token, self.lease_ms)
        with self._held_lock:
            if held:
                self._held.add(batch_id)
            else:
                self._held.discard(batch_id)
        return held

    def _release(self, batch_id: str) -> None:
        release_key(self.redis, API_BATCH_LEASE_KEY.format(batch_id=batch_id), self.token)
        with self._held_lock:
            self._held.discard(batch_id)

    def advance(self, batch_id: str) -> None:
        """Take one step of a batch. Idempotent: every step starts from what Redis records."""
        fields = load_fields(self.redis, batch_id)
        if fields is None:
            self.redis.srem(API_BATCHES_ACTIVE_KEY, batch_id)
            return
        batch = json.loads(fields["object"])
        ending = self._ending(batch, fields)
        if batch["status"] == "validating":
            if ending is not None:
                self._finish(batch, Plan([], {}), fields, ending)
            else:
                self._validate(batch)
            return
        plan = self._plan(batch)
        if ending is not None and batch["status"] != "finalizing":
            if self._stop_work(batch_id, plan, fields):
                self._finish(batch, plan, fields, ending)
            return
        self._start_work(batch_id, plan, fields)
        if self._work_done(batch_id, plan, fields):
            self._finish(batch, plan, fields, "completed")

    @staticmethod
    def _ending(batch: dict[str, Any], fields: dict[str, str]) -> str | None:
        """Return `cancelled` for a batch with a cancel request, `expired` past its window, otherwise None."""
        if fields.get("cancel_requested_at"):
            return "cancelled"
        if time.time() > batch["expires_at"]:
            return "expired"
        return None

    def _validate(self, batch: dict[str, Any]) -> None:
        """Check the input file; move the batch to in_progress, or to failed with OpenAI's `errors` list."""
        try:
            content = read_bytes(self.state, batch["input_file_id"])
            requests, errors = parse_input(content, batch["endpoint"])
        except ApiError as e:  # the input file was deleted; a failed read (StorageError) is retried on the next pass
            requests, errors = [], [{"code": "invalid_input_file", "message": e.message, "param": "input_file_id", "line": None}]
        now = int(time.time())
        if errors:
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": errors[:MAX_LISTED_ERRORS]})
            logger.info("Batch %s failed validation: %s", batch["id"], errors[0]["message"])
        else:
            batch.update(status="in_progress", in_progress_at=now, request_counts={"total": len(requests), "completed": 0, "failed": 0})
            logger.info("Batch %s in progress: %d requests to %s", batch["id"], len(requests), batch["endpoint"])
        save_object(self.redis, batch)
        if errors:
            self._release(batch["id"])

    def _plan(self, batch: dict[str, Any]) -> Plan:
        """Return the batch's plan, built once per driver from the input file (stored data URIs are written again)."""
        plan = self._plans.get(batch["id"])
        if plan is None:
            plan = PlanBuilder(self.state, batch).build()
            self._plans[batch["id"]] = plan
        return plan

    def _start_work(self, batch_id: str, plan: Plan, fields: dict[str, str]) -> None:
        """Submit each group without a job, resume a job whose producer was lost, and start embedding the texts."""
        for name, group in plan.groups.items():
            if f"group_error:{name}" in fields:
                continue
            job_id = fields.get(f"job:{name}")
            if job_id is None:
                self._run_task(batch_id, name, lambda group=group: self._submit(batch_id, group))
            elif self.state.client.store.status(job_id).producer == PRODUCER_LOST:
                self._run_task(batch_id, name, lambda job_id=job_id: self._resume(job_id))
        if plan.has_texts and "texts_done" not in fields:
            self._run_task(batch_id, "texts", lambda: self._embed_texts(batch_id, plan))

    def _run_task(self, batch_id: str, name: str, task: Any) -> None:
        key = f"{batch_id}:{name}"
        running = self._tasks.get(key)
        if running is not None and not running.done():
            return
        self._tasks[key] = self._pool.submit(self._logged, batch_id, name, task)

    @staticmethod
    def _logged(batch_id: str, name: str, task: Any) -> None:
        try:
            task()
        except ProducerBusy as e:
            logger.info("Batch %s: %s waits for another producer: %s", batch_id, name, e)
        except Exception:
            logger.exception("Batch %s: task %s failed; it runs again on the next pass", batch_id, name)

    def _tasks_running(self, batch_id: str) -> bool:
        return any(key.startswith(batch_id + ":") and not task.done() for key, task in self._tasks.items())

    def _submit(self, batch_id: str, group: Group) -> None:
        """Write the group's manifest and submit its job, recording the job id as soon as the job exists.

        A spec rejected by `make_spec` or `submit_spec` (InvalidJobSpec) is recorded as the group's error, which its
        requests get. Other errors, such as a failed manifest write, propagate, and the next pass submits again.
        The manifest and output locations depend only on the batch and group, so a resubmission after a restart
        finds the job created before (`resume=True`) instead of starting another.
        """
        folder = batch_folder(self.state, batch_id)
        manifest = join_location(folder, f"{group.name}.jsonl")
        key = batch_key(batch_id)
        lines = "".join(json.dumps({"uri": uri}) + "\n" for uri in group.uris)
        self.state.storage.put_bytes(manifest, lines.encode("utf-8"), "application/jsonl")
        try:
            spec = make_spec(self.state.settings, manifest, output=join_location(folder, "results"), **group.options)
        except InvalidJobSpec as e:
            self.redis.hset(key, f"group_error:{group.name}", str(e))
            logger.info("Batch %s: group %s rejected: %s", batch_id, group.name, e)
            return
        try:
            job = self.state.client.submit_spec(spec, lambda job_id: self.redis.hset(key, f"job:{group.name}", job_id), resume=True)
        except InvalidJobSpec as e:
            if self.redis.hget(key, f"job:{group.name}") is None:
                self.redis.hset(key, f"group_error:{group.name}", str(e))
            logger.info("Batch %s: group %s not submitted: %s", batch_id, group.name, e)
            return
        logger.info("Batch %s: group %s runs as job %s with %d images", batch_id, group.name, job.id, len(group.uris))

    def _resume(self, job_id: str) -> None:
        logger.info("Job %s lost its producer; resuming it", job_id)
        self.state.client.resume(job_id)

    def _embed_texts(self, batch_id: str, plan: Plan) -> None:
        """Embed the texts of each request through the realtime path and store the replies in `texts.json`.

        Stops without recording anything when the batch is cancelled or the driver stops; the next driver
        then embeds every text again.
        """
        pending = [planned for planned in plan.requests if planned.texts and planned.error is None]
        results: dict[str, Any] = {}
        retry = TextRetry(self._expires_at(batch_id), lambda: self._interrupted(batch_id))
        with ThreadPoolExecutor(TEXT_THREADS, thread_name_prefix="clipfleet-batch-texts") as pool:
            for start in range(0, len(pending), TEXT_THREADS * 4):
                if self._interrupted(batch_id):
                    return
                chunk = pending[start:start + TEXT_THREADS * 4]
                try:
                    for planned, result in zip(chunk, pool.map(lambda planned: self._embed_request(planned, retry), chunk)):
                        results[planned.request.custom_id] = result
                except TextsInterrupted:
                    logger.info("Batch %s: embedding the texts stopped (cancelled, or the driver stops)", batch_id)
                    return
        texts = json.dumps(results).encode("utf-8")
        self.state.storage.put_bytes(join_location(batch_folder(self.state, batch_id), "texts.json"), texts, "application/json")
        self.redis.hset(batch_key(batch_id), "texts_done", "1")
        logger.info("Batch %s: texts of %d requests embedded (%d retries)", batch_id, len(pending), retry.retries)

    def _interrupted(self, batch_id: str) -> bool:
        """Return True when the driver stops or the batch has a cancel request."""
        return self._stop.is_set() or bool(self.redis.hexists(batch_key(batch_id), "cancel_requested_at"))

    def _expires_at(self, batch_id: str) -> float:
        fields = load_fields(self.redis, batch_id) or {}
        return float(json.loads(fields["object"])["expires_at"]) if fields else time.time()

    def _embed_request(self, planned: Planned, retry: TextRetry) -> dict[str, Any]:
        """Embed one request's texts, retrying transient failures (see producer.api.batch_retry); return its reply or error."""
        assert isinstance(planned.body, EmbeddingsRequest)
        body = planned.body
        try:
            vectors, tokens = retry.call(lambda: realtime.embed(self.state, body.model, planned.texts), f"request {planned.request.custom_id!r}")
        except ApiError as e:
            return {"error": {"status": e.status, "message": e.message, "code": e.code, "param": e.param}}
        data = base64.b64encode(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).decode("ascii")
        return {"dim": int(vectors.shape[1]), "vectors": data, "tokens": tokens}

    def _work_done(self, batch_id: str, plan: Plan, fields: dict[str, str]) -> bool:
        """Return True once every group has ended (or was rejected) and the texts are embedded."""
        if plan.has_texts and "texts_done" not in fields:
            return False
        for name in plan.groups:
            if f"group_error:{name}" in fields:
                continue
            job_id = fields.get(f"job:{name}")
            if job_id is None or self.state.client.store.state(job_id) not in FINAL_STATES:
                return False
        return not self._tasks_running(batch_id)

    def _stop_work(self, batch_id: str, plan: Plan, fields: dict[str, str]) -> bool:
        """Cancel the batch's jobs; return True once no task of the batch runs here any more."""
        for name in plan.groups:
            job_id = fields.get(f"job:{name}")
            if job_id is not None and Job(self.state.client, job_id).cancel():
                logger.info("Batch %s: job %s cancelled", batch_id, job_id)
        return not self._tasks_running(batch_id)

    def _finish(self, batch: dict[str, Any], plan: Plan, fields: dict[str, str], status: str) -> None:
        """Write the output and error files and move the batch to its final `status`."""
        now = int(time.time())
        if status == "completed" and batch["status"] != "finalizing":
            batch.update(status="finalizing", finalizing_at=now)
            save_object(self.redis, batch)
        outcome = Outcome.collect(self.state, plan, fields, status)
        batch_id = batch["id"]
        output_file_id = self._write_file(batch_id, "output", outcome.output_lines())
        error_file_id = self._write_file(batch_id, "error", outcome.error_lines())
        batch.update({
            "status": status, f"{status}_at": int(time.time()), "output_file_id": output_file_id,
            "error_file_id": error_file_id, "request_counts": outcome.counts(),
        })
        if status == "cancelled":
            batch["cancelling_at"] = int(fields.get("cancel_requested_at") or now)
        save_object(self.redis, batch)
        self._plans.pop(batch_id, None)
        for key in [key for key in self._tasks if key.startswith(batch_id + ":")]:
            del self._tasks[key]
        self._release(batch_id)
        logger.info("Batch %s %s: %s", batch_id, status, batch["request_counts"])

    def _write_file(self, batch_id: str, kind: str, lines: Iterator[dict[str, Any]]) -> str | None:
        """Store `lines` as a JSONL file of purpose batch_output, spooled on disk; return its id, or None for no lines."""
        with tempfile.TemporaryFile() as spool:
            for line in lines:
                spool.write(json.dumps(line).encode("utf-8") + b"\n")
            size_bytes = spool.tell()
            if not size_bytes:
                return None
            spool.seek(0)
            return store_stream(self.state, spool, size_bytes, f"{batch_id}_{kind}.jsonl")["id"]
