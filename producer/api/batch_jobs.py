"""The batch driver: a background thread of the API server that runs each batch as clipfleet jobs.

A batch moves validating -> in_progress -> finalizing -> completed, or to failed when its input file is invalid,
or through cancelling to cancelled (and to expired after its completion window) with the results finished so far.

- /v1/classifications: the requests with the same model, labels and scoring options form a group, and each group
  runs as one job whose manifest lists the group's images. Images sent as data URIs are stored under the files
  folder first. The job's result rows are mapped back to the requests by URI.
- /v1/embeddings: the images of the requests of one model run as one job that stores float32 embeddings (with a
  placeholder label), and the texts go through the realtime path (`producer.api.embeddings.embed`).

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
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from producer.api import embeddings as realtime
from producer.api.batches import (
    MAX_LISTED_ERRORS,
    BatchRequest,
    ClassificationBody,
    batch_key,
    load_fields,
    parse_input,
    save_object,
)
from producer.api.errors import ApiError
from producer.api.files import files_folder, read_bytes, store_stream
from producer.api.schemas import EmbeddingsRequest
from producer.api.state import ApiState
from producer.client import Job, ProducerBusy, make_spec
from producer.constants import API_BATCH_LEASE_KEY, API_BATCHES_ACTIVE_KEY, FINAL_STATES
from producer.embeddings import decode_embeddings, embeddings_location
from producer.errors import InvalidJobSpec
from producer.fleet import live_workers, short_model_name
from producer.realtime import RealtimeInput
from producer.results import iter_results, job_output, list_shards
from producer.state import PRODUCER_LOST
from producer.storage import join_location

logger = logging.getLogger(__name__)

POLL_S = 0.5
WORK_THREADS = 4
# Realtime requests of one batch's texts in flight at once; each carries the texts of one batch request.
TEXT_THREADS = 8
# The placeholder label of embedding jobs, whose scores are not used.
IMAGE_LABEL = "image"
# File extensions of images sent as data URIs, by media type; others are stored as `.bin` and decoded by content.
DATA_URI_EXTENSIONS = {
    "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/png": ".png", "image/webp": ".webp", "image/gif": ".gif",
    "image/bmp": ".bmp", "image/tiff": ".tif",
}
CLASSIFICATIONS = "/v1/classifications"

# KEYS: lease key. ARGV: token, TTL in ms. Takes the lease when it is free, or refreshes it when it is ours.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: lease key. ARGV: token, TTL in ms. Returns 1 when refreshed, 0 when the lease is gone or another's.
_REFRESH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Planned:
    """One request of a batch with what it needs: its group's images (`uris`, None for a text input) and texts."""

    request: BatchRequest
    body: BaseModel | None = None
    error: ApiError | None = None  # the body was rejected before anything ran
    group: str | None = None
    uris: list[str | None] = field(default_factory=list)
    texts: list[RealtimeInput] = field(default_factory=list)


@dataclass
class Group:
    """The requests that run as one job: `options` are `make_spec` keywords, `uris` the job's images in order."""

    name: str
    options: dict[str, Any]
    uris: dict[str, None] = field(default_factory=dict)  # an ordered set


@dataclass
class Plan:
    requests: list[Planned]
    groups: dict[str, Group]

    @property
    def has_texts(self) -> bool:
        return any(planned.texts and planned.error is None for planned in self.requests)


