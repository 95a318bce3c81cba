"""Writing what a pipeline made: images as PNG/JPEG/WebP (by file extension), videos as MP4
(imageio with its ffmpeg plugin, the optional "video" extra) or as numbered frames.
Images are PIL images; a video is a list of PIL frames."""
from __future__ import annotations

import base64
import io
import os
import re
from typing import Any

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
VIDEO_FORMATS = (".mp4",)
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def image_format(file_name: str, field: str = "output_file_name") -> str:
    ext = os.path.splitext(file_name)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"{field}: unknown image format {ext or '(none)'!r}; use one of "
                         f"{', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[ext]


def encode_image(image: Any, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def b64_image(image: Any, fmt: str = "PNG") -> str:
    return base64.b64encode(encode_image(image, fmt)).decode("ascii")


def save_image(image: Any, path: str) -> str:
    fmt = image_format(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(encode_image(image, fmt))
    return path


def save_frames(frames: list, folder: str, stem: str) -> list[str]:
    """frames as <folder>/<stem>_frame_0000.png ..."""
    os.makedirs(folder, exist_ok=True)
    return [save_image(f, os.path.join(folder, f"{stem}_frame_{i:04d}.png")) for i, f in enumerate(frames)]


def save_mp4(frames: list, path: str, fps: int) -> str:
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the writer imageio uses for .mp4)
    except ImportError:
        raise ValueError('output_file_name: writing MP4 needs imageio with ffmpeg; pip install "kvyard[video]" '
                         "(or pass --return-frames to write PNG frames)") from None
    import numpy as np
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame.convert("RGB")))
    return path


def default_file_name(prompt: str, seed: int, video: bool) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", prompt).strip("_")[:48] or "output"
    return f"{slug}_{seed}{'.mp4' if video else '.png'}"


def numbered(path: str, index: int, count: int) -> str:
    """path for output ``index`` of ``count``: the path itself when there is one."""
    if count == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{index}{ext}"
