"""Admin endpoints' rules: what /update_weights_from_disk may load, and who may call admin routes.

- A client chooses a load format among the real ones: never ``dummy`` (random weights), so a
  client can corrupt nothing.
- A weight path must resolve (symlinks followed) inside one of --weight-update-dirs; the default
  is the served model's folder and that folder's parent (a GGUF file's folder counts as its own).
- Every refusal and every failed load answers the same one line, whatever the reason (outside the
  allowed folders, missing, not a model, wrong architecture), so the endpoint cannot be used to
  learn which paths exist; the reason goes to the server log.
- ADMIN_PATHS need --admin-api-key when one is set (auth.py); serving on a non-loopback address
  with no key at all is warned about at start-up (``warn_if_exposed``).
"""
from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any, Optional

from fastapi.responses import JSONResponse

from kvyard.errors import RequestError

logger = logging.getLogger(__name__)

ADMIN_PATHS = frozenset({"/update_weights_from_disk", "/flush_cache", "/abort_request", "/load_lora_adapter",
                         "/unload_lora_adapter"})
FORBIDDEN_LOAD_FORMATS = frozenset({"dummy"})
NOT_A_MODEL = ("model_path: not a model the server may load (a model folder or .gguf file of the served "
               "architecture inside --weight-update-dirs)")


def allowed_weight_dirs(args: Any, model_path: str) -> list[str]:
    if args.weight_update_dirs:
        return [os.path.realpath(d) for d in args.weight_update_dirs]
    folder = os.path.realpath(model_path if os.path.isdir(model_path) else os.path.dirname(model_path) or ".")
    return [folder, os.path.dirname(folder)]


def client_load_formats() -> list[str]:
    from kvyard.plugins import registry
    return ["auto"] + [n for n in registry("load_formats").names() if n not in FORBIDDEN_LOAD_FORMATS]


def check_weight_update(args: Any, model_path: str, path: str, load_format: Optional[str]) -> Optional[str]:
    """The resolved path to load, or None when it is not one the server may load.
    RequestError(400, load_format) for a format a client may not choose."""
    allowed = client_load_formats()
    if load_format is not None and load_format not in allowed:
        raise RequestError(f"load_format must be one of {', '.join(allowed)}, got {load_format!r}",
                           param="load_format")
    resolved = os.path.realpath(path)
    inside = any(resolved == d or resolved.startswith(d.rstrip(os.sep) + os.sep)
                 for d in allowed_weight_dirs(args, model_path))
    if not inside or not os.path.exists(resolved):
        logger.warning("update_weights_from_disk refused %r: outside %s or missing", path,
                       allowed_weight_dirs(args, model_path))
        return None
    return resolved


def weight_update_failed(path: str, reason: str) -> JSONResponse:
    logger.warning("update_weights_from_disk %r failed: %s", path, reason)
    return JSONResponse({"success": False, "message": NOT_A_MODEL}, status_code=400)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(args: Any) -> Optional[str]:
    """The start-up warning for a server reachable beyond this machine with no key (or None)."""
    if is_loopback(args.host) or args.api_key or args.admin_api_key:
        return None
    message = (f"serving on {args.host} without --api-key: every endpoint, the admin ones too "
               f"({', '.join(sorted(ADMIN_PATHS))}), is open to anyone who can reach this address; "
               "set --api-key (and --admin-api-key)")
    logger.warning(message)
    return message
