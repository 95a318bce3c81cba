"""The safetensors load format: an HF folder of *.safetensors shards, read lazily.

With LoadConfig.lazy_slices (tensor parallelism) each entry is a kvyard.loader.LazyTensor: the
layer that consumes it reads only its rank's slice from the memory-mapped file.
"""
from __future__ import annotations

from typing import Any, Iterator

from kvyard.loader import LazyTensor, safetensors_files
from kvyard_plugins.loaders.hf_folder import HFFolderLoader, is_model_weight


class SafetensorsLoader(HFFolderLoader):
    name = "safetensors"

    @classmethod
    def can_load(cls, model_path: str) -> bool:
        return bool(safetensors_files(model_path))

    def weights(self, model_path: str, hf_config: Any) -> Iterator[tuple[str, Any]]:
        from safetensors import safe_open

        for path in safetensors_files(model_path):
            # safe_open memory-maps the file; each get_tensor reads one tensor.
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for name in shard.keys():
                    if not is_model_weight(name):
                        continue
                    if self.config.lazy_slices:
                        part = shard.get_slice(name)
                        yield name, LazyTensor(part, tuple(part.get_shape()), self.cast)
                    else:
                        yield name, self.cast(shard.get_tensor(name))