class BatchDriver:
    """Advances every active batch, one step per pass, from a daemon thread. `start` once, `stop` once.

    A second daemon thread refreshes the leases held, every third of the lease time, so a slow step (a large
    plan or output file) does not let a lease expire while this driver still works on the batch.
    """

    def __init__(self, state: ApiState, poll_s: float = POLL_S, lease_s: float | None = None) -> None:
        """`lease_s`: seconds after the last refresh before another server may take a batch over; by default
        CLIPFLEET_PRODUCER_LEASE_S, since the API server is the producer of its batches' jobs."""
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
                    if not self.redis.eval(_REFRESH, 1, key, self.token, self.lease_ms):
                        logger.info("Batch %s: lease released or taken by another server", batch_id)
                except Exception:
                    logger.exception("Batch %s: refreshing the lease failed; retrying", batch_id)

    def _acquire(self, batch_id: str) -> bool:
        """Take the batch's lease, or refresh it when this driver holds it already. Returns False when another holds it."""
        key = API_BATCH_LEASE_KEY.format(batch_id=batch_id)
        held = bool(self.redis.eval(_ACQUIRE, 1, key, self.token, self.lease_ms))
        with self._held_lock:
            if held:
                self._held.add(batch_id)
            else:
                self._held.discard(batch_id)
        return held

    def _release(self, batch_id: str) -> None:
        self.redis.eval(_RELEASE, 1, API_BATCH_LEASE_KEY.format(batch_id=batch_id), self.token)
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
        with ThreadPoolExecutor(TEXT_THREADS, thread_name_prefix="clipfleet-batch-texts") as pool:
            for start in range(0, len(pending), TEXT_THREADS * 4):
                if self._stop.is_set() or self.redis.hexists(batch_key(batch_id), "cancel_requested_at"):
                    return
                chunk = pending[start:start + TEXT_THREADS * 4]
                for planned, result in zip(chunk, pool.map(self._embed_request, chunk)):
                    results[planned.request.custom_id] = result
        texts = json.dumps(results).encode("utf-8")
        self.state.storage.put_bytes(join_location(batch_folder(self.state, batch_id), "texts.json"), texts, "application/json")
        self.redis.hset(batch_key(batch_id), "texts_done", "1")
        logger.info("Batch %s: texts of %d requests embedded", batch_id, len(pending))

    def _embed_request(self, planned: Planned) -> dict[str, Any]:
        assert isinstance(planned.body, EmbeddingsRequest)
        try:
            vectors, tokens = realtime.embed(self.state, planned.body.model, planned.texts)
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


def batch_folder(state: ApiState, batch_id: str) -> str:
    """Return the folder of a batch's manifests, stored images, texts and job results."""
    return join_location(files_folder(state), "batches", batch_id)


class PlanBuilder:
    """Builds a batch's Plan: checks each request's body, stores its data URI images, and groups the requests."""

    def __init__(self, state: ApiState, batch: dict[str, Any]) -> None:
        self.state = state
        self.batch = batch
        self.models: dict[str, str | None] = {}
        self.groups: dict[str, Group] = {}  # by the canonical JSON of the group's options

    def build(self) -> Plan:
        content = read_bytes(self.state, self.batch["input_file_id"])
        requests, _ = parse_input(content, self.batch["endpoint"])
        plan_one = self._classification if self.batch["endpoint"] == CLASSIFICATIONS else self._embedding
        planned = [self._checked(plan_one, request) for request in requests]
        return Plan(planned, {group.name: group for group in self.groups.values()})

    @staticmethod
    def _checked(plan_one: Any, request: BatchRequest) -> Planned:
        try:
            return plan_one(request)
        except ApiError as e:
            return Planned(request, error=e)
        except ValidationError as e:
            return Planned(request, error=body_error(e))

    def _classification(self, request: BatchRequest) -> Planned:
        body = ClassificationBody.model_validate(request.body)
        model = self._model(body.model)
        uri = self._image(request, 0, body.input)
        options = body.model_dump(exclude={"input"}) | {"model": model}
        group = self._group("c", options)
        group.uris[uri] = None
        return Planned(request, body, group=group.name, uris=[uri])

    def _embedding(self, request: BatchRequest) -> Planned:
        body = EmbeddingsRequest.model_validate(request.body)
        inputs = realtime.parse_inputs(body.input, self.state.settings)
        values = [body.input] if isinstance(body.input, str) else body.input
        uris = [self._image(request, index, value) if item.kind == "image" else None for index, (item, value) in enumerate(zip(inputs, values))]
        planned = Planned(request, body, uris=uris, texts=[item for item in inputs if item.kind == "text"])
        images = [uri for uri in uris if uri is not None]
        if images:
            options = {"model": self._model(body.model), "labels": [IMAGE_LABEL], "top_k": 1, "store_embeddings": True, "embeddings_dtype": "float32"}
            group = self._group("e", options)
            group.uris.update(dict.fromkeys(images))
            planned.group = group.name
        return planned

    def _group(self, prefix: str, options: dict[str, Any]) -> Group:
        key = json.dumps(options, sort_keys=True)
        if key not in self.groups:
            self.groups[key] = Group(f"{prefix}{len(self.groups):04d}", options)
        return self.groups[key]

    def _model(self, model: str) -> str:
        """Return the CLIPFLEET_MODEL value that `model` names: a live worker's, or this server's own setting.

        Raises ApiError 404 when neither matches, by the exact value or its last path component.
        """
        if model not in self.models:
            known = [worker.model for worker in live_workers(self.state.client.store.redis)] + [self.state.settings.model]
            self.models[model] = next((value for value in known if model in (value, short_model_name(value))), None)
        resolved = self.models[model]
        if resolved is None:
            raise ApiError(404, f"model {model!r} is not served by any live worker; list the models with GET /v1/models", code="model_not_found", param="model")
        return resolved

    def _image(self, request: BatchRequest, index: int, value: str) -> str:
        """Return the location the job reads input `index` from: its s3:// URI, or where its data URI image is stored."""
        item = realtime.parse_input(value, index, self.state.settings)
        if item.kind != "image":
            raise ApiError(400, f"input {value[:60]!r} is not an image: use an s3:// URI or a data:image/ URI", code="invalid_input", param="input")
        if item.uri is not None:
            return item.uri
        media_type = value[len("data:"):].split(";", 1)[0].lower()
        name = f"{request.line:06d}-{index:04d}{DATA_URI_EXTENSIONS.get(media_type, '.bin')}"
        location = join_location(batch_folder(self.state, self.batch["id"]), "images", name)
        self.state.storage.put_bytes(location, base64.b64decode(item.data or ""), media_type)
        return location


