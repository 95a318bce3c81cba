"""CUDA graphs for extends of at most W new tokens per request (the speculative verify step).

A speculative verify step is an extend of 1 + k tokens per request (the last token and its
drafts); a draft model's catch-up extend after a verify is one or two tokens per request. Their
shape is fixed but for the batch size, so they are captured like decode steps: per batch-size
bucket (the decode buckets: --cuda-graph-max-bs / --cuda-graph-bs), with every request padded to
exactly W rows.

Layout of a captured batch of P requests (P = the bucket, T = P * W rows): request i owns rows
[i * W, (i + 1) * W); its n_i <= W real tokens come first, at positions prefix_i + j. Padding
needs no branch in any kernel:
  - a short request's rows n_i .. W - 1: token 0 at positions prefix_i + j, written to the dummy
    KV slot 0, and its req_to_token entries at those positions are set to slot 0 before replay
    (entries past a request's KV are never read by anything else: the scheduler overwrites them
    when it allocates, and a draft head's scratch entries there are rewritten at each proposal).
    Causal attention keeps the real rows blind to them: real row j sees keys <= prefix_i + j.
  - requests B .. P - 1: the dummy request (req_to_token row 0, all slot 0) with W tokens at
    positions 0 .. W - 1.
Every captured kernel therefore sees W new tokens per request (max_q_len W), prefix lengths that
vary (attention backends keep them in static buffers, init_extend_graph_state /
init_forward_metadata_replay), and seq_lens = prefix + W. A batch replays only when every
request fits (1 <= n_i <= W and prefix_i + W within the req_to_token row), and it carries no
LoRA, return_hidden_states rows or model extras; anything else runs eagerly.

Outputs: the step function computes the logits of all T rows (and, with ``capture_layers``, the
hidden states of those layers); replay gathers the rows the caller's batch asked for:
``logits[dest[fb.logits_indices]]`` where dest[t] is the padded row of the batch's token row t,
and the other outputs at all real rows. A step that reads a per-row input besides the token ids
(a draft head reads the target's hidden states) declares ``row_input`` (width, dtype): a static
buffer [T, width] of the padded layout, handed to the step as ``fb.extras["row_input"]`` and
refilled from replay's ``row_input`` (padded rows zero). A batch that sets a ForwardBatch field
the layout does not place (_PLACED_FIELDS) runs eagerly: a tree-mask verify needs its mask as
one more static buffer of the padded layout, filled before replay, before it can replay.

``pad_table_entries=False`` skips the req_to_token writes for a table whose every entry is a
valid slot of the runner's pool anyway (a draft head's pool covers the target's slots and its
own scratch slots): the padded rows then read stale but valid keys, and entries the owner still
reads (rejected slots it is about to free) stay untouched.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Callable, Optional

import torch

from kvyard.executor.cuda_graph_runner import (DUMMY_ROW, DUMMY_SLOT, BucketedGraphRunner, CudaGraphConfig,
                                               GraphCapture, Outputs)
from kvyard.executor.host_pack import to_device
from kvyard.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from kvyard.attention import AttentionBackend
    from kvyard.mem_cache.kv_pool import KVPool

logger = logging.getLogger(__name__)


# ForwardBatch fields the padded layout accounts for; a batch that sets any other (e.g. a tree
# attention mask) runs eagerly until its field gets a static buffer here
_PLACED_FIELDS = frozenset({
    "mode", "batch_size", "input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens",
    "seq_lens_cpu", "extend_prefix_lens_cpu", "extend_seq_lens_cpu", "extend_start_loc", "logits_indices",
    "req_to_token", "kv_pool", "attn_backend", "attn_metadata", "lora", "real_batch_size", "hidden_indices",
    "extras", "capture_layers", "captured",
    "spec_verify"})   # a flag: a chain verify is a causal extend, laid out as any other


def _unknown_inputs(fb: ForwardBatch) -> bool:
    """Whether ``fb`` sets a field the padded layout does not place (so it must run eagerly);
    None, False and empty containers count as unset."""
    def is_set(value) -> bool:
        if isinstance(value, (list, tuple, dict, set)):
            return len(value) > 0
        return value is not None and value is not False
    return any(is_set(getattr(fb, f.name)) for f in dataclasses.fields(fb) if f.name not in _PLACED_FIELDS)


class ExtendLayout:
    """Where each token row of an extend batch goes in the padded layout (module docstring)."""

    def __init__(self, fb: ForwardBatch, width: int, padded_bs: int):
        lens, prefix = fb.extend_seq_lens_cpu, fb.extend_prefix_lens_cpu
        b = fb.batch_size
        if not b <= padded_bs:
            raise ValueError(f"padded batch size {padded_bs} must be >= the batch size {b}")
        if any(not 1 <= n <= width for n in lens):
            raise ValueError(f"every request needs 1..{width} new tokens, got {list(lens)}")
        self.width, self.padded_bs = width, padded_bs
        self.dest = [i * width + j for i, n in enumerate(lens) for j in range(n)]        # [T_real]
        self.prefix = list(prefix) + [0] * (padded_bs - b)                               # [P]
        self.positions = [p + j for p in self.prefix for j in range(width)]              # [P * W]
        # req_to_token entries of the short requests' padded rows: (request index, position) -> slot 0
        self.pad_entries = [(i, p + j) for i, (p, n) in enumerate(zip(prefix, lens)) for j in range(n, width)]

    @property
    def num_rows(self) -> int:
        return self.padded_bs * self.width


class ExtendInputBuffers:
    """The inputs of a padded extend of up to ``max_bs`` requests of ``width`` rows, allocated
    once and refilled in place (the captured kernels read these addresses)."""

    def __init__(self, max_bs: int, width: int, device, row_input: Optional[tuple[int, torch.dtype]] = None):
        long = dict(dtype=torch.int64, device=device)
        rows = max_bs * width
        self.max_bs, self.width, self.device = max_bs, width, device
        self.input_ids = torch.zeros(rows, **long)
        self.positions = torch.arange(width, **long).repeat(max_bs)
        self.out_cache_loc = torch.full((rows,), DUMMY_SLOT, **long)
        self.req_pool_indices = torch.full((max_bs,), DUMMY_ROW, **long)
        self.seq_lens = torch.full((max_bs,), width, **long)
        self.extend_start_loc = torch.arange(max_bs, **long) * width
        self.row_index = torch.arange(rows, **long)          # logits_indices: every row
        self.row_input = (torch.zeros(rows, row_input[0], dtype=row_input[1], device=device)
                          if row_input else None)            # [T, width] the step's per-row input

    def fill(self, fb: ForwardBatch, layout: ExtendLayout, req_to_token: Optional[torch.Tensor],
             row_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Copies ``fb`` (and its per-row input [T_real, width]) into the buffers in ``layout``,
        and points the padded rows' req_to_token entries at the dummy slot unless req_to_token is
        None; returns dest [T_real] on the device."""
        b, p, rows = fb.batch_size, layout.padded_bs, layout.num_rows
        # the host-made parts in one transfer (pinned, no wait on CUDA): dest [T_real], positions
        # [rows], seq_lens [P], and the (request, column) pairs of pad_entries
        pads = list(zip(*layout.pad_entries)) or [(), ()]
        dest, positions, seq_lens, pad_reqs, pad_cols, _ = to_device(
            (layout.dest, layout.positions, [q + self.width for q in layout.prefix], *pads),
            torch.empty(0, dtype=torch.int64), self.device)
        self.input_ids[:rows].zero_()
        self.input_ids.index_copy_(0, dest, fb.input_ids)
        self.positions[:rows].copy_(positions)
        self.positions.index_copy_(0, dest, fb.positions)
        self.out_cache_loc[:rows].fill_(DUMMY_SLOT)
        self.out_cache_loc.index_copy_(0, dest, fb.out_cache_loc)
        self.req_pool_indices[:b].copy_(fb.req_pool_indices)
        self.req_pool_indices[b:p].fill_(DUMMY_ROW)
        self.seq_lens[:p].copy_(seq_lens)
        if self.row_input is not None:
            if row_input is None:
                raise ValueError("this extend graph reads a per-row input: replay needs row_input")
            self.row_input[:rows].zero_()
            self.row_input.index_copy_(0, dest, row_input.to(self.row_input.dtype))
        if req_to_token is not None and layout.pad_entries:
            req_to_token[fb.req_pool_indices[pad_reqs], pad_cols] = DUMMY_SLOT   # rows looked up on the device
        return dest

    def batch(self, bs: int, kv_pool: "KVPool", req_to_token: torch.Tensor,
              attn_backend: "AttentionBackend") -> ForwardBatch:
        """An extend ForwardBatch of ``bs`` requests x ``width`` rows on views of these buffers."""
        w, rows = self.width, bs * self.width
        fb = ForwardBatch(
            mode=ForwardMode.EXTEND, batch_size=bs, input_ids=self.input_ids[:rows],
            positions=self.positions[:rows], out_cache_loc=self.out_cache_loc[:rows],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=[w] * bs, extend_prefix_lens_cpu=[0] * bs, extend_seq_lens_cpu=[w] * bs,
            extend_start_loc=self.extend_start_loc[:bs], logits_indices=self.row_index[:rows],
            req_to_token=req_to_token, kv_pool=kv_pool, attn_backend=attn_backend)
        if self.row_input is not None:
            fb.extras["row_input"] = self.row_input[:rows]
        return fb


