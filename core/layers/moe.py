"""Mixture of experts: top-k routing and one fused-experts layer shared by every MoE model.

Per step (T tokens, E experts, k chosen per token, hidden H, expert intermediate I):

    logits  = router(x)                          [T, E]   (Router: in the dtype the reference uses)
    weights, ids = select_experts(logits, cfg)   [T, k] float32, [T, k] int64
    y[t] = sum_j weights[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])),  e = ids[t, j]

Routing variants (RoutingConfig), as transformers computes them:
  softmax then top-k, renormalised or not        Mixtral (always), Qwen2/3-MoE, OLMoE (norm_topk_prob)
  softmax, grouped top-k by each group's max     DeepSeek-V2 "group_limited_greedy"
  sigmoid + correction bias, grouped top-k by    DeepSeek-V3 "noaux_tc" (the bias only picks the
  the sum of each group's top-2                  experts; the weights are the unbiased scores)
  then * routed_scaling_factor                   DeepSeek
Scores are always computed in float32 (every reference does); ``weights_dtype`` rounds the
chosen weights the way the reference does before they scale the expert outputs.

Expert storage: dense experts are two stacked parameters, w13 [E, 2I, H] ([gate | up] rows per
expert) and w2 [E, H, I]. They run through the Triton grouped GEMM (kvyard.kernels.triton_ops.fused_moe:
tokens sorted by expert, block-aligned) where kvyard.kernels picks it ("fused_moe"), else the
torch path (one matmul pair per expert that received tokens). A quantized model builds each
expert's gate_up / down as a ``Linear`` whose LinearMethod comes from the quantization method
(kept-quantized weights, e.g. GGUF blocks) and runs the per-expert loop through them; the model
calls process_after_loading on those Linear layers like on every other.

Tensor parallelism (ctx.tp): every rank holds every expert, split along the intermediate dim
(w13 rows [gate_r | up_r], w2 columns I_r = I / tp); each rank's sum over experts is partial and
one all-reduce per layer completes it (the router stays whole on every rank).

Checkpoint names: load_expert(e, part, w) with part in "gate", "up", "down" (per-expert HF names,
as Mixtral's w1/w3/w2 and Qwen/OLMoE/DeepSeek's gate_proj/up_proj/down_proj), or load_stacked
for transformers' in-memory stacked gate_up_proj [E, 2I, H] / down_proj [E, H, I].
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvyard.distributed.collectives import all_reduce
from kvyard.distributed.shard import take
from kvyard.kernels import use_triton
from kvyard.layers.activation import SiluAndMul
from kvyard.layers.linear import Linear
from kvyard.layers.parallel import ColumnParallel, RowParallel
from kvyard.layers.weights import copy_checked

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


@dataclass(frozen=True)
class RoutingConfig:
    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False          # divide the k weights by their sum (norm_topk_prob)
    renormalize_eps: float = 0.0       # DeepSeek-V3 adds 1e-20 to the sum
    num_groups: int = 1                # grouped top-k: experts split in num_groups equal groups,
    topk_groups: int = 1               # tokens pick among the best topk_groups of them
    group_score: str = "max"           # how a group is ranked (GROUP_SCORES)
    scaling: float = 1.0               # routed_scaling_factor
    weights_dtype: Optional[torch.dtype] = None   # round the weights to this (None: keep float32)

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring_func must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {', '.join(GROUP_SCORES)}, got {self.group_score!r}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {self.num_experts}], got {self.top_k}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(f"n_group ({self.num_groups}) must divide the number of experts ({self.num_experts})")
        if not 0 < self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_group must be in [1, n_group={self.num_groups}], got {self.topk_groups}")
        if self.topk_groups * (self.num_experts // self.num_groups) < self.top_k:
            raise ValueError(f"topk_group ({self.topk_groups}) groups of {self.num_experts // self.num_groups} "
                             f"experts hold fewer than num_experts_per_tok ({self.top_k})")


def select_experts(logits: torch.Tensor, cfg: RoutingConfig,
                   correction_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32 or cfg.weights_dtype, ids [T, k] int64)."""
    logits = logits.float()
    scores = torch.softmax(logits, dim=-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.num_groups > 1:
        choice = _mask_to_best_groups(choice, cfg)
    if cfg.num_groups > 1 or correction_bias is not None:
        ids = torch.topk(choice, cfg.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
    else:
        weights, ids = torch.topk(scores, cfg.top_k, dim=-1)
    if cfg.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + cfg.renormalize_eps)
    if cfg.scaling != 1.0:
        weights = weights * cfg.scaling
    if cfg.weights_dtype is not None:
        weights = weights.to(cfg.weights_dtype)
    return weights, ids


def _mask_to_best_groups(choice: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """choice [T, E] with every expert outside the token's best topk_groups groups at -inf."""
    t = choice.shape[0]
    grouped = choice.view(t, cfg.num_groups, -1)                          # [T, G, E / G]
    if cfg.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = torch.topk(group_scores, cfg.topk_groups, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(t, -1)


def fused_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                        ids: torch.Tensor) -> torch.Tensor:
    """The reference path: x [T, H], w13 [E, 2I, H], w2 [E, H, I] -> [T, H] in x's dtype.
    Tokens are grouped by expert once (a stable sort of the T * k choices); each expert with
    tokens runs one gate_up / down matmul pair over exactly its rows."""
    return _per_expert(x, weights, ids, w13.shape[0],
                       lambda e, h: F.linear(_silu_mul(F.linear(h, w13[e])), w2[e]))


def _per_expert(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                expert_fn) -> torch.Tensor:
    """sum_j weights[t, j] * expert_fn(ids[t, j], x[t]) with one expert_fn call per used expert.
    Grouping reads the per-expert counts back to the host, which a CUDA graph cannot capture:
    while capturing, every expert runs on every token instead, weighted by its (often zero)
    routing weight (decode batches are small, and the result is the same)."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return _every_expert(x, weights, ids, num_experts, expert_fn)
    top_k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)                     # choices grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    flat_weights = weights.reshape(-1)
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        choice = order[start:start + n]
        start += n
        tokens = choice // top_k
        y = expert_fn(e, x[tokens]) * flat_weights[choice, None].to(x.dtype)
        out.index_add_(0, tokens, y)
    return out


def _every_expert(x, weights, ids, num_experts: int, expert_fn) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e in range(num_experts):
        weight = (weights * (ids == e)).sum(dim=-1, keepdim=True).to(x.dtype)     # [T, 1]
        out += expert_fn(e, x) * weight
    return out


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    d = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :d]) * gate_up[..., d:]


class FusedMoE(nn.Module):
    """The routed experts of one layer. forward(x [T, H], weights [T, k], ids [T, k]) -> [T, H].
    ``intermediate_size`` is this rank's I_r (the checkpoint's I under one rank)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, ctx: Any, prefix: str):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.tp = ctx.tp
        self.inter_shard = ctx.tp.split(intermediate_size, "moe_intermediate_size")
        self.intermediate_size = self.inter_shard.size
        self.prefix = prefix
        self.quantized = ctx.quantization is not None
        if self.quantized:
            self.experts = nn.ModuleList(self._quantized_expert(e, ctx) for e in range(num_experts))
            self.act = SiluAndMul()
        else:
            empty = dict(dtype=ctx.dtype, device=ctx.device)
            i = self.intermediate_size
            self.w13 = nn.Parameter(torch.empty(num_experts, 2 * i, hidden_size, **empty), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, i, **empty),
                                   requires_grad=False)

    def _quantized_expert(self, e: int, ctx: Any) -> nn.Module:
        h, i, p = self.hidden_size, self.inter_shard.full, f"{self.prefix}.{e}"
        expert = nn.Module()   # split like the dense experts; the layer sums once (forward)
        expert.gate_up_proj = Linear(h, [i, i], method=ctx.linear_method(f"{p}.gate_up_proj"),
                                     prefix=f"{p}.gate_up_proj", dtype=ctx.dtype, device=ctx.device,
                                     parallel=ColumnParallel(ctx.tp))
        expert.down_proj = Linear(i, h, method=ctx.linear_method(f"{p}.down_proj"),
                                  prefix=f"{p}.down_proj", dtype=ctx.dtype, device=ctx.device,
                                  parallel=RowParallel(ctx.tp, reduce=False))
        return expert

    # -- weights ---------------------------------------------------------------------------------
    def load_expert(self, e: int, part: str, weight: Any) -> None:
        """part "gate" / "up": [I, H]; "down": [H, I] (a tensor or a QuantizedTensor)."""
        if not 0 <= e < self.num_experts:
            raise ValueError(f"{self.prefix}: expert {e} out of range (num_experts={self.num_experts})")
        name = f"{self.prefix}.{e}.{part}"
        if self.quantized:
            expert = self.experts[e]
            if part == "down":
                expert.down_proj.load_shard(0, weight)
            else:
                expert.gate_up_proj.load_shard(0 if part == "gate" else 1, weight)
            return
        i = self.intermediate_size
        if part == "down":
            copy_checked(self.w2.data[e], take(weight, 1, self.inter_shard, name), name)
        elif part in ("gate", "up"):
            rows = slice(0, i) if part == "gate" else slice(i, 2 * i)
            copy_checked(self.w13.data[e, rows], take(weight, 0, self.inter_shard, name), name)
        else:
            raise ValueError(f"{name}: part must be gate, up or down")

    def load_stacked(self, part: str, weight: torch.Tensor) -> None:
        """transformers' stacked experts: "gate_up" [E, 2I, H] or "down" [E, H, I] (full I)."""
        i = self.inter_shard.full
        for e in range(self.num_experts):
            if part == "gate_up":
                self.load_expert(e, "gate", weight[e, :i])
                self.load_expert(e, "up", weight[e, i:])
            else:
                self.load_expert(e, "down", weight[e])

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return all_reduce(self._partial(x, weights, ids), self.tp)

    def _partial(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's share of the experts' sum (the whole sum on one rank)."""
        if self.quantized:
            return _per_expert(x, weights, ids, self.num_experts, self._quantized_forward)
        if use_triton("fused_moe", x):
            from kvyard.kernels.triton_ops.fused_moe import fused_experts
            return fused_experts(x, self.w13, self.w2, weights, ids)
        return fused_experts_torch(x, self.w13, self.w2, weights, ids)

    def _quantized_forward(self, e: int, h: torch.Tensor) -> torch.Tensor:
        expert = self.experts[e]
        return expert.down_proj(self.act(expert.gate_up_proj(h)))

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, quantized={self.quantized}")


class Router(nn.Module):
    """The gate: x [T, H] -> logits [T, E]. ``dtype`` is the dtype the reference multiplies in
    (DeepSeek casts x and the gate to float32; the others use the model dtype)."""

    def __init__(self, hidden_size: int, num_experts: int, dtype: torch.dtype, device: Any,
                 correction_bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts, dtype=torch.float32, device=device), requires_grad=False)
            if correction_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ optional shared expert, optionally sigmoid-gated as Qwen2-MoE).
    forward(x [T, H]) -> [T, H]."""

    def __init__(self, routing: RoutingConfig, router: Router, experts: FusedMoE,
                 shared_expert: Optional[nn.Module] = None, shared_gate: Optional[Linear] = None,
                 shared_name: str = "shared_expert"):
        """``shared_name``: the shared expert's checkpoint name ("shared_expert" in Qwen2-MoE,
        "shared_experts" in DeepSeek)."""
        super().__init__()
        self.shared_name = shared_name
        self.routing = routing
        self.gate = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.routing, self.gate.e_score_correction_bias)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def targets(self, prefix: str, expert_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                ) -> dict[str, Any]:
        """HF checkpoint name -> loader, for a block saved under ``prefix``: ``gate.weight``
        (+ ``gate.e_score_correction_bias``), ``experts.<e>.<part>.weight`` with the (gate, up,
        down) part names given, ``shared_expert(s).*`` and ``shared_expert_gate.weight``."""
        out: dict[str, Any] = {f"{prefix}.gate.weight": partial(copy_checked, self.gate.weight,
                                                               name=f"{prefix}.gate.weight")}
        if self.gate.e_score_correction_bias is not None:
            name = f"{prefix}.gate.e_score_correction_bias"
            out[name] = partial(copy_checked, self.gate.e_score_correction_bias, name=name)
        for e in range(self.experts.num_experts):
            for role, part in zip(("gate", "up", "down"), expert_parts):
                out[f"{prefix}.experts.{e}.{part}.weight"] = partial(self.experts.load_expert, e, role)
        if self.shared_expert is not None:
            out.update(self.shared_expert.targets(f"{prefix}.{self.shared_name}"))
        if self.shared_expert_gate is not None:
            out[f"{prefix}.shared_expert_gate.weight"] = partial(self.shared_expert_gate.load_shard, 0)
        return out
