"""The ASGI app of `clipfleet serve`: OpenAI's routes for models, embeddings, files and batches."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from producer.api import batches, embeddings, files, models
from producer.api.errors import ApiError, error_response, install_error_handlers
from producer.api.state import ApiState
from producer.settings import Settings

# Routes that answer without an API key: the API's own description and the liveness probe.
PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/healthz"})
UPLOAD_PATH = "/v1/files"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Return the API app for `settings` (by default read from the environment). Connects to nothing yet."""
    state = ApiState.from_settings(settings or Settings())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
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
    app.middleware("http")(_limit_body(state.settings))
    app.middleware("http")(_check_api_key(state.settings.api_keys))
    for module in (models, embeddings, files, batches):
        app.include_router(module.router)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


Handler = Callable[[Request], Awaitable[Response]]


def _check_api_key(keys: list[str]) -> Callable[[Request, Handler], Awaitable[Response]]:
    """Middleware: with CLIPFLEET_API_KEYS set, answer 401 unless `Authorization: Bearer KEY` names one of them."""
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


def _limit_body(settings: Settings) -> Callable[[Request, Handler], Awaitable[Response]]:
    """Middleware: answer 413 for a body declared larger than the route's limit (uploads have their own)."""

    async def limit(request: Request, call_next: Handler) -> Response:
        limit_bytes, setting = body_limit(settings, request.url.path)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
            return error_response(ApiError(
                413, f"request body of {int(declared)} bytes is over the limit of {limit_bytes} bytes ({setting}); "
                "send fewer or smaller inputs", code="request_too_large",
            ))
        return await call_next(request)

    return limit


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


def run(settings: Settings, host: str, port: int, **uvicorn_options: Any) -> None:
    """Serve the API with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, **uvicorn_options)
