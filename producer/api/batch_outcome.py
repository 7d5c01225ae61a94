"""The outcome of a batch: each request's response body or error, read from its job rows, stored embeddings
and text replies, and the lines of the output and error files built from them.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer.api import embeddings as realtime
from producer.api.batch_plan import Plan, Planned, batch_folder
from producer.api.batches import ClassificationBody
from producer.api.errors import ApiError
from producer.api.schemas import EmbeddingsRequest
from producer.api.state import ApiState
from producer.embeddings import decode_embeddings, embeddings_location
from producer.results import iter_results, job_output, list_shards
from producer.storage import join_location


@dataclass
class Outcome:
    """The results of a batch's requests: the job rows and stored embeddings by group and URI, and the texts' replies."""

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
