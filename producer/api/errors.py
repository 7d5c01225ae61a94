"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a matching HTTP status."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# Errors of the connection to Redis, from redis-py and from Celery's broker connection, returned as 503.
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError)

# OpenAI's error types by HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}


class ApiError(Exception):
    """An error returned to the client. `message` names the bad value and what to do instead."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, param=self.param)


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """Return OpenAI's error object for `status`."""
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Return every error, including FastAPI's own validation errors and unknown routes, in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail)
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /openapi.json for the API"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        code = "request_too_large" if error.status_code == 413 else None
        return error_response(ApiError(error.status_code, message, code=code))

    for error_class in REDIS_ERRORS:
        app.add_exception_handler(error_class, _redis_error)


async def _redis_error(request: Request, error: Exception) -> JSONResponse:
    logger.warning("%s %s failed: Redis is unreachable: %s", request.method, request.url.path, error)
    return error_response(redis_unavailable())


def redis_unavailable() -> ApiError:
    """Return the 503 of a request that failed because Redis, which carries every request to the workers, is unreachable."""
    return ApiError(
        503, "the API server cannot reach Redis, which carries requests to the workers; retry later, and check that "
        "the Redis of CLIPFLEET_REDIS_URL is running", code="redis_unavailable",
    )


def validation_error(error: RequestValidationError) -> ApiError:
    """Turn FastAPI's 422 into OpenAI's 400: `invalid_json` for a body that does not parse, otherwise `invalid_request`
    naming the first invalid field and the problem."""
    problems = list(error.errors())
    first = problems[0] if problems else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return invalid_json(first)
    if first.get("type") == "model_attributes_type" and tuple(first.get("loc", ())) == ("body",):
        return ApiError(
            400, "the request body must be a JSON object; send one with the header Content-Type: application/json",
            code="invalid_request", param=None,
        )
    return describe_problems(problems, skip=("body", "query", "path"))


def invalid_json(problem: Any) -> ApiError:
    """Return the 400 of a body that is not valid JSON; pydantic gives the byte offset as the last part of `loc`."""
    position = next((part for part in reversed(problem.get("loc", ())) if isinstance(part, int)), None)
    reason = problem.get("ctx", {}).get("error", "decode error")
    where = f" at byte {position}" if position is not None else ""
    return ApiError(
        400, f"the request body is not valid JSON ({reason}{where}); send a JSON object with the header "
        "Content-Type: application/json", code="invalid_json", param=None,
    )


def describe_problems(problems: list[Any], skip: tuple[str, ...] = ()) -> ApiError:
    """Return the 400 of pydantic validation `problems`, naming the first invalid field by its path.

    pydantic adds the name of each type of a union to the location (`labels.list[str]`); these names are left out
    of `param` and listed in the message as the accepted types.
    """
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    path = field_path(first.get("loc", ()), skip)
    param = ".".join(path) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    branches = union_branches(problems, path, skip)
    if len(branches) > 1:
        message = f"the value matches none of the accepted types: {' or '.join(branches)}"
    if param:
        message = f"{param}: {message}"
    return ApiError(400, message, code="invalid_request", param=param)


def field_path(loc: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """Return the field names and list indexes of a pydantic location, without `skip` parts and union type names."""
    return [str(part) for part in loc if part not in skip and not _is_type_name(part)]


def union_branches(problems: list[Any], path: list[str], skip: tuple[str, ...]) -> list[str]:
    """Return the union type names that problems at field `path` were checked against, in order."""
    names: list[str] = []
    for problem in problems:
        loc = [part for part in problem.get("loc", ()) if part not in skip]
        for index, part in enumerate(loc):
            if _is_type_name(part) and field_path(loc[:index]) == path and part not in names:
                names.append(str(part))
    return names


def _is_type_name(part: object) -> bool:
    """Return True for a location part that pydantic adds for a union branch (`list[str]`, `str`, `int`...)."""
    return isinstance(part, str) and ("[" in part or part in _SCALAR_TYPE_NAMES)


_SCALAR_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "constrained-str", "constrained-int"})
