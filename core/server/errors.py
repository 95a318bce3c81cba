"""Error bodies and the FastAPI handlers that turn every failure (bad field, unknown route, dead
engine, bug) into one: OpenAI's {"error": {"message", "type", "param", "code"}}, and under
/v1/messages (the Anthropic Messages API) Anthropic's {"type": "error", "error": {"type",
"message"}}. Messages start with the field they are about."""
from __future__ import annotations

import logging
import re
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvyard.errors import EngineDeadError, RequestError

logger = logging.getLogger(__name__)
_MODEL_NAME = re.compile(r"^[A-Z][A-Za-z]+$")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "internal_server_error",
               501: "not_implemented_error", 503: "service_unavailable_error"}


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


ANTHROPIC_PATH = "/v1/messages"
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error"),
                                       "message": message}}


def error_body_for(path: str, status: int, message: str, param: Optional[str] = None) -> dict:
    """The error body of the API ``path`` belongs to."""
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return anthropic_error_body(status, message)
    return error_body(status, message, param)


def error_response(status: int, message: str, param: Optional[str] = None, path: str = "",
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body_for(path, status, message, param), status_code=status, headers=headers)


def renamed(exc: RequestError, names: dict[str, str]) -> RequestError:
    """``exc`` about a field another API calls differently (chat field prefix -> that API's)."""
    for old, new in names.items():
        if exc.param and exc.param.startswith(old):
            param = new + exc.param[len(old):]
            return RequestError(exc.message.replace(exc.param, param, 1), param=param, status=exc.status)
    return exc


def validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """(one-line message, field) for the first problem pydantic found."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # pydantic adds the union member's type name to loc ("prompt.list[int].0"); drop those parts
    loc = [p for p in loc if "[" not in p and p not in ("str", "int", "list", "function-after")
           and not _MODEL_NAME.match(p)]  # and the model's name, for a union of models
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_response(exc.status, exc.message, exc.param, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message, path=request.url.path, headers=exc.headers)  # 405 keeps its Allow

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError):
        return error_response(503, f"the engine is not running: {exc}", path=request.url.path)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("internal error serving %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", path=request.url.path)
