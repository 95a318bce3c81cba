"""Quantized checkpoints of a tiny transformers Llama, packed here in each published format
(no quantizing tool for these formats runs on this CPU; the layouts follow the formats' docs and
the loaders of transformers / compressed-tensors). Each builder returns the folder and, per
quantized projection, the float weight its tensors decode to (the reference dequantization).

Quantization is round-to-nearest from the float weights (the formats, not the calibration
algorithms, are what a loader must get right).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvyard.layers import quant_math as qm
from quant_helpers import save_tokenizer

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linears(state: dict) -> list[str]:
    """Checkpoint names (without .weight) of the decoder's projections; the head stays float."""
    return [n[:-len(".weight")] for n in state if n.endswith(".weight") and n.split(".")[-2] in PROJ]


def _write(hf, path, tensors: dict, quant_config: dict) -> str:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = hf.config.to_dict()
    cfg["quantization_config"] = quant_config
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    save_tokenizer(path)
    return str(path)


def _float_state(hf) -> dict:
    return {k: v.detach().clone().float() for k, v in hf.state_dict().items()}


# -- fp8 ----------------------------------------------------------------------------------------
def fp8_checkpoint(hf, path, block: tuple[int, int] | None = None, static_scales: dict | None = None):
    """quant_method "fp8": per-tensor weight_scale (block=None) or 128x128-style block
    weight_scale_inv; ``static_scales`` {linear name: input scale} makes activation_scheme static."""
    state, ref = _float_state(hf), {}
    for name in _linears(state):
        w = state.pop(name + ".weight")
        if block is None:
            q, scale = qm.fp8_per_tensor(w)
            state[name + ".weight_scale"] = scale.reshape(())
            ref[name] = q.float() * scale
        else:
            bn, bk = block
            n, k = w.shape
            pad = torch.nn.functional.pad(w, (0, (-k) % bk, 0, (-n) % bn))
            blocks = pad.view(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / qm.FP8_E4M3_MAX   # [N/bn, K/bk]
            full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
            q = qm.fp8_quantize(w, full)
            state[name + ".weight_scale_inv"] = scale
            ref[name] = q.float() * full
        state[name + ".weight"] = q
        if static_scales is not None:
            state[name + ".input_scale"] = torch.tensor(static_scales[name], dtype=torch.float32)
    qc = {"quant_method": "fp8", "activation_scheme": "static" if static_scales else "dynamic"}
    if block is not None:
        qc["weight_block_size"] = list(block)
    return _write(hf, path, state, qc), ref


def input_amax(hf, prompts) -> dict:
    """Per projection, the largest |input| over the prompts (static activation calibration)."""
    amax, hooks = {}, []
    for name, module in hf.named_modules():
        if name.split(".")[-1] in PROJ:
            def hook(mod, args, name=name):
                amax[name] = max(amax.get(name, 0.0), args[0].abs().max().item())
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for p in prompts:
            hf(torch.tensor([p]))
    for h in hooks:
        h.remove()
    return amax


def w8a8_int8_checkpoint(hf, path):
    """quant_method "w8a8_int8": int8 weight, weight_scale [N, 1]."""
    state, ref = _float_state(hf), {}
    for name in _linears(state):
        q, scale = qm.int8_per_row(state.pop(name + ".weight"))
        state[name + ".weight"], state[name + ".weight_scale"] = q, scale
        ref[name] = q.float() * scale
    return _write(hf, path, state, {"quant_method": "w8a8_int8"}), ref


# -- int4 ---------------------------------------------------------------------------------------
def _int4(w: torch.Tensor, group: int, symmetric: bool, g_idx: torch.Tensor | None = None):
    """(q [N, K] 0..15, scales [G, N], zeros [G, N], g_idx [K]). With g_idx (act-order), group g
    holds the inputs k with g_idx[k] == g."""
    n, k = w.shape
    if g_idx is None:
        g_idx = torch.arange(k, dtype=torch.int32) // group
    order = torch.argsort(g_idx, stable=True)
    q, scale, zero = qm.quantize_int4(w[:, order], group, symmetric)
    q = q[:, torch.argsort(order)]
    return q, scale.t().contiguous(), zero.t().contiguous(), g_idx


def _ref_int4(q, scales, zeros, g_idx) -> torch.Tensor:
    g = g_idx.long()
    return ((q - zeros.t()[:, g]).float() * scales.t()[:, g].float())


def awq_checkpoint(hf, path, group: int = 32, zero_point: bool = True):
    """AutoAWQ gemm: qweight [K, N/8], qzeros [G, N/8] (interleaved nibbles), scales [G, N] fp16."""
    from kvyard_plugins.quantization.awq_method import ORDER

    state, ref = _float_state(hf), {}
    for name in _linears(state):
        q, scales, zeros, g_idx = _int4(state.pop(name + ".weight"), group, symmetric=not zero_point)
        scales = scales.half()
        state[name + ".qweight"] = qm.pack_int4_cols(q.t().contiguous(), ORDER)
        state[name + ".qzeros"] = qm.pack_int4_cols(zeros, ORDER)
        state[name + ".scales"] = scales
        ref[name] = _ref_int4(q, scales, zeros, g_idx)
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": zero_point, "version": "gemm"}
    return _write(hf, path, state, qc), ref


def gptq_checkpoint(hf, path, group: int = 32, sym: bool = True, desc_act: bool = False, seed: int = 0):
    """GPTQ (checkpoint_format "gptq"): qweight [K/8, N], qzeros [G, N/8] storing zero - 1,
    scales [G, N] fp16, g_idx [K] (a permutation of k // group with desc_act)."""
    state, ref = _float_state(hf), {}
    g_idx_by_k: dict[int, torch.Tensor] = {}
    for name in _linears(state):
        w = state.pop(name + ".weight")
        k = w.shape[1]
        if desc_act and k not in g_idx_by_k:   # one order per input size, shared by fused projections
            gen = torch.Generator().manual_seed(seed + k)
            g_idx_by_k[k] = (torch.arange(k, dtype=torch.int32) // group)[torch.randperm(k, generator=gen)]
        q, scales, zeros, g_idx = _int4(w, group, sym, g_idx_by_k.get(k))
        scales = scales.half()
        state[name + ".qweight"] = qm.pack_int4_rows(q.t().contiguous())
        state[name + ".qzeros"] = qm.pack_int4_cols((zeros - 1) & 0xF)
        state[name + ".scales"] = scales
        state[name + ".g_idx"] = g_idx.clone()
        ref[name] = _ref_int4(q, scales, zeros, g_idx)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act, "sym": sym,
          "checkpoint_format": "gptq"}
    return _write(hf, path, state, qc), ref


# -- compressed-tensors ---------------------------------------------------------------------------
def _ct_config(weights: dict, inputs: dict | None, fmt: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": inputs, "output_activations": None,
                                          "format": fmt}}}


