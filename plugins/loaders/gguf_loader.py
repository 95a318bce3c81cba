"""The gguf load format: one llama.cpp GGUF file (or a folder holding exactly one).

Config and tokenizer: for the architectures gguf_arch maps (Qwen3, the MoE families) the config
is built from the file's metadata there; any other architecture's comes from transformers' GGUF
support (AutoConfig with gguf_file=). The tokenizer is transformers' (AutoTokenizer with
gguf_file=), or, for an architecture it refuses (olmoe), its GGUF vocabulary builders under the
generic fast-tokenizer class. The chat template is in the file either way.
Weights are read from the memory-mapped file with gguf.GGUFReader, renamed to HF names, and
either dequantized to LoadConfig.dtype or, with LoadConfig.keep_quantized, handed out as
QuantizedTensor blocks (2-D weights of quantized types only; F32/F16/BF16 stay float).

llama.cpp stores the q/k projections of "llama"-architecture files with the rows of each head
reordered for its interleaved rotary embedding; ``_unpermute_index`` undoes that so the weights
match the HF (half-split rotary) layout. It permutes whole rows, so it applies unchanged to
rows of quantized blocks.

Mixture-of-experts files stack a layer's experts in one tensor per projection; each expert's
slice is handed out under its per-expert HF name (gguf_arch), so kept-quantized experts reach the
model's FusedMoE as one QuantizedTensor per expert and go through the GGUF quantization method.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from kvyard.loader import QuantizedTensor, TokenizerSource, WeightLoader, gguf_file_of
from kvyard_plugins.loaders import gguf_arch

logger = logging.getLogger(__name__)

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Architectures whose converter permuted the q/k rows (llama.cpp's LlamaModel.permute).
_PERMUTED_ARCHITECTURES = ("llama",)
# Bumped when the converted config / tokenizer folder changes for the same file.
_CONVERSION_VERSION = "|mapped-archs-1"


class GGUFLoader(WeightLoader):
    name = "gguf"

    @classmethod
    def can_load(cls, model_path: str) -> bool:
        return gguf_file_of(model_path) is not None

    def _file(self, model_path: str):
        path = gguf_file_of(model_path)
        if path is None:
            raise ValueError(f"model_path: {model_path} is not a .gguf file or a folder holding one")
        return path

    def hf_config(self, model_path: str) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self._converted(model_path))

    def tokenizer_source(self, model_path: str) -> TokenizerSource:
        return TokenizerSource(self._converted(model_path), {})

    def _converted(self, model_path: str) -> str:
        """An HF folder with the file's config and tokenizer, converted once and cached.

        transformers reads them from the GGUF's metadata, which takes seconds per read (the
        vocabulary is parsed field by field); the engine needs them in several places and
        processes, so they are converted on first use and kept next to other kvyard caches."""
        path = self._file(model_path)
        folder = _cache_folder(path, _CONVERSION_VERSION)
        if (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists():
            return str(folder)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        config, tokenizer = _config_and_tokenizer(path)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
        return str(folder)

    def quantization(self) -> Optional[str]:
        return "gguf" if self.config.keep_quantized else None

    def weights(self, model_path: str, hf_config: Any) -> Iterator[tuple[str, Any]]:
        import gguf

        path = self._file(model_path)
        index = _tensor_index(path)
        arch = index["arch"]
        spec = gguf_arch.arch_of({"general.architecture": arch, f"{arch}.expert_count": index["expert_count"]})
        heads = {"q": index["heads"], "k": index["kv_heads"] or index["heads"]}
        skipped = []
        for tensor in _mapped_tensors(path, index):
            moe = self._moe_pairs(tensor, spec) if spec is not None and spec.moe_block else None
            if moe is not None:
                yield from moe
                continue
            hf_name = hf_name_of(tensor.name)
            if hf_name is None:
                skipped.append(tensor.name)
                continue
            value = self._convert(tensor)
            role = _qk_role(tensor.name)
            if role and arch in _PERMUTED_ARCHITECTURES:
                value = _permute_rows(value, _unpermute_index(value.shape[0], heads[role]))
            yield hf_name, value
        if skipped:
            logger.info("gguf: skipped %d tensor(s) with no HF counterpart: %s",
                        len(skipped), ", ".join(skipped[:8]))

    def _moe_pairs(self, tensor: "_MappedTensor", spec: gguf_arch.GGUFArch) -> Optional[Iterator[tuple[str, Any]]]:
        """(HF name, value) pairs of a router / shared-expert / expert tensor; None for others."""
        parts = tensor.name.split(".")
        if len(parts) < 4 or parts[0] != "blk" or not parts[1].isdigit():
            return None
        layer, base, kind = parts[1], ".".join(parts[2:-1]), parts[-1]
        roles = gguf_arch.expert_roles(base)
        if roles is not None:
            return self._expert_pairs(tensor, f"model.layers.{layer}.{spec.moe_block}.experts", spec, *roles)
        hf = gguf_arch.moe_block_names(spec).get(base)
        if hf is None:
            return None
        value = self._convert(tensor)
        if base == "ffn_gate_inp_shexp" and len(value.shape) == 1:   # some files store it as [H]
            value = value.reshape(1, -1)
        return iter([(f"model.layers.{layer}.{hf}.{kind}", value)])

    def _expert_pairs(self, tensor: "_MappedTensor", prefix: str, spec: gguf_arch.GGUFArch,
                      expert: Optional[int], roles: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
        """One (name, [rows, cols] value) per expert and role; a stacked tensor (ggml shape
        (cols, rows, E), data [E, rows, ...]) is sliced per expert, gate_up in row halves."""
        experts = range(tensor.shape[2]) if expert is None else (expert,)
        for e in experts:
            one = tensor if expert is not None else replace(tensor, shape=tensor.shape[:2], data=tensor.data[e])
            rows = one.shape[1] // len(roles)
            for i, role in enumerate(roles):
                part = one if len(roles) == 1 else replace(
                    one, shape=(one.shape[0], rows), data=one.data[i * rows:(i + 1) * rows])
                yield f"{prefix}.{e}.{spec.part(role)}.weight", self._convert(part)

    def _convert(self, tensor: Any) -> Any:
        """A ReaderTensor as a float tensor in LoadConfig.dtype, or QuantizedTensor blocks."""
        import gguf

        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest dim first
        qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                     gguf.GGMLQuantizationType.BF16):
            values = np.array(gguf.quants.dequantize(tensor.data, qtype))  # a copy: mmap is read-only
            return torch.from_numpy(values).reshape(shape).to(self.config.dtype)
        # Quantized: data is uint8 [rows, bytes_per_row]; copy it out of the read-only mmap.
        blocks = QuantizedTensor(torch.from_numpy(np.array(tensor.data)), shape, int(qtype))
        if self.config.keep_quantized and len(shape) == 2:
            return blocks
        return blocks.dequantize(self.config.dtype)


def hf_name_of(gguf_name: str) -> Optional[str]:
    """"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"; None if unknown."""
    base, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _PER_BLOCK:
        return f"model.layers.{parts[1]}.{_PER_BLOCK[parts[2]]}.{kind}"
    return None


def _qk_role(gguf_name: str) -> Optional[str]:
    """"q" / "k" for the permuted projections (weights and biases), else None."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
        return parts[2][-1]
    return None


