"""Schemathesis hooks of the fuzz test (loaded through SCHEMATHESIS_HOOKS): a generated request
may ask for long generations (no max_tokens: up to the context), each costing the shared CPU
seconds. Before a request is sent, every length field that is a positive integer above
MAX_GENERATED (or absent) is set to MAX_GENERATED, so every case stays cheap; a field of another
type (a string, a negative number, ...) is sent as generated, so type and range checks are still
fuzzed."""
from __future__ import annotations

import schemathesis

MAX_GENERATED = 3
# route -> the length fields of its body (chat and completions share the OpenAI names)
LENGTH_FIELDS = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}


def _cap(obj: dict, field: str, always: bool) -> None:
    value = obj.get(field)
    if value is None and always or type(value) is int and value > MAX_GENERATED:
        obj[field] = MAX_GENERATED


@schemathesis.hook
def before_call(context, case, **kwargs):
    body = case.body
    if not isinstance(body, dict):
        return
    path = case.operation.path
    for i, field in enumerate(LENGTH_FIELDS.get(path, ())):
        _cap(body, field, always=i == 0)
    if path == "/generate":
        params = body.get("sampling_params")
        if params is None:
            body["sampling_params"] = params = {}
        for p in params if isinstance(params, list) else [params]:
            if isinstance(p, dict):
                _cap(p, "max_new_tokens", always=True)
