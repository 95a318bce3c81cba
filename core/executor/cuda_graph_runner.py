"""CUDA-graph runner for decode steps: capture per batch-size bucket, pad, replay.

Buckets: --cuda-graph-bs 1 2 4 ... when given, else 1, 2, 4, 8, then every multiple of 8 up to
--cuda-graph-max-bs (default 160), both capped by the runner's max running requests (the cap
itself is always a bucket, so every admissible batch has one). --disable-cuda-graph captures
nothing.

Padding: a decode batch of B rows replays the graph of the smallest bucket P >= B. Rows B..P-1
are dummies that need no branch anywhere: token 0 at position 0, written to the reserved dummy
KV slot 0, reading req_to_token row 0 (all zeros: slot 0) with seq_len 1. Their outputs are
dropped. --disable-cuda-graph-padding replays only batches of exactly a bucket's size (others
run eagerly).

Buffers: input_ids, positions, out_cache_loc, req_pool_indices, seq_lens (and the arange rows
extend_start_loc / logits_indices; with LoRA serving, each row's adapter slot and the segment
offsets 0..B of ForwardBatch.lora) are allocated once for the largest bucket; every graph is
captured on views of them, and a replay refills them in place, so the captured kernels read the
new batch from the same addresses. The attention backend does the same with its own metadata
(init_cuda_graph_state / init_forward_metadata_capture / init_forward_metadata_replay).

Capture is an abstraction with two implementations: ``CudaGraphCapture`` (torch.cuda.CUDAGraph,
one memory pool shared by all buckets, largest captured first) and ``EagerReplayCapture``, the
CPU stand-in that records the step function and re-runs it eagerly on replay, with the same
static-output contract. The bucketing, padding and buffer logic is therefore the same code on
both, and is unit-tested on the CPU.

Use from the ModelRunner (decode steps only; the graph returns the logits of all rows):
    runner = CudaGraphRunner(config, step_fn, attn_backend, kv_pool, req_to_token, max_reqs, device)
    runner.capture()                            # once, after the model and KV pool exist
    if runner.can_run(fb): logits = runner.replay(fb)   # instead of init_forward_metadata + model
where ``step_fn(fb) -> logits [B, vocab]`` runs the model and its logits head on ``fb``. A step
may return a tuple of tensors with B rows each instead (e.g. logits and the hidden states a
speculative draft head reads: ``capture_layers`` is then set on every captured batch, and only
batches asking for the same layers replay); replay returns the same tuple, each cut to B rows.

Extends of a few tokens per request (the speculative verify step) have their own runner on the
same buckets and capture implementations: kvyard.executor.extend_graph_runner.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch

from kvyard.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from kvyard.attention import AttentionBackend
    from kvyard.mem_cache.kv_pool import KVPool

logger = logging.getLogger(__name__)

DEFAULT_MAX_BS = 160
DUMMY_SLOT = 0           # the pool's reserved slot (mem_cache/kv_pool.py)
DUMMY_ROW = 0            # req_to_token's reserved row (mem_cache/req_to_token.py)
PAD_SEQ_LEN = 1          # a padded row attends to its one dummy key: finite, never read back

# a step's output: one tensor, or a tuple of tensors (rows first in each)
Outputs = Union[torch.Tensor, tuple]
StepFn = Callable[[ForwardBatch], Outputs]


@dataclass(frozen=True)
class CudaGraphConfig:
    max_bs: Optional[int] = None                      # --cuda-graph-max-bs
    batch_sizes: Optional[tuple[int, ...]] = None     # --cuda-graph-bs (overrides max_bs)
    disable: bool = False                             # --disable-cuda-graph
    disable_padding: bool = False                     # --disable-cuda-graph-padding

    def __post_init__(self):
        if self.max_bs is not None and self.max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {self.max_bs}")
        if self.batch_sizes is not None and (not self.batch_sizes or min(self.batch_sizes) < 1):
            raise ValueError(f"cuda_graph_bs must list batch sizes >= 1, got {list(self.batch_sizes)}")

    def capture_sizes(self, max_running_requests: int) -> list[int]:
        """The buckets to capture, ascending; [] when disabled."""
        if self.disable:
            return []
        if self.batch_sizes:
            return sorted({b for b in self.batch_sizes if b <= max_running_requests}) or [max_running_requests]
        return default_buckets(min(self.max_bs or DEFAULT_MAX_BS, max_running_requests))


def default_buckets(limit: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... (multiples of 8) below ``limit``, then ``limit`` itself."""
    base = [1, 2, 4] + list(range(8, limit, 8))
    return [b for b in base if b < limit] + [limit]


def padded_size(sizes: list[int], batch_size: int, allow_padding: bool) -> Optional[int]:
    """The bucket a batch of ``batch_size`` replays in, or None (then it runs eagerly)."""
    if not allow_padding:
        return batch_size if batch_size in sizes else None
    for size in sizes:
        if size >= batch_size:
            return size
    return None


