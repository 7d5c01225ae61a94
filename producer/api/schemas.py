"""Request and response bodies of the models and embeddings routes, in the shapes of OpenAI's API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema

# The shapes OpenAI's API accepts for `input`. Only text strings are embedded here: token arrays are rejected with a
# message of their own by producer.api.embeddings.parse_inputs, so the field is not validated by type.
_OPENAI_INPUT_SCHEMA = TypeAdapter(str | list[str] | list[int] | list[list[int]]).json_schema()

EMBEDDINGS_DESCRIPTION = """\
Embed texts and images with the CLIP model of a live worker. The embeddings are L2-normalised, as CLIP compares them.

Each string of `input` is read by its start:

- `s3://bucket/key`: an image in object storage, read by the worker. The bucket must be in
  CLIPFLEET_ALLOWED_BUCKETS when that setting is not empty, and the key must not be empty.
- `data:image/...;base64,...`: an image file sent inline, at most CLIPFLEET_MAX_IMAGE_BYTES once decoded.
  A data URI of any other type (`data:text/plain,...`) is invalid: send a text as a plain string.
- anything else: a text, embedded by the text tower. An empty string is invalid.

Token arrays (lists of integers) are not supported. `dimensions` must equal the model's embedding size when given.
`encoding_format: base64` returns each embedding as base64 of its little-endian float32 values.
`usage.prompt_tokens` counts the text tokens of each text and, for each image, its patches plus one.
"""


class EmbeddingsRequest(BaseModel):
    """The body of `POST /v1/embeddings`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="A model id of GET /v1/models, or its last path component")
    input: Annotated[Any, WithJsonSchema(_OPENAI_INPUT_SCHEMA)] = Field(
        description="A string or a list of strings, each a text or an image; the description of POST /v1/embeddings gives the rule"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's embedding size when given")
    user: str | None = Field(None, description="Accepted for compatibility and ignored")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a list of floats, or base64 of little-endian float32 with encoding_format=base64


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str  # the model id of the request, as the client sent it
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int  # Unix seconds: when the longest-running worker serving the model started
    owned_by: str = "clipfleet"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str  # what failed, on which value, and what to do next
    type: str  # OpenAI's error type of the status, such as invalid_request_error
    param: str | None = None  # the request field at fault
    code: str | None = None  # a stable identifier, such as invalid_input or model_not_served


class ErrorResponse(BaseModel):
    """The body of every error response, in OpenAI's shape."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Return the `responses` argument of a route that fails with `statuses`, for its OpenAPI description."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


ERROR_DESCRIPTIONS = {
    400: "The request, one of its fields or inputs, or its JSON is invalid",
    401: "The API key is missing or not one of CLIPFLEET_API_KEYS",
    404: "The file or batch named in the path does not exist",
    409: "The batch has already ended, so it can no longer be cancelled",
    413: "The body is over CLIPFLEET_API_MAX_REQUEST_BYTES (an upload over CLIPFLEET_API_MAX_FILE_BYTES), or an image "
    "over CLIPFLEET_MAX_IMAGE_BYTES",
    429: "The model's realtime queue is at CLIPFLEET_API_QUEUE_HIGH_WATER; retry after the Retry-After seconds",
    500: "A worker failed or sent a malformed reply, or reading or writing object storage failed",
    503: "No live worker serves the model, Redis is unreachable, or files and batches are disabled because "
    "CLIPFLEET_API_FILES_URI is not set",
    504: "No worker replied within CLIPFLEET_API_TIMEOUT_S",
}


class TopKEntry(BaseModel):
    label: str
    score: float


class RowError(BaseModel):
    code: str  # one of the image error codes of the README's Results section
    message: str


class ClassificationResult(BaseModel):
    """The response body of a /v1/classifications batch request: the image's clipfleet result row."""

    uri: str
    label: str | None  # the best label, or null for a failed image or when no label reaches `threshold`
    score: float | None
    top_k: list[TopKEntry]
    error: RowError | None


class BatchRequestLine(BaseModel):
    """One line of a batch input file, in OpenAI's format."""

    custom_id: str = Field(min_length=1, description="Unique in the file; the output and error lines carry it")
    method: Literal["POST"]
    url: Literal["/v1/embeddings", "/v1/classifications"] = Field(description="The batch's endpoint")
    body: dict[str, Any] = Field(description="An EmbeddingsRequest or a ClassificationRequest")
