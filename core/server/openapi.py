"""/openapi.json as the server really answers, so a schema-driven client (or a fuzzer) can trust it.

FastAPI derives the request bodies from the routes' pydantic models (core/server/protocol.py) and
the success bodies from their ``responses=`` models (core/server/response_models.py); this module
corrects what FastAPI assumes but the server does not do:

- a bad request is a 400 with the OpenAI error body (errors.py), never FastAPI's 422;
- the other errors have the same body: 401 (with a key), 404 (routes naming an object), 413
  (routes with a body), 503 (starting up, engine gone) per operation, the rest (405, 501, 500)
  as the ``default`` response;
- the streaming routes answer ``text/event-stream`` when the request asks to stream;
- with --api-key, every operation but /health declares the bearer scheme.
"""
from __future__ import annotations

import warnings
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kvyard.server.protocol import ErrorResponse

STREAMING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/generate", "/v1/responses",
                             "/v1/messages", "/generate_image"})
TEXT_PATHS = frozenset({"/start_profile", "/stop_profile", "/metrics"})   # answer text/plain
ANTHROPIC_PREFIX = "/v1/messages"                              # errors in Anthropic's shape (errors.py)
_ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"],
                    "properties": {"type": {"const": "error"},
                                   "error": {"type": "object", "required": ["type", "message"],
                                             "properties": {"type": {"type": "string"},
                                                            "message": {"type": "string"}}}}}
OPEN_PATHS = frozenset({"/health"})
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _document_400(responses: dict) -> None:
    """A bad field is always the OpenAI error body; a route's own 400 body (AdminResult) is one
    more possibility, not a replacement."""
    bad = _error("a bad field (param names it) or a body that is not strict JSON")
    own = responses.get("400", {}).get("content", {}).get("application/json", {}).get("schema")
    if own is None:
        responses["400"] = bad
    elif own != _ERROR_REF:
        responses["400"]["content"]["application/json"]["schema"] = {"anyOf": [own, _ERROR_REF]}


def _document_errors(responses: dict, path: str, operation: dict, keyed: bool) -> None:
    """The error statuses every operation may answer, each with the error body; ``default``
    covers the rest (405 wrong method, 501 feature not installed, 500 a bug)."""
    if keyed:
        responses.setdefault("401", _error("missing or wrong API key"))
    if "{" in path:
        responses.setdefault("404", _error("no such object (the path names it)"))
    if "requestBody" in operation:
        responses.setdefault("413", _error("body over --max-request-body-mb, or prompt longer than the context"))
    responses.setdefault("503", _error("starting up (warming up) or the engine is gone"))
    responses["default"] = _error("any other error: 405 wrong method, 501 feature not installed, 500 a bug")


def install_openapi(app: FastAPI, api_key: bool) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            with warnings.catch_warnings():   # a route serving two methods: made unique in _corrected
                warnings.filterwarnings("ignore", message="Duplicate Operation ID")
                schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = _corrected(schema, api_key)
        return app.openapi_schema
    app.openapi = openapi


def _corrected(schema: dict, api_key: bool) -> dict:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    operation_ids: set[str] = set()
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if operation.get("operationId") in operation_ids:   # one route, several methods
                operation["operationId"] += f"_{method}"
            operation_ids.add(operation.get("operationId"))
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            _document_400(responses)
            _document_errors(responses, path, operation, api_key and path not in OPEN_PATHS)
            if path in STREAMING_PATHS and "200" in responses:
                responses["200"].setdefault("content", {})["text/event-stream"] = {"schema": {"type": "string"}}
            if path in TEXT_PATHS and "200" in responses:
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if path.startswith(ANTHROPIC_PREFIX):
                _anthropic_errors(responses)
            if api_key and path not in OPEN_PATHS:
                operation["security"] = [{"bearer": []}]
    return schema


def _anthropic_errors(responses: dict) -> None:
    """/v1/messages answers errors in Anthropic's body shape, not OpenAI's."""
    for code, response in responses.items():
        content = response.get("content", {}).get("application/json")
        if content is not None and content.get("schema") == _ERROR_REF and code != "200":
            content["schema"] = _ANTHROPIC_ERROR
