"""The pt load format: an HF folder of PyTorch pickles (pytorch_model.bin, *.bin, *.pt)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from kvyard.loader import pt_files
from kvyard_plugins.loaders.hf_folder import HFFolderLoader, is_model_weight


class PtLoader(HFFolderLoader):
    name = "pt"

    @classmethod
    def can_load(cls, model_path: str) -> bool:
        return bool(pt_files(model_path))

    def weights(self, model_path: str, hf_config: Any) -> Iterator[tuple[str, Any]]:
        for path in pt_files(model_path):
            state = _load_state_dict(path)
            for name, tensor in state.items():
                if is_model_weight(name):
                    yield name, self.cast(tensor)
            del state


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """weights_only (no arbitrary pickles); memory-mapped when the file is in the zip format
    that torch.save has written since 1.6, read whole for the legacy format."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"model_path: {path} holds a {type(state).__name__}, not a state dict")
    return state