def body_error(error: ValidationError) -> ApiError:
    """Return the 400 of a request body that fails validation, naming the first invalid field."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, code="invalid_request", param=param)


@dataclass
class Outcome:
    """What a batch's requests got: the job rows and stored embeddings by group and URI, and the texts' replies."""

    plan: Plan
    status: str
    rows: dict[str, dict[str, dict[str, Any]]]
    vectors: dict[str, dict[str, np.ndarray]]
    texts: dict[str, Any]
    group_errors: dict[str, str]
    image_tokens: dict[str, int]
    completed: int = 0
    failed: int = 0

    @classmethod
    def collect(cls, state: ApiState, plan: Plan, fields: dict[str, str], status: str) -> Outcome:
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        vectors: dict[str, dict[str, np.ndarray]] = {}
        tokens: dict[str, int] = {}
        for name, group in plan.groups.items():
            job_id = fields.get(f"job:{name}")
            if job_id is None:
                continue
            spec = state.client.store.spec(job_id)
            rows[name] = {row["uri"]: row for row in iter_results(state.storage, spec, job_id)}
            if spec.store_embeddings:
                vectors[name] = read_vectors(state, job_output(spec, job_id))
                tokens[name] = image_tokens(spec.model)
        texts: dict[str, Any] = {}
        if fields.get("texts_done"):
            texts = json.loads(state.storage.get_bytes(join_location(batch_folder(state, plan_batch_id(fields)), "texts.json")))
        group_errors = {name[len("group_error:"):]: value for name, value in fields.items() if name.startswith("group_error:")}
        return cls(plan, status, rows, vectors, texts, group_errors, tokens)

    def counts(self) -> dict[str, int]:
        return {"total": len(self.plan.requests), "completed": self.completed, "failed": self.failed}

    def output_lines(self) -> Iterator[dict[str, Any]]:
        """Yield the lines of the output file, counting the completed requests."""
        for planned in self.plan.requests:
            result = self._result(planned)
            if isinstance(result, dict):
                self.completed += 1
                yield response_line(planned.request.custom_id, 200, result)

    def error_lines(self) -> Iterator[dict[str, Any]]:
        """Yield the lines of the error file, counting the failed requests. Call after `output_lines`."""
        for planned in self.plan.requests:
            result = self._result(planned)
            if isinstance(result, ApiError):
                self.failed += 1
                yield response_line(planned.request.custom_id, result.status, result.body())
            elif result is None:
                self.failed += 1
                yield unfinished_line(planned.request.custom_id, self.status)

    def _result(self, planned: Planned) -> dict[str, Any] | ApiError | None:
        """Return a request's response body, its error, or None when it did not finish."""
        if planned.error is not None:
            return planned.error
        if planned.group is not None and planned.group in self.group_errors:
            return ApiError(400, self.group_errors[planned.group], code="invalid_request")
        if isinstance(planned.body, ClassificationBody):
            return self._classification(planned)
        return self._embedding(planned)

    def _classification(self, planned: Planned) -> dict[str, Any] | ApiError | None:
        row = self.rows.get(planned.group or "", {}).get(planned.uris[0] or "")
        if row is None:
            return None
        if row.get("error"):
            return image_error(row, 0)
        return row

    def _embedding(self, planned: Planned) -> dict[str, Any] | ApiError | None:
        assert isinstance(planned.body, EmbeddingsRequest)
        text_result = self.texts.get(planned.request.custom_id)
        if planned.texts and text_result is None:
            return None
        if text_result is not None and "error" in text_result:
            error = text_result["error"]
            return ApiError(error["status"], error["message"], code=error["code"], param=error["param"])
        text_vectors = _decode_texts(text_result, len(planned.texts))
        rows: list[np.ndarray] = []
        tokens: list[int] = []
        for index, uri in enumerate(planned.uris):
            if uri is None:
                rows.append(text_vectors[0].pop(0))
                tokens.append(text_vectors[1].pop(0))
                continue
            vector = self.vectors.get(planned.group or "", {}).get(uri)
            if vector is None:
                row = self.rows.get(planned.group or "", {}).get(uri)
                return None if row is None or not row.get("error") else image_error(row, index)
            rows.append(vector)
            tokens.append(self.image_tokens.get(planned.group or "", 0))
        matrix = np.stack(rows).astype(np.float32)  # [inputs, dim]
        try:
            realtime.check_dimensions(planned.body.dimensions, matrix.shape[1], planned.body.model)
        except ApiError as e:
            return e
        return realtime.embeddings_body(matrix, tokens, planned.body.model, planned.body.encoding_format)


