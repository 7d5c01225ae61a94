"""The ASGI app of `clipfleet serve`: OpenAI's routes for models, embeddings, files and batches."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api import batches, embeddings, files, models
from producer.api.errors import ApiError, error_response, install_error_handlers
from producer.api.state import ApiState
from producer.settings import Settings

# Routes served without an API key: the API's own description and the liveness probe.
PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/healthz"})
UPLOAD_PATH = "/v1/files"
# Requests that are handled at the same time, each on its own thread; further requests wait for a free thread.
REQUEST_THREADS = 256
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Return the API app for `settings` (by default read from the environment). Connects to nothing yet."""
    state = ApiState.from_settings(settings or Settings())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Sync routes run in anyio's thread pool, and an embeddings request blocks its thread while it waits for a
        # worker. anyio's default of 40 threads would queue the 41st concurrent request behind the others.
        anyio.to_thread.current_default_thread_limiter().total_tokens = REQUEST_THREADS
        stop_background = batches.start_background(state)
        try:
            yield
        finally:
            stop_background()

    app = FastAPI(
        title="clipfleet",
        summary="OpenAI-compatible embeddings, files and batches served by a clipfleet worker fleet",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.api = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, settings=state.settings)
    app.middleware("http")(_check_api_key(state.settings.api_keys))
    for module in (models, embeddings, files, batches):
        app.include_router(module.router)

    add_batch_schemas(app)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


Handler = Callable[[Request], Awaitable[Response]]


def add_batch_schemas(app: FastAPI) -> None:
    """Describe the bodies of batch input lines in /openapi.json, which no route takes directly.

    Adds the components BatchRequestLine, ClassificationRequest (a /v1/classifications body) and
    ClassificationResult (its response body, a clipfleet result row), and removes FastAPI's 422 responses
    (see `drop_validation_responses`).
    """
    from pydantic.json_schema import models_json_schema

    from producer.api.batches import ClassificationBody
    from producer.api.schemas import BatchRequestLine, ClassificationResult

    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build_openapi()
        models = [(BatchRequestLine, "validation"), (ClassificationBody, "validation"), (ClassificationResult, "serialization")]
        _, definitions = models_json_schema(models, ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in definitions["$defs"].items():
            components.setdefault("ClassificationRequest" if name == "ClassificationBody" else name, definition)
        drop_validation_responses(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def drop_validation_responses(schema: dict[str, Any]) -> None:
    """Remove the 422 response FastAPI lists on routes with parameters, and its schemas: invalid requests get
    400 in OpenAI's error shape (producer.api.errors.validation_error)."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _check_api_key(keys: list[str]) -> Callable[[Request, Handler], Awaitable[Response]]:
    """Middleware: with CLIPFLEET_API_KEYS set, return 401 unless `Authorization: Bearer KEY` names one of them."""
    accepted = [key.encode() for key in keys]

    async def check(request: Request, call_next: Handler) -> Response:
        if not accepted or request.url.path in PUBLIC_PATHS:
            return await call_next(request)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return error_response(ApiError(
                401, "missing API key: send the header `Authorization: Bearer KEY` with a key from CLIPFLEET_API_KEYS",
                code="invalid_api_key",
            ))
        candidate = given.strip().encode()
        # Compare with every key, in constant time per key, so the time taken does not reveal a matching prefix.
        if not any([hmac.compare_digest(candidate, key) for key in accepted]):
            return error_response(ApiError(401, "incorrect API key: it is not one of CLIPFLEET_API_KEYS", code="invalid_api_key"))
        return await call_next(request)

    return check


class BodyLimit:
    """ASGI middleware: return 413 for a body over the route's limit (uploads have their own, see `body_limit`).

    A declared Content-Length over the limit is rejected before the body is read. A body sent without one
    (chunked) is counted as it arrives, and reading stops with 413 once it passes the limit.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit_bytes, setting = body_limit(self.settings, scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit_bytes:
            await error_response(body_too_large(int(declared), limit_bytes, setting))(scope, receive, send)
            return
        received_bytes = 0

        async def receive_within_limit() -> Message:
            nonlocal received_bytes
            message = await receive()
            received_bytes += len(message.get("body", b""))
            if received_bytes > limit_bytes:
                error = body_too_large(received_bytes, limit_bytes, setting)
                # Raised inside the route's body parsing, so FastAPI's exception handlers turn it into the response.
                raise StarletteHTTPException(error.status, error.message)
            return message

        await self.app(scope, receive_within_limit, send)


def body_too_large(size_bytes: int, limit_bytes: int, setting: str) -> ApiError:
    return ApiError(
        413, f"request body of {size_bytes} bytes or more is over the limit of {limit_bytes} bytes ({setting}); "
        "send fewer or smaller inputs", code="request_too_large",
    )


def body_limit(settings: Settings, path: str) -> tuple[int, str]:
    """Return the largest body accepted on `path`, in bytes, and the setting that sets it."""
    if path == UPLOAD_PATH:
        # The multipart envelope around the file adds a few hundred bytes.
        return settings.api_max_file_bytes + 64 * 1024, "CLIPFLEET_API_MAX_FILE_BYTES"
    return settings.api_max_request_bytes, "CLIPFLEET_API_MAX_REQUEST_BYTES"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("clipfleet")
    except metadata.PackageNotFoundError:
        return "unknown"


def run(settings: Settings, host: str, port: int, workers: int = 1) -> None:
    """Serve the API with uvicorn on `host`:`port` until SIGINT or SIGTERM, logging at CLIPFLEET_LOG_LEVEL.

    With `workers` > 1, uvicorn starts that many server processes, each building its app from the environment.
    Access log lines show the client address, method, path and status, never request headers such as API keys.
    """
    import uvicorn

    options: dict[str, Any] = {"host": host, "port": port, "log_config": log_config(settings.log_level)}
    if workers > 1:
        uvicorn.run("producer.api.app:create_app", factory=True, workers=workers, **options)
    else:
        uvicorn.run(create_app(settings), **options)


def log_config(level: str) -> dict[str, Any]:
    """Return the logging configuration of each server process: every logger, uvicorn's too, at `level` on stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {name: {"level": level, "handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
