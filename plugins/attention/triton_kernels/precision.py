"""How the attention kernels multiply and score: ``fp32_dot(dtype)`` is the FP32_DOT kernel
switch; ``scaled_scores`` turns raw q.k into the exp2-domain scores, soft-capped or not.

True   q/k/v are cast to float32 and tl.dot runs as true IEEE float32 (not tf32). Taken for float32
       models, so they keep float32 accuracy on a GPU, and always under the CPU interpreter,
       whose bfloat16 arithmetic is not IEEE (it holds bf16 as raw uint16 words).
False  bf16/fp16 operands stay narrow so the tensor cores take them; accumulation is float32.

``fp8_kv(k_buf)`` is the KV_FP8 switch (an fp8 cache, FP32_DOT off): q, the keys, the values and
the probabilities meet as float16. e4m3 / e5m2 -> float16 is one conversion per pair of values on
sm_89+ (to bfloat16 it takes a detour through wider types, and the decode kernel over an fp8
cache ran at ~1.7 TB/s of cache bytes instead of the bf16 cache's ~3 TB/s). Every fp8 value is
exact in float16; bf16 q is exact in float16 for 6.1e-5 <= |q| <= 65504 (rope'd queries of the
served models sit far inside; smaller ones keep float16's subnormal precision, well under the
scores' own rounding); probabilities in [0, 1] round finer in float16 than in bf16.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl



def fp32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp8_kv(k_buf: torch.Tensor) -> bool:
    return k_buf.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


@triton.jit
def scaled_scores(qk, scale_log2, logit_cap, SOFT_CAP: tl.constexpr):
    """Raw q.k -> s * log2(e) with s = scale * q.k, or with SOFT_CAP s = c * tanh(scale * q.k / c).
    tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflows to inf -> 1, underflows -> -1)
    and needs no libdevice, so it also runs under the CPU interpreter. The constants ln 2 and
    log2 e are literals: a compiled kernel may read no plain Python global."""
    if SOFT_CAP:
        x = qk * (scale_log2 * 0.6931471805599453) / logit_cap
        return (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * (logit_cap * 1.4426950408889634)
    return qk * scale_log2