# -- capture implementations -------------------------------------------------------------------
def map_outputs(fn: Callable[[torch.Tensor], torch.Tensor], out: Outputs) -> Outputs:
    """``fn`` applied to the tensor, or to each tensor of a tuple of outputs."""
    return tuple(fn(t) for t in out) if isinstance(out, tuple) else fn(out)


class GraphCapture(ABC):
    """One captured step. ``capture(fn)`` returns fn's output (a tensor or a tuple of tensors),
    which stays the output of every ``replay()`` (refreshed in place)."""

    @abstractmethod
    def capture(self, fn: Callable[[], Outputs]) -> Outputs: ...

    @abstractmethod
    def replay(self) -> Outputs: ...


class CudaGraphCapture(GraphCapture):
    """torch.cuda.CUDAGraph. Warm-up runs first (Triton compiles, cuBLAS workspaces) so that no
    allocation or compilation happens inside the capture."""

    def __init__(self, pool=None, warmup_runs: int = 2):
        self.pool = pool
        self.warmup_runs = warmup_runs
        self.graph = None
        self.output: Optional[Outputs] = None

    def capture(self, fn: Callable[[], Outputs]) -> Outputs:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_runs):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.output = fn()
        return self.output

    def replay(self) -> Outputs:
        self.graph.replay()
        return self.output


class EagerReplayCapture(GraphCapture):
    """The CPU stand-in: records the step function and re-runs it eagerly on replay, copying the
    result into the tensor returned at capture. Like a real graph, the function reads the
    runner's buffers at replay time, so what it computes depends only on their contents."""

    def __init__(self):
        self.fn: Optional[Callable[[], Outputs]] = None
        self.output: Optional[Outputs] = None
        self.replays = 0

    def capture(self, fn: Callable[[], Outputs]) -> Outputs:
        self.fn = fn
        self.output = fn()
        return self.output

    def replay(self) -> Outputs:
        fresh = self.fn()
        pairs = zip(self.output, fresh) if isinstance(fresh, tuple) else [(self.output, fresh)]
        for static, new in pairs:
            static.copy_(new)
        self.replays += 1
        return self.output


def default_capture_factory(device) -> Callable[[], GraphCapture]:
    """CUDA graphs sharing one memory pool on CUDA (later, smaller graphs reuse its memory), the
    eager stand-in elsewhere."""
    if torch.device(device).type != "cuda":
        return EagerReplayCapture
    pool = torch.cuda.graph_pool_handle()
    return lambda: CudaGraphCapture(pool=pool)


# -- input buffers -----------------------------------------------------------------------------
class DecodeInputBuffers:
    """The decode step's inputs for up to ``max_bs`` rows, allocated once, refilled in place."""

    def __init__(self, max_bs: int, device, with_lora: bool = False):
        long = dict(dtype=torch.int64, device=device)
        self.max_bs = max_bs
        self.input_ids = torch.zeros(max_bs, **long)
        self.positions = torch.zeros(max_bs, **long)
        self.out_cache_loc = torch.full((max_bs,), DUMMY_SLOT, **long)
        self.req_pool_indices = torch.full((max_bs,), DUMMY_ROW, **long)
        self.seq_lens = torch.full((max_bs,), PAD_SEQ_LEN, **long)
        self.row_index = torch.arange(max_bs, **long)    # extend_start_loc and logits_indices
        # LoRA: slot of each row (-1: base model, also for padding) and one segment per row
        self.lora_slots = torch.full((max_bs,), -1, dtype=torch.int32, device=device) if with_lora else None
        self.lora_indptr = torch.arange(max_bs + 1, dtype=torch.int32, device=device) if with_lora else None

    def fill(self, fb: ForwardBatch, padded_bs: int) -> None:
        """Rows [0, B) from ``fb``; rows [B, padded_bs) the dummy request."""
        b = fb.batch_size
        if not b <= padded_bs <= self.max_bs:
            raise ValueError(f"padded batch size {padded_bs} must be in [{b}, {self.max_bs}]")
        pairs = ((self.input_ids, fb.input_ids, 0), (self.positions, fb.positions, 0),
                 (self.out_cache_loc, fb.out_cache_loc, DUMMY_SLOT),
                 (self.req_pool_indices, fb.req_pool_indices, DUMMY_ROW),
                 (self.seq_lens, fb.seq_lens, PAD_SEQ_LEN))
        for buf, src, pad in pairs:
            buf[:b].copy_(src[:b])
            buf[b:padded_bs].fill_(pad)
        if self.lora_slots is not None:
            if fb.lora is not None:
                self.lora_slots[:b].copy_(fb.lora.seg_slots[:b])
            else:
                self.lora_slots[:b].fill_(-1)
            self.lora_slots[b:padded_bs].fill_(-1)

    def batch(self, bs: int, kv_pool: "KVPool", req_to_token: torch.Tensor,
              attn_backend: "AttentionBackend") -> ForwardBatch:
        """A decode ForwardBatch of ``bs`` rows whose tensors are views of these buffers."""
        fb = ForwardBatch(
            mode=ForwardMode.DECODE, batch_size=bs, input_ids=self.input_ids[:bs],
            positions=self.positions[:bs], out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=[PAD_SEQ_LEN] * bs, extend_prefix_lens_cpu=[PAD_SEQ_LEN - 1] * bs,
            extend_seq_lens_cpu=[1] * bs, extend_start_loc=self.row_index[:bs],
            logits_indices=self.row_index[:bs], req_to_token=req_to_token, kv_pool=kv_pool,
            attn_backend=attn_backend)
        if self.lora_slots is not None:
            from kvyard.lora.batch import LoRABatchInfo
            fb.lora = LoRABatchInfo(seg_indptr=self.lora_indptr[:bs + 1], seg_slots=self.lora_slots[:bs],
                                    max_seg_len=1)
        return fb


