"""Which kind of model a path holds: a diffusers pipeline folder (model_index.json with
``_diffusers_version``) is "diffusion", anything else "llm". --model-type forces one; forcing
the wrong one is a one-line ValueError naming the field."""
from __future__ import annotations

import json
import os
from typing import Optional

MODEL_TYPES = ("auto", "llm", "diffusion")


def read_model_index(path: Optional[str]) -> Optional[dict]:
    """model_index.json of a diffusers folder, or None when the path is not one."""
    if not path or not os.path.isdir(path):
        return None
    index = os.path.join(path, "model_index.json")
    if not os.path.exists(index):
        return None
    try:
        with open(index) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model_path: {index} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) and "_diffusers_version" in data else None


def is_diffusion_model(path: Optional[str]) -> bool:
    return read_model_index(path) is not None


def resolve_model_type(path: Optional[str], requested: str = "auto") -> str:
    """"llm" or "diffusion" for ``path``; ``requested`` is --model-type."""
    if requested not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {requested!r}")
    diffusion = is_diffusion_model(path)
    if requested == "llm" and diffusion:
        raise ValueError(f"model_type: llm was forced but {path} is a diffusers pipeline (model_index.json "
                         "with _diffusers_version); use --model-type diffusion or auto")
    if requested == "diffusion" and not diffusion:
        raise ValueError(f"model_type: diffusion was forced but {path} is not a diffusers pipeline folder "
                         "(no model_index.json with _diffusers_version)")
    return "diffusion" if diffusion else "llm"


def pipeline_components(index: dict) -> dict[str, tuple[Optional[str], Optional[str]]]:
    """component name -> (library, class) from model_index.json; (None, None) for an absent one."""
    out = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        out[name] = (value[0], value[1])
    return out