def _unpermute_index(rows: int, num_heads: int) -> torch.Tensor:
    """index[h] = the GGUF row holding HF row h.

    Within one head of head_dim rows, HF keeps the two rotary halves apart (row j*half + i,
    j in {0, 1}) while llama.cpp interleaves them (row 2*i + j).
    """
    head_dim = rows // num_heads
    half = head_dim // 2
    hf_row = torch.arange(rows)
    head, within = hf_row // head_dim, hf_row % head_dim
    j, i = within // half, within % half
    return head * head_dim + 2 * i + j


def _permute_rows(value: Any, index: torch.Tensor) -> Any:
    if isinstance(value, QuantizedTensor):
        return QuantizedTensor(value.data[index], value.shape, value.qtype)
    return value[index]


# -- the file's tensor index, kept across starts ---------------------------------------------------
# gguf.GGUFReader parses every metadata field (the vocabulary string by string: seconds per start);
# the weights need only three fields and where each tensor's bytes are, so that is cached once per
# file and the tensors are then views of one read-only memory map, as the reader's are.
@dataclass(frozen=True)
class _MappedTensor:
    name: str
    tensor_type: int
    shape: tuple[int, ...]   # ggml order (fastest dim first), as ReaderTensor.shape
    data: np.ndarray         # what ReaderTensor.data holds: typed values, or uint8 [rows, bytes]


def _cache_folder(path: Path, version: str = "") -> Path:
    """Where what is derived from this file is cached; ``version`` changes with the derivation."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}{version}".encode()).hexdigest()[:16]
    return Path(os.environ.get("KVYARD_CACHE_DIR", Path.home() / ".cache" / "kvyard")) / "gguf" / key


def _tensor_index(path: Path) -> dict:
    file = _cache_folder(path).with_suffix(".tensors.json")
    try:
        index = json.loads(file.read_text())
        if "expert_count" in index:     # older caches lack it: parse again
            return index
    except (OSError, ValueError):
        pass
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    index = {"arch": arch, "heads": _field(reader, f"{arch}.attention.head_count"),
             "kv_heads": _field(reader, f"{arch}.attention.head_count_kv"),
             "expert_count": _field(reader, f"{arch}.expert_count") or 0,
             "tensors": [[t.name, int(t.tensor_type), [int(n) for n in t.shape], int(t.data_offset),
                          int(t.n_bytes), t.data.dtype.str, list(t.data.shape)] for t in reader.tensors]}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, file)
    except OSError as exc:   # a read-only cache: parse again next start
        logger.debug("gguf tensor index not cached: %s", exc)
    return index


def _mapped_tensors(path: Path, index: dict) -> Iterator[_MappedTensor]:
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, qtype, shape, offset, nbytes, dtype, dims in index["tensors"]:
        data = mm[offset:offset + nbytes].view(np.dtype(dtype)).reshape(dims)
        yield _MappedTensor(name, qtype, tuple(shape), data)


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


# -- config and tokenizer --------------------------------------------------------------------------
def _config_and_tokenizer(path: Path) -> tuple[Any, Any]:
    """The HF config and tokenizer of a GGUF file (see the module docstring for who builds them)."""
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer, read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path))
    if gguf_arch.arch_of(metadata) is None:
        return (AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name),
                AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    index = _tensor_index(path)
    shapes = {name: tuple(reversed(shape)) for name, _, shape, *_ in index["tensors"]}
    kwargs = gguf_arch.hf_config_dict(metadata, shapes)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    try:                            # transformers' tokenizer class for the architecture
        return config, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as exc:       # it refuses the architecture (olmoe): same builders, generic class
        if "not supported" not in str(exc):
            raise
    architecture, vocab, tokenizer_config = get_gguf_tokenizer(str(path))
    backend, extra = convert_gguf_tokenizer(architecture, vocab)
    return config, PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
