"""One forward step through the pipeline stages.

Schedule (one batch per step, no micro-batches yet): every rank runs the same scheduler step
and builds the same ForwardBatch. Stage 0 embeds and runs its layers, then sends (h, residual)
[T, hidden] to stage 1; stage s receives from s - 1, runs its layers and sends on; the last stage
normalises and computes the logits [N, vocab] of the rows that need them and broadcasts them, so
every rank samples the same ids and keeps the same scheduler state. While one stage computes
the others wait: pipeline parallelism here spreads the weights and the KV memory over the ranks;
overlapping stages (micro-batches of the running batch) is not built yet.

Point-to-point transfers go over the default group (pipeline parallelism runs with tp_size 1, so
the world is the pipeline).
"""
from __future__ import annotations

import torch

from kvyard.distributed import PipelineStage
from kvyard.forward_batch import ForwardBatch


def pipeline_logits(model, fb: ForwardBatch, stage: PipelineStage, hidden_size: int, vocab_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The logits [len(fb.logits_indices), vocab_size] float32 of this step, on every stage."""
    import torch.distributed as dist

    t = fb.input_ids.shape[0]
    if not stage.is_first:
        h = torch.empty(t, hidden_size, dtype=dtype, device=fb.input_ids.device)
        residual = torch.empty_like(h)
        dist.recv(h, src=stage.rank - 1)
        dist.recv(residual, src=stage.rank - 1)
        fb.extras["pp_input"] = (h, residual)
    out = model(fb.input_ids, fb.positions, fb)
    if stage.is_last:
        logits = model.compute_logits(out[fb.logits_indices]).contiguous()
    else:
        h, residual = out
        dist.send(h.contiguous(), dst=stage.rank + 1)
        dist.send(residual.contiguous(), dst=stage.rank + 1)
        logits = torch.empty(fb.logits_indices.shape[0], vocab_size, dtype=torch.float32, device=h.device)
    dist.broadcast(logits, src=stage.size - 1)
    return logits