def _ct_per_channel(hf, path, quantize, kind: str, weight_strategy: str, fmt: str):
    """A per-channel 8-bit weight (``quantize`` -> q, scale [N, 1]) with dynamic per-token
    activations of the same kind."""
    state, ref = _float_state(hf), {}
    for name in _linears(state):
        q, scale = quantize(state.pop(name + ".weight"))
        state[name + ".weight"], state[name + ".weight_scale"] = q, scale
        ref[name] = q.float() * scale
    qc = _ct_config({"num_bits": 8, "type": kind, "strategy": weight_strategy, "symmetric": True, "dynamic": False},
                    {"num_bits": 8, "type": kind, "strategy": "token", "symmetric": True, "dynamic": True}, fmt)
    return _write(hf, path, state, qc), ref


def ct_fp8_checkpoint(hf, path):
    """FP8_DYNAMIC: fp8 weight, per-channel weight_scale [N, 1], dynamic per-token activations."""
    return _ct_per_channel(hf, path, qm.fp8_per_row, "float", "channel", "float-quantized")


def ct_int8_checkpoint(hf, path):
    """W8A8 int8: int8 weight, weight_scale [N, 1], dynamic per-token int8 activations."""
    return _ct_per_channel(hf, path, qm.int8_per_row, "int", "channel", "int-quantized")


def ct_w4a16_checkpoint(hf, path, group: int = 32, symmetric: bool = True):
    """W4A16 pack-quantized: weight_packed [N, K/8] (value + 8), weight_scale [N, G], weight_shape,
    weight_zero_point [N/8, G] packed along N (value + 8) when asymmetric."""
    state, ref = _float_state(hf), {}
    for name in _linears(state):
        w = state.pop(name + ".weight")
        q, scales, zeros, g_idx = _int4(w, group, symmetric)
        state[name + ".weight_packed"] = qm.pack_int4_cols(q)                       # stored q_signed + 8
        state[name + ".weight_scale"] = scales.t().contiguous()
        state[name + ".weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
        if not symmetric:
            state[name + ".weight_zero_point"] = qm.pack_int4_rows(zeros.t().contiguous())
        ref[name] = _ref_int4(q, scales, zeros, g_idx)
    qc = _ct_config({"num_bits": 4, "type": "int", "strategy": "group", "group_size": group,
                     "symmetric": symmetric, "dynamic": False, "actorder": None}, None, "pack-quantized")
    return _write(hf, path, state, qc), ref