# -- the runners -------------------------------------------------------------------------------
class BucketedGraphRunner:
    """What the decode and extend graph runners share: the buckets, the capture loop over them
    (largest first, on views of ``self.buffers``), the bucket a batch replays in. A subclass sets
    ``self.buffers`` (with a ``batch(bs, kv_pool, req_to_token, attn_backend)``) and prepares the
    attention backend's static state in ``_init_backend``."""

    kind = "decode"

    def __init__(self, config: CudaGraphConfig, step_fn: StepFn, attn_backend: "AttentionBackend",
                 kv_pool: "KVPool", req_to_token: torch.Tensor, max_running_requests: int, device,
                 capture_factory: Optional[Callable[[], GraphCapture]] = None,
                 capture_layers: Optional[tuple[int, ...]] = None):
        """capture_layers: the hidden-state layers every captured batch asks for (module docstring)."""
        self.config = config
        self.step_fn = step_fn
        self.attn_backend = attn_backend
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.capture_layers = capture_layers
        self.sizes = config.capture_sizes(max_running_requests)
        self.max_bs = max(self.sizes, default=0)
        self.buffers = None
        self._capture_factory = capture_factory or default_capture_factory(device)
        self.graphs: dict[int, GraphCapture] = {}
        self.graph_batches: dict[int, ForwardBatch] = {}

    def _init_backend(self) -> None:
        raise NotImplementedError

    def capture(self) -> None:
        if not self.sizes:
            return
        self._init_backend()
        with torch.inference_mode():
            for bs in reversed(self.sizes):
                fb = self.buffers.batch(bs, self.kv_pool, self.req_to_token, self.attn_backend)
                fb.capture_layers = self.capture_layers
                self.attn_backend.init_forward_metadata_capture(fb)
                graph = self._capture_factory()
                graph.capture(lambda fb=fb: self.step_fn(fb))
                self.graphs[bs] = graph
                self.graph_batches[bs] = fb
        logger.info("captured %s graphs for batch sizes %s", self.kind, self.sizes)

    def padded_size(self, batch_size: int) -> Optional[int]:
        return padded_size(self.sizes, batch_size, not self.config.disable_padding)


class CudaGraphRunner(BucketedGraphRunner):
    def __init__(self, config: CudaGraphConfig, step_fn: StepFn, attn_backend: "AttentionBackend",
                 kv_pool: "KVPool", req_to_token: torch.Tensor, max_running_requests: int, device,
                 capture_factory: Optional[Callable[[], GraphCapture]] = None, with_lora: bool = False,
                 capture_layers: Optional[tuple[int, ...]] = None):
        super().__init__(config, step_fn, attn_backend, kv_pool, req_to_token, max_running_requests, device,
                         capture_factory, capture_layers)
        self.buffers = DecodeInputBuffers(self.max_bs, device, with_lora) if self.sizes else None

    def _init_backend(self) -> None:
        if not self.attn_backend.supports_cuda_graph:
            raise ValueError(f"attention backend {self.attn_backend.name!r} does not support CUDA graphs; "
                             "use --disable-cuda-graph or a backend that does (triton)")
        self.attn_backend.init_cuda_graph_state(self.max_bs)

    def can_run(self, fb: ForwardBatch) -> bool:
        if not (self.graphs and fb.mode.is_decode()) or fb.capture_layers != self.capture_layers:
            return False
        size = self.padded_size(fb.batch_size)
        return size is not None and size in self.graphs

    def replay(self, fb: ForwardBatch) -> Outputs:
        """The step's output for the real rows of ``fb`` ([B, ...], views of the static output)."""
        b = fb.batch_size
        size = self.padded_size(b)
        if size is None or size not in self.graphs:
            raise ValueError(f"no captured graph for a decode batch of {b} (buckets {self.sizes})")
        graph_fb = self.graph_batches[size]
        pad = size - b
        with torch.inference_mode():
            self.buffers.fill(fb, size)
            graph_fb.seq_lens_cpu = list(fb.seq_lens_cpu) + [PAD_SEQ_LEN] * pad
            graph_fb.extend_prefix_lens_cpu = list(fb.extend_prefix_lens_cpu) + [PAD_SEQ_LEN - 1] * pad
            graph_fb.real_batch_size = b
            self.attn_backend.init_forward_metadata_replay(graph_fb)
            return map_outputs(lambda t: t[:b], self.graphs[size].replay())
