"""The gguf load format: one llama.cpp GGUF file (or a folder holding exactly one).

Config and tokenizer come from transformers' GGUF support (the chat template is in the file).
Weights are read from the memory-mapped file with gguf.GGUFReader, renamed to HF names, and
either dequantized to LoadConfig.dtype or, with LoadConfig.keep_quantized, handed out as
QuantizedTensor blocks (2-D weights of quantized types only; F32/F16/BF16 stay float).

llama.cpp stores the q/k projections of "llama"-architecture files with the rows of each head
reordered for its interleaved rotary embedding; ``_unpermute_index`` undoes that so the weights
match the HF (half-split rotary) layout. It permutes whole rows, so it applies unchanged to
rows of quantized blocks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from kvyard.loader import QuantizedTensor, TokenizerSource, WeightLoader, gguf_file_of

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
        from transformers import AutoConfig, AutoTokenizer

        path = self._file(model_path)
        stat = path.stat()
        folder = _cache_folder(path)
        key = folder.name
        if (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists():
            return str(folder)
        tmp = folder.with_name(f"{key}.tmp{os.getpid()}")
        AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
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
        heads = {"q": index["heads"], "k": index["kv_heads"] or index["heads"]}
        skipped = []
        for tensor in _mapped_tensors(path, index):
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


def _cache_folder(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(os.environ.get("KVYARD_CACHE_DIR", Path.home() / ".cache" / "kvyard")) / "gguf" / key


def _tensor_index(path: Path) -> dict:
    file = _cache_folder(path).with_suffix(".tensors.json")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        pass
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    index = {"arch": arch, "heads": _field(reader, f"{arch}.attention.head_count"),
             "kv_heads": _field(reader, f"{arch}.attention.head_count_kv"),
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
