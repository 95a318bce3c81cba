"""A scheduler-free driver that shows the exact ForwardBatch contract a model and an attention
backend rely on, and runs greedy generation with them.

PagedKV      the KVPool, the req_to_token table (row 0 = dummy) and a page allocator that hands
             pages out in shuffled order, so a request's slots are scattered over the pool.
Seq          one request: its tokens and how many of them already have k/v in the pool.
Harness      builds extend / decode ForwardBatches for a list of Seqs and runs them.

Invariant kept between steps: ``req_to_token[seq.row, :seq.kv_len]`` are the slots holding the
k/v of ``seq.tokens[:seq.kv_len]``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from kvyard.attention import AttentionBackend, AttentionConfig
from kvyard.forward_batch import ForwardBatch, ForwardMode
from kvyard.kv_layout import KVLayout
from kvyard.mem_cache.kv_pool import KVPool


class PagedKV:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int = 512,
                 page_size: int = 1, max_reqs: int = 16, max_context: int = 512,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                 layout: Optional[KVLayout] = None):
        """``layout``: the model's declared KV layout (default: K/V per head of these sizes)."""
        self.page_size = page_size
        self.pool = KVPool(num_pages * page_size, num_layers, num_kv_heads, head_dim, dtype, device, layout)
        self.req_to_token = torch.zeros(max_reqs + 1, max_context, dtype=torch.int32, device=device)
        self.free_pages = list(range(1, num_pages))          # page 0 is the dummy page
        random.Random(seed).shuffle(self.free_pages)
        self.free_rows = list(range(1, max_reqs + 1))        # row 0 is the dummy row
        self.pages: dict[int, list[int]] = {}                # row -> its pages in order

    def new_row(self) -> int:
        row = self.free_rows.pop(0)
        self.pages[row] = []
        return row

    def share_prefix(self, src_row: int, dst_row: int, num_tokens: int) -> None:
        """dst's first num_tokens (a page multiple) reuse src's slots, as a prefix cache would."""
        assert num_tokens % self.page_size == 0 and not self.pages[dst_row]
        self.pages[dst_row] = list(self.pages[src_row][:num_tokens // self.page_size])
        self.req_to_token[dst_row, :num_tokens] = self.req_to_token[src_row, :num_tokens]

    def allocate(self, row: int, start: int, count: int) -> torch.Tensor:
        """Slots for tokens [start, start + count) of ``row``, recorded in req_to_token; [count] int64."""
        slots = []
        for j in range(start, start + count):
            if j // self.page_size == len(self.pages[row]):
                self.pages[row].append(self.free_pages.pop())
            slots.append(self.pages[row][j // self.page_size] * self.page_size + j % self.page_size)
        loc = torch.tensor(slots, dtype=torch.int64, device=self.req_to_token.device)
        self.req_to_token[row, start:start + count] = loc.to(torch.int32)
        return loc

    def backend_config(self, num_heads: int, head_dim: int, max_batch_size: int = 16) -> AttentionConfig:
        pool = self.pool
        return AttentionConfig(num_heads=num_heads, num_kv_heads=pool.k_buffers[0].shape[1],
                               head_dim=head_dim, dtype=pool.dtype, device=str(pool.k_buffers[0].device),
                               page_size=self.page_size, max_context_len=self.req_to_token.shape[1],
                               max_batch_size=max_batch_size, kv_layout=pool.layout)


@dataclass
class Seq:
    row: int
    tokens: list[int]
    kv_len: int = 0                                      # tokens whose k/v are in the pool
    output: list[int] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.kv_len


@dataclass
class Generation:
    tokens: list[list[int]]          # [B][steps] greedy tokens per prompt
    logits: list[torch.Tensor]       # per step: [B, vocab] float32 (step 0 comes from the prefill)


class Harness:
    def __init__(self, model, backend: AttentionBackend, kv: PagedKV):
        self.model, self.backend, self.kv = model, backend, kv
        self.device = kv.req_to_token.device

    # -- ForwardBatch construction -------------------------------------------------------------
    def extend_batch(self, seqs: Sequence[Seq], counts: Sequence[int], all_logits: bool = False) -> ForwardBatch:
        """Each seq extends its next counts[i] tokens on top of its kv_len cached ones."""
        ids, positions, locs, starts, logit_rows = [], [], [], [], []
        for seq, n in zip(seqs, counts):
            start = seq.kv_len
            starts.append(len(ids))
            ids += seq.tokens[start:start + n]
            positions += range(start, start + n)
            locs.append(self.kv.allocate(seq.row, start, n))
            logit_rows += range(len(ids) - n, len(ids)) if all_logits else [len(ids) - 1]
        prefix_lens = [s.kv_len for s in seqs]
        seq_lens = [p + n for p, n in zip(prefix_lens, counts)]
        return self._batch(ForwardMode.EXTEND, seqs, ids, positions, torch.cat(locs), seq_lens,
                           prefix_lens, list(counts), starts, logit_rows)

    def decode_batch(self, seqs: Sequence[Seq]) -> ForwardBatch:
        """One new token per seq: its last token, at position kv_len."""
        ids = [s.tokens[s.kv_len] for s in seqs]
        positions = [s.kv_len for s in seqs]
        locs = torch.cat([self.kv.allocate(s.row, s.kv_len, 1) for s in seqs])
        b = len(seqs)
        return self._batch(ForwardMode.DECODE, seqs, ids, positions, locs,
                           [s.kv_len + 1 for s in seqs], [s.kv_len for s in seqs], [1] * b,
                           list(range(b)), list(range(b)))

    def _batch(self, mode, seqs, ids, positions, locs, seq_lens, prefix_lens, counts, starts,
               logit_rows) -> ForwardBatch:
        def tensor(values):
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        return ForwardBatch(
            mode=mode, batch_size=len(seqs), input_ids=tensor(ids), positions=tensor(positions),
            out_cache_loc=locs, req_pool_indices=tensor([s.row for s in seqs]),
            seq_lens=tensor(seq_lens), seq_lens_cpu=list(seq_lens),
            extend_prefix_lens_cpu=list(prefix_lens), extend_seq_lens_cpu=list(counts),
            extend_start_loc=tensor(starts), logits_indices=tensor(logit_rows),
            req_to_token=self.kv.req_to_token, kv_pool=self.kv.pool, attn_backend=self.backend)

    # -- running -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, fb: ForwardBatch, seqs: Sequence[Seq]) -> torch.Tensor:
        """One forward step; advances each seq's kv_len. Returns logits [N, vocab] float32."""
        self.backend.init_forward_metadata(fb)
        hidden = self.model(fb.input_ids, fb.positions, fb)
        for seq, n in zip(seqs, fb.extend_seq_lens_cpu):
            seq.kv_len += n
        return self.model.compute_logits(hidden[fb.logits_indices])

    def add(self, prompts: Sequence[Sequence[int]]) -> list[Seq]:
        return [Seq(self.kv.new_row(), list(p)) for p in prompts]

    def prefill(self, seqs: Sequence[Seq], chunk_size: Optional[int] = None) -> torch.Tensor:
        """Batched extend until every seq is cached; each step takes up to chunk_size tokens per
        seq (chunked prefill). Returns the logits of each seq's last token [B, vocab]."""
        last: dict[int, torch.Tensor] = {}
        while any(s.pending for s in seqs):
            active = [s for s in seqs if s.pending]
            counts = [min(s.pending, chunk_size or s.pending) for s in active]
            logits = self.run(self.extend_batch(active, counts), active)
            for seq, row in zip(active, logits):
                last[seq.row] = row
        return torch.stack([last[s.row] for s in seqs])

    def prefill_with_reuse(self, seqs: Sequence[Seq]) -> torch.Tensor:
        """One seq at a time; each first reuses the longest page-aligned prefix it shares with
        an earlier seq (as the radix cache would), then extends the rest on top of it."""
        logits = []
        for i, seq in enumerate(seqs):
            best, donor = 0, None
            for prev in seqs[:i]:
                shared = _common_prefix(prev.tokens, seq.tokens, limit=len(seq.tokens) - 1)
                shared -= shared % self.kv.page_size
                if shared > best:
                    best, donor = shared, prev
            if donor is not None:
                self.kv.share_prefix(donor.row, seq.row, best)
                seq.kv_len = best
            logits.append(self.prefill([seq])[0])
        return torch.stack(logits)

    def generate(self, prompts: Sequence[Sequence[int]], steps: int, chunk_size: Optional[int] = None,
                 reuse_prefix: bool = False) -> Generation:
        """Greedy decoding of all prompts as one batch; logits per step for comparison."""
        seqs = self.add(prompts)
        logits = self.prefill_with_reuse(seqs) if reuse_prefix else self.prefill(seqs, chunk_size)
        history = []
        for step in range(steps):
            history.append(logits)
            for seq, token in zip(seqs, logits.argmax(-1).tolist()):
                seq.tokens.append(token)
                seq.output.append(token)
            if step + 1 < steps:
                logits = self.run(self.decode_batch(seqs), seqs)
        return Generation([s.output for s in seqs], history)

    def prefill_logits(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """One batched extend with logits for every prompt token: [len_i, vocab] per prompt."""
        seqs = self.add(prompts)
        logits = self.run(self.extend_batch(seqs, [s.pending for s in seqs], all_logits=True), seqs)
        return list(logits.split([len(p) for p in prompts]))


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    while n < min(len(a), len(b), limit) and a[n] == b[n]:
        n += 1
    return n


def tiny_llama_on_triton(**triton_options):
    """(model, triton backend, PagedKV): a tiny random Llama (2 layers, hidden 64, 4 heads over 2
    KV heads, vocabulary 128) as the llama plugin builds it, with transformers' weights, and the
    triton attention plugin (set TRITON_INTERPRET=1 on the CPU) over a pool of 16-token pages."""
    import transformers

    from kvyard.model_base import ModelBuildContext
    from kvyard.plugins import PluginManager
    import kvyard_plugins.attention.triton as triton_plugin
    import kvyard_plugins.models.llama as llama_plugin

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=128,
                                   max_position_embeddings=128, initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    pm = PluginManager(autoload=False)
    pm.add_plugin(llama_plugin)
    pm.add_plugin(triton_plugin)
    model = pm.registry("model_architectures").get("LlamaForCausalLM")(cfg, ModelBuildContext(torch.float32, "cpu"))
    model.load_weights(hf.state_dict().items())
    kv = PagedKV(2, 2, 16, num_pages=16, page_size=16, seed=3)
    attn_cfg = kv.backend_config(4, 16)
    attn_cfg = type(attn_cfg)(**{**attn_cfg.__dict__, "options": dict(triton_options)})
    return model, pm.registry("attention_backends").get("triton")(attn_cfg), kv
