"""torch.compile for the decode step, on the same bucket/padding/buffer mechanism as CUDA graphs.

A decode batch of B rows is padded to the smallest bucket P >= B (buckets up to
--torch-compile-max-bs) with the dummy request (slot 0, row 0), its inputs copied into the
runner's preallocated buffers, and one compiled step function (inductor) runs on views of
them. Unlike a CUDA graph, the attention metadata is rebuilt eagerly every step (the KV length
varies; it is a dynamic dimension of the compiled graph), so any attention backend works.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from kvyard.executor.cuda_graph_runner import PAD_SEQ_LEN, CudaGraphConfig, CudaGraphRunner, GraphCapture
from kvyard.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


class CompiledCapture(GraphCapture):
    """One bucket of a shared compiled step: ``capture`` compiles (first call) and warms it."""

    def __init__(self, compiled: Callable[[], torch.Tensor]):
        self.compiled = compiled
        self.fn = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn = fn
        return fn()

    def replay(self) -> torch.Tensor:
        return self.fn()


class CompiledDecodeRunner(CudaGraphRunner):
    """CudaGraphRunner whose "graphs" are torch.compile'd step functions (CPU or CUDA)."""

    def __init__(self, max_bs: int, step_fn: Callable[[ForwardBatch], torch.Tensor], attn_backend,
                 kv_pool, req_to_token: torch.Tensor, max_running_requests: int, device):
        # On the CPU the generated wrapper is C++ (cpp_wrapper): a batch-1 step is ~300 small
        # calls, and the Python wrapper's per-call cost was a quarter of the step.
        options = {"cpp_wrapper": True} if torch.device(device).type == "cpu" else None
        self._compiled_step = torch.compile(step_fn, dynamic=True, options=options)
        super().__init__(CudaGraphConfig(max_bs=max_bs), self._step, attn_backend, kv_pool, req_to_token,
                         max_running_requests, device, capture_factory=lambda: CompiledCapture(None))

    def _step(self, fb: ForwardBatch) -> torch.Tensor:
        self.attn_backend.init_forward_metadata(fb)
        return self._compiled_step(fb)

    def capture(self) -> None:
        """Compiles lazily: the first replay of each bucket traces it (no start-up cost)."""
        for bs in self.sizes:
            self.graph_batches[bs] = self.buffers.batch(bs, self.kv_pool, self.req_to_token, self.attn_backend)
        logger.info("torch.compile decode step for batch-size buckets %s (compiled on first use)", self.sizes)

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.mode.is_decode() and self.padded_size(fb.batch_size) is not None

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        b = fb.batch_size
        size = self.padded_size(b)
        graph_fb = self.graph_batches[size]
        pad = size - b
        self.buffers.fill(fb, size)
        graph_fb.seq_lens_cpu = list(fb.seq_lens_cpu) + [PAD_SEQ_LEN] * pad
        graph_fb.extend_prefix_lens_cpu = list(fb.extend_prefix_lens_cpu) + [PAD_SEQ_LEN - 1] * pad
        graph_fb.real_batch_size = b
        return self._step(graph_fb)[:b]