def plan_batch_id(fields: dict[str, str]) -> str:
    return json.loads(fields["object"])["id"]


def _decode_texts(result: dict[str, Any] | None, rows: int) -> tuple[list[np.ndarray], list[int]]:
    if result is None or rows == 0:
        return [], []
    raw = base64.b64decode(result["vectors"])
    matrix = np.frombuffer(raw, dtype="<f4").reshape(rows, result["dim"])
    return list(matrix), list(result["tokens"])


def read_vectors(state: ApiState, folder: str) -> dict[str, np.ndarray]:
    """Return the stored float32 embedding of each image of a job's result folder, by URI."""
    vectors: dict[str, np.ndarray] = {}
    for batch, _ in list_shards(state.storage, folder):
        location = embeddings_location(folder, batch)
        if state.storage.exists(location):
            vectors.update(decode_embeddings(state.storage.get_bytes(location)).by_uri())
    return vectors


def image_tokens(model: str) -> int:
    """Return the tokens an image counts for in `usage`: its patches plus one, from the model's config.json.

    Returns 0 when the config is neither in the model's folder nor in the local Hugging Face cache.
    """
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if not isinstance(cached, str):
            return 0
        config_path = Path(cached)
    vision = json.loads(config_path.read_text()).get("vision_config", {})
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 32)
    return (size // patch) ** 2 + 1


def image_error(row: dict[str, Any], index: int) -> ApiError:
    """Return the 400 of a request whose image input `index` has an error row."""
    error = row["error"]
    return ApiError(400, f"input[{index}] {row['uri']}: {error['message']}", code=error["code"], param="input")


def response_line(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """Return a line of an output or error file for a request that got an HTTP response."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body}, "error": None,
    }


def unfinished_line(custom_id: str, status: str) -> dict[str, Any]:
    """Return the error file line of a request without a result: the batch was cancelled or expired before it ran."""
    if status == "expired":
        error = {"code": "batch_expired", "message": "the request could not run before the batch's completion window ended"}
    elif status == "cancelled":
        error = {"code": "batch_cancelled", "message": "the batch was cancelled before this request finished"}
    else:
        # The request's job ended without a row for its image, for example because it was cancelled on its own.
        error = {"code": "result_missing", "message": "the request's job ended without a result for it; run it again"}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None, "error": error}
