"""The plan of a batch: its requests with their checked bodies, grouped into the jobs they run as.

PlanBuilder reads the input file, checks each request body, and stores images sent as data URIs under the
batch folder so that a job can read them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from producer.api import embeddings as realtime
from producer.api.batches import BatchRequest, ClassificationBody, parse_input
from producer.api.errors import ApiError, describe_problems
from producer.api.files import files_folder, read_bytes
from producer.api.schemas import EmbeddingsRequest
from producer.api.state import ApiState
from producer.fleet import live_workers, short_model_name
from producer.realtime import RealtimeInput
from producer.storage import join_location

# The placeholder label of embedding jobs, whose scores are not used.
IMAGE_LABEL = "image"
# File extensions of images sent as data URIs, by media type; others are stored as `.bin` and decoded by content.
DATA_URI_EXTENSIONS = {
    "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/png": ".png", "image/webp": ".webp", "image/gif": ".gif",
    "image/bmp": ".bmp", "image/tiff": ".tif",
}
CLASSIFICATIONS = "/v1/classifications"


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
        self._model(body.model)  # a model no worker serves fails the request with 404, texts included
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
            raise ApiError(400, f"input[{index}] {value[:60]!r} is not an image: use an s3:// URI or a data:image/ URI", code="invalid_input", param="input")
        if item.uri is not None:
            return item.uri
        media_type = value[len("data:"):].split(";", 1)[0].lower()
        name = f"{request.line:06d}-{index:04d}{DATA_URI_EXTENSIONS.get(media_type, '.bin')}"
        location = join_location(batch_folder(self.state, self.batch["id"]), "images", name)
        self.state.storage.put_bytes(location, base64.b64decode(item.data or ""), media_type)
        return location


def body_error(error: ValidationError) -> ApiError:
    """Return the 400 of a request body that fails validation, naming the first invalid field."""
    return describe_problems(list(error.errors()))
