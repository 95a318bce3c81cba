"""The dummy load format: random weights from config.json alone, for benchmarks.

The loader never sees the model's parameters, so it takes the checkpoint names and shapes from
transformers' class of the config's architecture, built on the meta device (any architecture
transformers has): projections ~ N(0, 0.02) from a fixed seed (same config -> same weights),
norms = 1, biases = 0.

Tokenizer: the folder's own when it has tokenizer files; otherwise the bundled default model's
(the SmolLM2 GGUF), so config-only folders such as benchmarks/configs/* still serve text. That
tokenizer's ids (< 49152) are valid for any model whose vocabulary is at least as large.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from kvyard.loader import TokenizerSource, default_model_path
from kvyard_plugins.loaders.dummy_moe_shapes import MOE_MODEL_TYPES, moe_family_shapes
from kvyard_plugins.loaders.hf_folder import HFFolderLoader

SEED = 0
INIT_STD = 0.02
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class DummyLoader(HFFolderLoader):
    name = "dummy"

    @classmethod
    def can_load(cls, model_path: str) -> bool:
        return (Path(model_path) / "config.json").is_file()

    def tokenizer_source(self, model_path: str) -> TokenizerSource:
        if any((Path(model_path) / f).is_file() for f in _TOKENIZER_FILES):
            return super().tokenizer_source(model_path)
        try:
            default = Path(default_model_path())
        except ValueError:  # no bundled model here: only token-id workloads (benchmarks) can run
            return TokenizerSource(model_path, {})
        return TokenizerSource(str(default.parent), {"gguf_file": default.name})

    def weights(self, model_path: str, hf_config: Any) -> Iterator[tuple[str, Any]]:
        generator = torch.Generator(device=self.config.device).manual_seed(SEED)
        moe = getattr(hf_config, "model_type", None) in MOE_MODEL_TYPES   # names as their checkpoints store them
        for name, shape in (moe_family_shapes if moe else checkpoint_shapes)(hf_config):
            yield name, self._tensor(name, shape, generator)

    def _tensor(self, name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        like = dict(dtype=self.config.dtype, device=self.config.device)
        if name.endswith("norm.weight"):
            return torch.ones(shape, **like)
        if name.endswith(".bias"):
            return torch.zeros(shape, **like)
        return torch.randn(shape, generator=generator, **like).mul_(INIT_STD)


def checkpoint_shapes(cfg: Any) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF parameter name, shape) of every parameter of the config's architecture, read from
    transformers' own class built on the meta device (no memory, no Llama-specific naming);
    tied parameters appear once, under their first name (the embedding)."""
    import transformers

    arch = (getattr(cfg, "architectures", None) or [None])[0]
    if arch is None:   # a bare config: the causal LM of its model_type
        build = transformers.AutoModelForCausalLM.from_config
    else:
        build = getattr(transformers, arch, None)
        if build is None:
            raise ValueError(f"load_format: dummy needs an architecture transformers knows; "
                             f"the config names {arch!r}")
    with torch.device("meta"):
        model = build(cfg)
    for name, param in model.named_parameters():
        yield name, tuple(param.shape)
