"""What a model hands the C++ decode loop (kvyard.kernels.decode_loop) when its decode step can be
run without Python: the model plugin still owns the architecture and says, by returning a
``LoweredDecoder`` from ``lowered_decoder()``, that its step is exactly this pre-norm graph:

    h = embed(input_ids); cos, sin = rotary.lookup(positions)
    per layer:  x, residual = input_norm(h, residual)       (residual = h at the first layer)
                qkv = qkv_proj(x)                            [B, (H + 2 Hkv) D], q | k | v columns
                q | k rotated as [B, H + Hkv, D]; k, v written to the pool; attention(q)
                x, residual = post_norm(o_proj(attention), residual)
                h = down_proj(silu(gate) * up), gate | up = gate_up_proj(x)
    hidden = norm(h, residual)

Anything else (q/k norms, biases outside the linear layers, other activations, sliding windows)
means the model returns None and keeps its Python step. The modules are the model's own, so
the weights are shared, not copied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from kvyard.layers.attention import Attention
from kvyard.layers.linear import Linear
from kvyard.layers.logits import LogitsHead
from kvyard.layers.norm import RMSNorm
from kvyard.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class LoweredLayer:
    input_norm: RMSNorm
    post_norm: RMSNorm
    qkv_proj: Linear
    o_proj: Linear
    gate_up_proj: Linear
    down_proj: Linear
    attention: Attention


@dataclass(frozen=True)
class LoweredDecoder:
    embed: nn.Module           # input_ids [B] -> [B, hidden]
    rotary: RotaryEmbedding
    layers: tuple[LoweredLayer, ...]
    norm: RMSNorm
    # the model's compute_logits when it is exactly this head (None: the runner calls
    # compute_logits); the runner may then project with the lm_head's lowered call
    logits_head: Optional[LogitsHead] = None
