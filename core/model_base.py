"""The model-architecture plugin kind.

A model class is registered by HF architecture name and built as ``cls(hf_config, ctx)``.
It must provide:
  forward(input_ids [T], positions [T], fb: ForwardBatch) -> hidden states [T, hidden]
  compute_logits(hidden [N, hidden]) -> logits [N, vocab] in float32
``forward``'s rows are the final hidden states: after the last norm, exactly what the LM head
reads (the last entry of transformers' ``output_hidden_states``); everything after them (LM head,
soft-capping, scaling) belongs in ``compute_logits``. The runner returns these rows as they are
for ``return_hidden_states`` and pools them for embeddings, so no model needs code of its own.
  load_weights(weights: Iterable[(hf_name, tensor)]) -> None
and may set ``is_generation = False`` (embedding models) and provide ``pool(hidden, fb)``.
A model whose KV cache is not K and V per KV head of its config's sizes provides
  kv_layout() -> kvyard.kv_layout.KVLayout
(e.g. DeepSeek's multi-head latent attention); the pool is allocated from it and attention
backends that do not serve it refuse to start.

Tensor parallelism: a model class that sets ``supports_tensor_parallel = True`` builds its
layers for ``ctx.tp`` (kvyard.distributed.TensorParallel): attention heads split
(``ctx.tp.split`` / ``split_kv_heads``) with column-parallel q/k/v and a row-parallel o_proj,
column-parallel gate/up and row-parallel down projections (kvyard.layers.parallel), a
vocabulary-parallel embedding and lm_head (``VocabEmbedding(tp=...)``, ``LogitsHead`` gathers),
MoE experts split along their intermediate dim (``FusedMoE``); ``load_weights`` receives full
checkpoint entries and the layers keep their slices. The KV pool holds this rank's KV heads
(``ctx.tp.split_kv_heads`` of the config's). Under --tp-size > 1 a model class without
the flag is refused at start-up by name.

Pipeline parallelism: a model class that sets ``supports_pipeline_parallel = True`` builds only
the layers of ``ctx.pp.layers(num_layers)`` (``PipelineLayer`` placeholders elsewhere; its
attention layers number their KV from 0 within the stage), the embedding on the first stage and
the final norm and lm_head on the last, loads only what it built, and runs its stack through
``kvyard.layers.decoder.run_decoder_stack``, which takes a stage's input from
``fb.extras["pp_input"]`` and returns (h, residual) on every stage but the last.

A model that can feed speculative draft heads (EAGLE, EAGLE-3) provides
  input_embeddings() -> the module mapping token ids [T] to [T, hidden]
and runs its layers through ``kvyard.layers.decoder.run_decoder_stack``, which stores the hidden
states a ForwardBatch's ``capture_layers`` asks for (core/forward_batch.py).

A model whose decode step is the plain pre-norm graph of kvyard.layers.lowering may provide
  lowered_decoder() -> kvyard.layers.lowering.LoweredDecoder | None
and small CPU decode batches then run through the C++ decode loop (kvyard.executor.lowered_decode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvyard.distributed import ONE_STAGE, SINGLE, PipelineStage, TensorParallel
from kvyard.quantization import LinearMethod, QuantizationMethod, UnquantizedLinearMethod


@dataclass(frozen=True)
class ModelBuildContext:
    dtype: torch.dtype
    device: str
    quantization: Optional[QuantizationMethod] = None
    tp: TensorParallel = SINGLE
    pp: PipelineStage = ONE_STAGE

    def linear_method(self, prefix: str) -> LinearMethod:
        if self.quantization is None:
            return UnquantizedLinearMethod(self.dtype, self.device)
        return self.quantization.linear_method(prefix)