class ExtendGraphRunner(BucketedGraphRunner):
    """Captured padded extends of ``width`` rows per request, one per batch-size bucket.

    step_fn(fb) -> logits [T, V] of every row of ``fb`` (its logits_indices are all rows), or a
    tuple (logits, *more outputs of every row, e.g. the hidden states of capture_layers)."""

    kind = "extend"

    def __init__(self, config: CudaGraphConfig, width: int, step_fn: Callable[[ForwardBatch], Outputs],
                 attn_backend: "AttentionBackend", kv_pool: "KVPool", req_to_token: torch.Tensor,
                 max_running_requests: int, device, capture_factory: Optional[Callable[[], GraphCapture]] = None,
                 capture_layers: Optional[tuple[int, ...]] = None,
                 row_input: Optional[tuple[int, torch.dtype]] = None, pad_table_entries: bool = True):
        if width < 1:
            raise ValueError(f"extend graph width must be >= 1, got {width}")
        super().__init__(config, step_fn, attn_backend, kv_pool, req_to_token, max_running_requests, device,
                         capture_factory, capture_layers)
        self.width, self.pad_table_entries = width, pad_table_entries
        self.buffers = ExtendInputBuffers(self.max_bs, width, device, row_input) if self.sizes else None

    def _init_backend(self) -> None:
        if not getattr(self.attn_backend, "supports_extend_graph", False):
            raise ValueError(f"attention backend {self.attn_backend.name!r} does not support CUDA graphs "
                             "of extend steps; use --disable-cuda-graph or a backend that does (triton)")
        self.attn_backend.init_extend_graph_state(self.max_bs, self.width)

    def can_run(self, fb: ForwardBatch) -> bool:
        if not (self.graphs and fb.mode.is_extend()) or fb.capture_layers != self.capture_layers:
            return False
        if fb.lora is not None or fb.hidden_indices is not None or fb.extras or _unknown_inputs(fb):
            return False
        size = self.padded_size(fb.batch_size)
        if size is None or size not in self.graphs:
            return False
        limit = self.req_to_token.shape[1] - self.width   # the padded rows' positions stay in the row
        return (all(1 <= n <= self.width for n in fb.extend_seq_lens_cpu)
                and all(p <= limit for p in fb.extend_prefix_lens_cpu))

    def replay(self, fb: ForwardBatch, row_input: Optional[torch.Tensor] = None) -> Outputs:
        """Logits of ``fb.logits_indices`` [N, V]; with more outputs the tuple (logits, *the
        others at every real row [T_real, ...]), all freshly gathered (not views of the graph's).
        row_input [T_real, width]: the per-row input, when the runner declared one."""
        size = self.padded_size(fb.batch_size)
        if size is None or size not in self.graphs:
            raise ValueError(f"no captured extend graph for a batch of {fb.batch_size} (buckets {self.sizes})")
        layout = ExtendLayout(fb, self.width, size)
        graph_fb = self.graph_batches[size]
        with torch.inference_mode():
            dest = self.buffers.fill(fb, layout, self.req_to_token if self.pad_table_entries else None, row_input)
            graph_fb.extend_prefix_lens_cpu = layout.prefix
            graph_fb.seq_lens_cpu = [p + self.width for p in layout.prefix]
            graph_fb.real_batch_size = fb.batch_size
            self.attn_backend.init_forward_metadata_replay(graph_fb)
            out = self.graphs[size].replay()
            if not isinstance(out, tuple):
                return out[dest[fb.logits_indices]]
            logits, *hidden = out
            return (logits[dest[fb.logits_indices]], *(h[dest] for h in hidden))
