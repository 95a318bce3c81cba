"""Turns request fields (HTTP body or `kvyard generate` flags) into a checked ImageJob.

Every problem is a RequestError (HTTP 400) naming the field; an argument the loaded pipeline
does not take is refused with the reason (e.g. num_frames on an image pipeline). ``names``
maps a field to the name the caller knows it by (the CLI says image_path where HTTP says image).
"""
from __future__ import annotations

import math
import random
from typing import Any, Optional

from kvyard.diffusion.pipeline import ImageJob, PipelineInfo
from kvyard.errors import RequestError

MAX_STEPS = 1000
MAX_SIDE = 8192
# what the job sets itself; diffusers_kwargs may not override them
OWNED = frozenset({"prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale",
                   "generator", "num_frames", "strength", "image", "output_type", "num_images_per_prompt",
                   "callback_on_step_end", "return_dict"})


def parse_size(size: str, field: str = "size") -> tuple[int, int]:
    """"WxH" -> (height, width)."""
    parts = str(size).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise RequestError(f"{field}: expected WIDTHxHEIGHT such as 512x512, got {size!r}", param=field)
    width, height = (int(p) for p in parts)
    return height, width


def make_job(fields: dict, info: PipelineInfo, max_n: int, names: Optional[dict] = None) -> ImageJob:
    """fields: prompt, negative_prompt, image (PIL), height, width, num_inference_steps,
    guidance_scale, seed, n, num_frames, strength, extra (diffusers kwargs); None = default."""
    names = names or {}

    def bad(field: str, message: str) -> RequestError:
        name = names.get(field, field)
        return RequestError(f"{name}: {message}", param=name)

    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt", "give a non-empty prompt")
    _refuse_inapplicable(fields, info, bad)
    image = fields.get("image")
    if info.needs_image and image is None:
        raise bad("image", f"{info.pipeline_class} ({info.task}) needs an input image")
    height, width = _size(fields, info, image, bad)
    steps = _int(fields, "num_inference_steps", info.default_steps, 1, MAX_STEPS, bad)
    n = _int(fields, "n", 1, 1, max_n, bad)
    seed = fields.get("seed")
    if seed is None:
        seed = random.randrange(2**31)
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63 - max_n:
        raise bad("seed", f"must be an integer in [0, 2**63), got {seed!r}")
    guidance = _float(fields, "guidance_scale", 0.0, None, bad)
    strength = _float(fields, "strength", 0.0, 1.0, bad)
    if strength is not None and strength == 0:
        raise bad("strength", "must be > 0")
    effective = strength if strength is not None else info.default_strength
    if effective is not None and int(steps * effective) < 1:
        raise bad("num_inference_steps", f"{steps} step(s) at strength {effective} leave no denoising step; "
                                         f"give at least {math.ceil(1 / effective)}")
    frames = _int(fields, "num_frames", None, 1, 10_000, bad) if fields.get("num_frames") is not None else None
    negative = fields.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise bad("negative_prompt", "must be a string")
    extra = _extra(fields.get("extra") or {}, info, bad)
    if image is not None and image.size != (width, height):
        image = image.convert("RGB").resize((width, height))
    return ImageJob(prompt=prompt, negative_prompt=negative, image=image, height=height, width=width,
                    num_inference_steps=steps, guidance_scale=guidance, seed=seed, n=n, num_frames=frames,
                    strength=strength, extra=extra)


def _refuse_inapplicable(fields: dict, info: PipelineInfo, bad) -> None:
    cls = info.pipeline_class
    reasons = {
        "negative_prompt": f"{cls} takes no negative prompt",
        "guidance_scale": f"{cls} takes no guidance scale",
        "num_frames": f"{cls} makes images, not video",
        "image": f"{cls} ({info.task}) takes no input image",
        "strength": f"{cls} takes no strength (image-to-image only)",
    }
    for field, reason in reasons.items():
        if fields.get(field) is not None and field not in info.accepts:
            raise bad(field, reason)


def _size(fields: dict, info: PipelineInfo, image: Any, bad) -> tuple[int, int]:
    height, width = fields.get("height"), fields.get("width")
    if (height is None) != (width is None):
        raise bad("height" if height is None else "width", "give both height and width (or neither)")
    if height is None and width is None and image is not None:
        width, height = image.size
        # an input image of any size is resized down to the nearest multiple
        m = info.size_multiple
        height, width = max(m, height - height % m), max(m, width - width % m)
    height = info.default_height if height is None else height
    width = info.default_width if width is None else width
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIDE:
            raise bad(name, f"must be an integer in 1..{MAX_SIDE}, got {value!r}")
        if value % info.size_multiple:
            raise bad(name, f"{value} is not a multiple of {info.size_multiple} "
                            f"(the VAE scale factor x patch size of {info.pipeline_class})")
    return height, width


def _int(fields: dict, name: str, default, lo: int, hi: int, bad) -> int:
    value = fields.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise bad(name, f"must be in {lo}..{hi}, got {value}")
    return value


def _float(fields: dict, name: str, lo: float, hi: Optional[float], bad) -> Optional[float]:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad(name, f"must be a number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise bad(name, f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return float(value)


def _extra(extra: Any, info: PipelineInfo, bad) -> dict:
    if not isinstance(extra, dict):
        raise bad("diffusers_kwargs", "must be a mapping of pipeline call arguments")
    for key in extra:
        if key in OWNED:
            raise bad("diffusers_kwargs", f"{key!r} is set by its own argument, not through diffusers_kwargs")
        if key not in info.accepts:
            raise bad("diffusers_kwargs", f"{info.pipeline_class} takes no argument {key!r}")
    return dict(extra)
