"""Multi-LoRA serving: many PEFT adapters on one base model, mixed in one batch.

Pieces (one job each):
  config.py    LoRAConfig (the frozen flags) and the parsing of --lora-paths entries
  adapter.py   LoRAAdapter: a PEFT folder read and checked against the model (host tensors)
  targets.py   which Linear layers of the model take LoRA, and the PEFT module names of their shards
  pool.py      LoRASlotPool: the fixed device buffers of --max-loras-per-batch slots
  batch.py     LoRABatchInfo: per-step segment -> slot indices (ForwardBatch.lora)
  ops.py       the batched shrink/expand (and the fused form's expand): torch (CPU) and Triton
               (core/kernels/triton_ops/lora.py)
  hook.py      LoRAHook: the one call a Linear makes after its base matmul — or, fused, instead
               of it (the slots' A rows appended to an unquantized weight: one GEMM + expand)
  manager.py   LoRAManager: adapters by name, slot assignment (LRU), load/unload, per-request pins

Invariants:
  - Adapter weights enter the model only through ``Linear.lora_hook``: after the quantization
    method's matmul, ``y += (x @ A[slot].T) @ B[slot].T`` per token, with the adapter's scaling
    (alpha / r, or alpha / sqrt(r) with rslora) folded into B at load. Fused layers (qkv,
    gate_up) keep one A block of ``max_rank`` rows per shard and expand each shard's columns
    from its own block only, so q/k/v (gate/up) adapters stay independent. In the fused form
    the same A lives in the weight's trailing rows, so the same products come out of the GEMM.
  - Every slot holds either nothing (zeros) or exactly one adapter, padded with zeros from its
    rank to ``max_rank``; a padded row or column contributes exactly zero.
  - Slot -1 means "the base model": its tokens get no LoRA term. Segments are the requests of
    the batch in order (a request's new tokens are contiguous in the flat token dim).
  - A request pins its adapter's slot from admission until it owns no KV (finished, aborted,
    retracted). Only an unpinned slot is evicted (LRU), so at most ``max_loras_per_batch``
    distinct adapters are pinned, and every batch — a subset of the pinned requests — fits.
  - An adapter's KV is keyed by its load id (``Req.cache_namespace``): the prefix cache never
    shares KV between two adapters, nor between an adapter and the base model, nor with an
    adapter of the same name loaded again later.
"""
from kvyard.lora.config import LoRAConfig, LoRAError

__all__ = ["LoRAConfig", "LoRAError"]
