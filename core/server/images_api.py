"""The diffusion server's routes: the OpenAI images API (/v1/images/generations, /v1/images/edits),
the native /generate_image (with per-request progress as server-sent events), the files behind
response_format=url, /health, /get_model_info, /v1/models and /metrics.

A handler validates the request into an ImageJob (400 naming the field), submits it to the
ImageQueue and awaits its future; it never runs the pipeline itself.
"""
from __future__ import annotations

import asyncio
import math
import os
import re
import time
import uuid
from typing import Any, Literal, Optional

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict

from kvyard.errors import RequestError
from kvyard.server.errors import error_response
from kvyard.server.response_models import DiffusionModelInfo, ImagesResponse, ModelList, ok
from kvyard.server.streaming import EventStream, sse, with_errors_and_done

router = APIRouter()
FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


class ImageRequest(BaseModel):
    """POST /v1/images/generations (OpenAI fields, then kvyard's extras) and /generate_image."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [
        {"prompt": "a red square", "size": "32x32", "num_inference_steps": 2}]})
    prompt: str
    model: Optional[str] = None
    n: Optional[int] = None
    size: Optional[str] = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    user: Optional[str] = None
    seed: Optional[int] = None
    negative_prompt: Optional[str] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    num_frames: Optional[int] = None
    height: Optional[int] = None       # native alternative to size
    width: Optional[int] = None
    stream: bool = False               # /generate_image only: progress events


def ctx_of(request: Request):
    return request.app.state.ctx


def job_fields(body: dict, image: Any = None) -> dict:
    """Request fields -> make_job fields (size "WxH" or height/width)."""
    from kvyard.diffusion.jobs import parse_size

    height, width = body.get("height"), body.get("width")
    if body.get("size") is not None:
        if height is not None or width is not None:
            raise RequestError("size: give size or height/width, not both", param="size")
        height, width = parse_size(body["size"])
    return dict(prompt=body.get("prompt"), negative_prompt=body.get("negative_prompt"), image=image,
                height=height, width=width, num_inference_steps=body.get("num_inference_steps"),
                guidance_scale=body.get("guidance_scale"), seed=body.get("seed"), n=body.get("n"),
                num_frames=body.get("num_frames"), strength=body.get("strength"))


def _check_model(ctx, model: Optional[str]) -> None:
    if model is not None and model != ctx.model_name:
        raise RequestError(f"model: {model!r} is not served here (serving {ctx.model_name!r})", param="model",
                           status=404)


async def _render(ctx, request: Request, outputs: list, response_format: str, output_format: str) -> dict:
    """Outputs -> the OpenAI images response body (b64 JSON, or URLs of files under --output-path)."""
    from kvyard.diffusion.outputs import encode_image

    def encode(out) -> tuple[bytes, str]:
        if ctx.engine.info.is_video:
            return _mp4_bytes(out), "mp4"
        fmt = FORMATS[output_format]
        return encode_image(out, fmt), output_format

    data = []
    for out in outputs:
        payload, ext = await asyncio.to_thread(encode, out)
        if response_format == "b64_json":
            import base64
            data.append({"b64_json": base64.b64encode(payload).decode("ascii")})
            continue
        name = f"{uuid.uuid4().hex}.{ext}"
        os.makedirs(ctx.args.output_path, exist_ok=True)
        with open(os.path.join(ctx.args.output_path, name), "wb") as fh:
            fh.write(payload)
        data.append({"url": str(request.url_for("image_file", name=name))})
    return {"created": int(time.time()), "data": data, "output_format": output_format}


def _mp4_bytes(frames: list) -> bytes:
    import tempfile

    from kvyard.diffusion.outputs import save_mp4
    with tempfile.TemporaryDirectory() as tmp:
        path = save_mp4(frames, os.path.join(tmp, "video.mp4"), 8)
        with open(path, "rb") as fh:
            return fh.read()


async def _run(ctx, request: Request, fields: dict, response_format: str, output_format: str) -> dict:
    job = ctx.engine.make_job(fields)
    start = time.perf_counter()
    outputs = await asyncio.wrap_future(ctx.queue.submit(job))
    body = await _render(ctx, request, outputs, response_format, output_format)
    if ctx.metrics is not None:
        ctx.metrics.on_request(time.perf_counter() - start)
    return body


@router.post("/v1/images/generations", responses=ok(ImagesResponse))
async def images_generations(body: ImageRequest, request: Request):
    ctx = ctx_of(request)
    if body.stream:
        raise RequestError("stream: progress streaming is on the native /generate_image endpoint", param="stream")
    _check_model(ctx, body.model)
    return await _run(ctx, request, job_fields(body.model_dump()), body.response_format, body.output_format)


EDIT_FIELDS = {"prompt": str, "model": str, "n": int, "size": str, "response_format": str, "output_format": str,
               "user": str, "seed": int, "negative_prompt": str, "num_inference_steps": int,
               "guidance_scale": float, "strength": float}
_EDIT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {"image": {"type": "string", "format": "binary"},
                   **{name: {"type": {str: "string", int: "integer", float: "number"}[typ]}
                      for name, typ in EDIT_FIELDS.items()}}}}}}}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_FILE = {200: {"description": "the image or video file", "content": {
    "image/png": _BINARY, "image/jpeg": _BINARY, "image/webp": _BINARY, "video/mp4": _BINARY}}}


@router.post("/v1/images/edits", openapi_extra=_EDIT_BODY, responses=ok(ImagesResponse))
async def images_edits(request: Request):
    """multipart/form-data: image (file) + prompt, and the fields of EDIT_FIELDS."""
    ctx = ctx_of(request)
    try:
        form = await request.form()
    except Exception as exc:
        raise RequestError(f"body: expected multipart/form-data with an image file ({exc})", param="image") from None
    body: dict[str, Any] = {}
    image = None
    for key, value in form.multi_items():
        if key in ("image", "image[]"):
            image = await _read_image(value)
        elif key == "mask":
            raise RequestError("mask: inpainting masks are not supported; the image is edited as a whole",
                               param="mask")
        elif key not in EDIT_FIELDS:
            raise RequestError(f"{key}: unknown field", param=key)
        else:
            body[key] = _convert(key, value, EDIT_FIELDS[key])
    if image is None:
        raise RequestError("image: give the input image as a file part", param="image")
    response_format = body.get("response_format", "b64_json")
    output_format = body.get("output_format", "png")
    if response_format not in ("b64_json", "url"):
        raise RequestError("response_format: must be b64_json or url", param="response_format")
    if output_format not in ("png", "jpeg", "webp"):
        raise RequestError("output_format: must be png, jpeg or webp", param="output_format")
    _check_model(ctx, body.get("model"))
    return await _run(ctx, request, job_fields(body, image), response_format, output_format)


def _convert(key: str, value: Any, typ: type) -> Any:
    if not isinstance(value, str):
        raise RequestError(f"{key}: expected a form field, got a file", param=key)
    try:
        converted = typ(value)
    except ValueError:
        raise RequestError(f"{key}: expected {typ.__name__}, got {value!r}", param=key) from None
    if typ is float and not math.isfinite(converted):
        raise RequestError(f"{key}: must be a finite number, got {value!r}", param=key)
    return converted


async def _read_image(upload: Any):
    from PIL import Image, UnidentifiedImageError
    import io
    if isinstance(upload, str) or not hasattr(upload, "read"):
        raise RequestError("image: expected a file part", param="image")
    data = await upload.read()
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise RequestError("image: the file is not a readable image (PNG, JPEG or WebP)", param="image") from None


@router.post("/generate_image", responses=ok(ImagesResponse))
async def generate_image(body: ImageRequest, request: Request):
    """Native: the same fields; with stream=true, server-sent events {"step", "total_steps"} per
    denoising step, then the response body, then [DONE]."""
    ctx = ctx_of(request)
    _check_model(ctx, body.model)
    if not body.stream:
        return await _run(ctx, request, job_fields(body.model_dump()), body.response_format, body.output_format)
    job = ctx.engine.make_job(job_fields(body.model_dump()))
    return EventStream(with_errors_and_done(_progress_events(ctx, request, job, body)))


async def _progress_events(ctx, request: Request, job, body: ImageRequest):
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue = asyncio.Queue()
    start = time.perf_counter()

    def on_step(i: int, total: int) -> None:   # on the worker thread
        loop.call_soon_threadsafe(steps.put_nowait, (i, total))

    future = asyncio.wrap_future(ctx.queue.submit(job, on_step))
    while not future.done() or not steps.empty():
        getter = asyncio.ensure_future(steps.get())
        await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            continue
        i, total = getter.result()
        yield sse({"object": "image.progress", "step": i, "total_steps": total})
    outputs = await future
    yield sse(await _render(ctx, request, outputs, body.response_format, body.output_format))
    if ctx.metrics is not None:
        ctx.metrics.on_request(time.perf_counter() - start)


@router.get("/v1/images/files/{name}", name="image_file", response_class=FileResponse, responses=_FILE)
async def image_file(name: str, request: Request):
    ctx = ctx_of(request)
    path = os.path.join(ctx.args.output_path, name)
    if not FILE_NAME.match(name) or not os.path.isfile(path):
        return error_response(404, f"name: no file {name!r}", "name")
    return FileResponse(path)


@router.get("/health", response_class=Response, responses={200: {"description": "ready (no body)", "content": {}}})
async def health(request: Request):
    ctx = ctx_of(request)
    if not ctx.ready:
        return error_response(503, "the server is starting up")
    if not ctx.queue.alive():
        return error_response(503, "the pipeline worker is not running")
    return Response(status_code=200)


@router.get("/get_model_info", responses=ok(DiffusionModelInfo))
async def get_model_info(request: Request):
    ctx = ctx_of(request)
    info = ctx.engine.info
    return {"model_path": ctx.args.model_path, "is_generation": True, "model_type": "diffusion",
            "pipeline_class": info.pipeline_class, "task": info.task, "backend": info.backend,
            "default_size": f"{info.default_width}x{info.default_height}", "size_multiple": info.size_multiple}


@router.get("/v1/models", responses=ok(ModelList))
async def list_models(request: Request):
    ctx = ctx_of(request)
    return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": ctx.started,
                                        "owned_by": "kvyard"}]}


async def metrics(request: Request):
    ctx = ctx_of(request)
    from prometheus_client import CONTENT_TYPE_LATEST
    return Response(ctx.metrics.render(ctx.queue.queue_length()), media_type=CONTENT_TYPE_LATEST)
