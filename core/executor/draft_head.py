"""DraftHeadRunner: runs an EAGLE-style draft head (core/speculative.py ``DraftHead``) beside the target.

A draft head reads the target's hidden states. Its entry at position p of a request is the pair
(target hidden state at p, token p + 1); its output there (a feature, and logits through its LM
head) predicts token p + 2. ``observe`` feeds the pairs of every target step as soon as the step's
next tokens are known; ``propose`` samples the first draft from the last observed entry and runs
``depth - 1`` batched decode steps of the head on its own features for the rest of the chain.

KV: the head keeps its own KVPool (its layers only) indexed by the TARGET's slots: the head's KV of
position p sits in the slot where the target keeps position p, found through the target's
req_to_token row. The target's prefix cache, retraction and freeing therefore govern the head's
KV too, and a prefix-cache hit brings the head's KV along (its last entry was built with the
token that followed in the request that computed it: a stale guess costs acceptance, never a
wrong token). Chain steps past the target's KV (positions >= kv_len) write scratch slots beyond
the target's pool, ``num_slots + row * max_steps + j``, into the request's req_to_token row past
kv_len, where the target reads nothing before its verify step writes its own slots.

Trees (topk > 1, ``propose_tree``; the expansion itself is core/executor/draft_tree.py): each
step runs the head once per beam (topk per request). A beam attends the request's prefix and its
own ancestors only, so each beam gets a row of a per-step table: the request's slots of
positions 0 .. kv_len - 2, then the scratch slots of its ancestors' entries and its own
(``num_slots + ((row * max_steps + depth - 1) * topk + beam)``); the target's table is untouched.
Beam steps run eagerly (the chain-step graphs read the target's table).

CUDA graphs: where the target's decode steps have CUDA graphs, the head's steps are captured
too, per batch-size bucket with the target's buckets, padded with the dummy request as the
target's are: the chain steps (decode steps of the head, one row per request; the hidden input
is a static buffer [max_bs, feature_size] refilled before each replay) and, where the attention
backend captures extends, the extend over a target step's pairs when each request has at most
max_steps + 1 of them (after a verify or decode step; kvyard.executor.extend_graph_runner, the
target's hidden states as its per-row input). It writes nothing into the target's req_to_token
table: every entry there is a valid slot of the head's pool. Longer extends (prefill) run eagerly.

Invariants, per request:
  - ``_tails[rid].position`` = q: the head's KV covers positions [0, q] of the request, and the
    tail's feature and logits are its output at q. Drafts are proposed only when q is the
    request's kv_len - 1 (= len(token_ids) - 2); otherwise the request is decoded plainly and
    the next step's observe catches up.
  - drafts are sampled with the request's own sampling settings, seed and position (the draw
    the target's verify row makes, core/sampling/sampler.py): a head that agrees with the
    target is accepted under sampling too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kvyard.attention import AttentionConfig
from kvyard.attention.hybrid import build_attention_backend
from kvyard.executor.cuda_graph_runner import CudaGraphRunner
from kvyard.executor.extend_graph_runner import ExtendGraphRunner
from kvyard.forward_batch import ForwardBatch, ForwardMode
from kvyard.mem_cache.kv_pool import KVPool
from kvyard.sampling.batch_info import SamplingBatchInfo
from kvyard.sampling.sampler import Sampler
from kvyard.scheduler.req import Req


@dataclass
class _Tail:
    position: int              # q: the last position whose head entry exists
    feature: torch.Tensor      # [H] the head's feature at q (the next chain step's hidden input)
    logits: torch.Tensor       # [V_draft] float32 the head's logits at q (token q + 2)


class DraftHeadRunner:
    def __init__(self, head, *, target, max_steps: int, topk: int = 1):
        """head: a DraftHead module, built and loaded; target: the target's ModelRunner (read
        only: its slots, req_to_token table, attention backend choice and vocabulary)."""
        self.head = head
        self.device = target.device
        self.vocab_size = target.model_config.vocab_size
        self.table = target.req_to_token.table
        self.max_steps = max(1, max_steps)
        self.topk = max(1, topk)
        self.scratch_base = target.kv_pool_slots
        rows = self.table.shape[0]
        layout = head.kv_layout()
        self.pool = KVPool.for_layout(self.scratch_base + rows * self.max_steps * self.topk, layout, target.dtype,
                                      self.device)
        attention = AttentionConfig(num_heads=head.num_heads, num_kv_heads=layout.num_kv_heads,
                                    head_dim=layout.head_dim, dtype=target.dtype, device=self.device,
                                    page_size=1, max_context_len=target.model_config.context_length,
                                    max_batch_size=target.max_running_requests, kv_layout=layout,
                                    options=dict(target.config.attention_options or {}))
        self.attn, _ = build_attention_backend(attention, *target.attention_names)
        self.sampler = Sampler()
        self._feature_in: Optional[torch.Tensor] = None     # [max_bs, H] the graphs' hidden input
        self.chain_graphs = self._init_chain_graphs(target)
        self.observe_graphs = self._init_observe_graphs(target) if self.chain_graphs is not None else None
        self._tails: dict[str, _Tail] = {}
        self._reqs: dict[str, Req] = {}            # sampling views of the requests

    # -- the target's steps -------------------------------------------------------------------
    @torch.inference_mode()
    def observe(self, steps: Sequence) -> None:
        """steps: HiddenSteps (core/speculative.py); one batched extend of the head over them."""
        steps = [s for s in steps if len(s.next_tokens)]
        if not steps:
            return
        long = dict(dtype=torch.int64, device=self.device)
        ids = torch.tensor([t for s in steps for t in s.next_tokens], **long)
        positions = torch.tensor([s.start + j for s in steps for j in range(len(s.next_tokens))], **long)
        lens = [len(s.next_tokens) for s in steps]
        starts = [s.start for s in steps]
        fb = self._forward_batch(ForwardMode.EXTEND, ids, positions, torch.cat([s.slots for s in steps]),
                                 [s.kv_row for s in steps], starts, lens)
        hidden = torch.cat([s.hidden for s in steps]).to(self.device)
        if self.observe_graphs is not None and self.observe_graphs.can_run(fb):
            logits, feature = self.observe_graphs.replay(fb, row_input=hidden)
            feature = feature[fb.logits_indices]           # [B, H] at each request's last pair
        else:
            feature, logits = self._run(fb, ids, positions, hidden)
        for i, s in enumerate(steps):
            self._tails[s.rid] = _Tail(s.start + lens[i] - 1, feature[i], logits[i])

    # -- drafting -----------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, inputs: Sequence, depth: Sequence[int]) -> list[list[int]]:
        """inputs: DraftInputs; depth [B]: chain length wanted per request (0: none)."""
        chains: list[list[int]] = [[] for _ in inputs]
        live = [i for i, (inp, n) in enumerate(zip(inputs, depth)) if n > 0 and self._ready(inp)]
        if not live:
            return chains
        tails = [self._tails[inputs[i].rid] for i in live]
        feature = torch.stack([t.feature for t in tails])
        logits = torch.stack([t.logits for t in tails])
        for step in range(max(depth[i] for i in live)):
            picked = self._sample([inputs[i] for i in live], logits, step)
            for i, tok in zip(live, picked):
                chains[i].append(tok)
            keep = [k for k, i in enumerate(live) if depth[i] > step + 1]
            if not keep:
                break
            live = [live[k] for k in keep]
            feature, logits = self._chain_step([inputs[i] for i in live], [chains[i][-1] for i in live],
                                               feature[keep], step)
        return chains

    @torch.inference_mode()
    def propose_tree(self, inputs: Sequence, depth: Sequence[int], nodes: Sequence[int]) -> list:
        """inputs: DraftInputs; depth/nodes [B]: per request the deepest node and the most nodes
        wanted -> a DraftTree per request (empty where the head has no entry yet)."""
        from kvyard.executor.draft_tree import expand_tree
        return expand_tree(self, inputs, depth, nodes)

    def tree_roots(self, inputs: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, H], target-vocabulary log-probabilities [B, V]) at each request's tail."""
        tails = [self._tails[inp.rid] for inp in inputs]
        logits = torch.stack([t.logits for t in tails])
        return torch.stack([t.feature for t in tails]), self.log_probs(logits)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits [N, V_draft] -> float32 log-probabilities [N, V] over the target's vocabulary
        (-inf off the draft vocabulary)."""
        return torch.log_softmax(self._to_target_vocab(logits.float()), dim=-1)

    def favour_draws(self, inputs: Sequence, logp: torch.Tensor, depth: int) -> torch.Tensor:
        """Sampled (non-greedy) requests: each row's coupled draw (the token the request's own
        sampler settings, seed and position ``len(token_ids) + depth - 1`` pick from logp [N, V],
        the draw the target's verify row makes) gets log-probability 0, so it ranks first among
        its siblings and its path stays in the tree. Greedy rows are left as they are (their draw
        is the argmax, first anyway). inputs [N]: the request of each row."""
        rows = [r for r, inp in enumerate(inputs)
                if inp.sampling_params is not None and not inp.sampling_params.is_greedy]
        if not rows:
            return logp
        picked = [inputs[r] for r in rows]
        info = SamplingBatchInfo.from_reqs([self._req(inp) for inp in picked], self.vocab_size, self.device)
        positions = torch.tensor([len(inp.token_ids) + depth - 1 for inp in picked], dtype=torch.int64,
                                 device=self.device)
        draws = self.sampler(logp[rows], info, positions).next_ids
        logp[torch.tensor(rows, device=self.device), draws.to(self.device)] = 0.0
        return logp

    def beam_step(self, inputs: Sequence, tokens: torch.Tensor, feature: torch.Tensor,
                  paths: list[list[list[int]]], depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One head decode step of every beam: tokens [B * k] the beams' nodes at ``depth``,
        feature [B * k, H] their parents' features, paths [B][k] the scratch slots of each beam's
        ancestors' entries (depths 1 .. depth - 1). Writes each beam's entry (position
        kv_len - 1 + depth - 1) to its scratch slot and appends that slot to its path.
        -> (features [B * k, H], log-probabilities [B * k, V])."""
        k, long = self.topk, dict(dtype=torch.int64, device=self.device)
        prefix = [len(inp.token_ids) - 1 for inp in inputs]          # head entries 0 .. kv_len - 2
        for b, inp in enumerate(inputs):
            for j in range(k):
                paths[b][j] = paths[b][j] + [self.scratch_base + (inp.kv_row * self.max_steps + depth - 1) * k + j]
        # [B * k, width]: the request's row (the prefix; columns past it are overwritten or unread)
        rows = torch.tensor([inp.kv_row for inp in inputs], **long).repeat_interleave(k)
        table = self.table[rows, :max(prefix) + depth].clone()
        cols = torch.tensor(prefix, **long).repeat_interleave(k)[:, None] + torch.arange(depth, **long)[None, :]
        path = torch.tensor([p for beams in paths for p in beams], dtype=table.dtype, device=self.device)
        table[torch.arange(len(rows), **long)[:, None], cols] = path
        slots = [p[-1] for beams in paths for p in beams]
        pos = [prefix[b] + depth - 1 for b in range(len(inputs)) for _ in range(k)]
        positions = torch.tensor(pos, **long)
        fb = self._forward_batch(ForwardMode.DECODE, tokens, positions, torch.tensor(slots, **long),
                                 list(range(len(slots))), pos, [1] * len(slots), table=table)
        feature, logits = self._run(fb, tokens, positions, feature)
        return feature, self.log_probs(logits)

    def release(self, rid: str) -> None:
        self._tails.pop(rid, None)
        self._reqs.pop(rid, None)

    def close(self) -> None:
        self._tails.clear()
        self._reqs.clear()

    # -- CUDA graphs of the chain steps ------------------------------------------------------------
    def _init_chain_graphs(self, target) -> Optional[CudaGraphRunner]:
        """Captured chain steps where the target has CUDA graphs (module docstring), else None."""
        graphs = target.decode_graphs
        size = getattr(self.head, "feature_size", None)
        if type(graphs) is not CudaGraphRunner or graphs.buffers is None or not size \
                or not self.attn.supports_cuda_graph:
            return None
        self._feature_in = torch.zeros(graphs.max_bs, size, dtype=target.dtype, device=self.device)
        runner = CudaGraphRunner(graphs.config, self._graph_chain_step, self.attn, self.pool, self.table,
                                 target.max_running_requests, self.device)
        runner.capture()
        return runner

    def _init_observe_graphs(self, target) -> Optional[ExtendGraphRunner]:
        """Captured extends over the pairs of a verify or decode step (module docstring), or None."""
        if not self.attn.supports_extend_graph or not target.capture_layers:
            return None
        width = len(target.capture_layers) * target.model_config.hf_config.hidden_size
        runner = ExtendGraphRunner(self.chain_graphs.config, self.max_steps + 1, self._graph_observe_step, self.attn,
                                   self.pool, self.table, target.max_running_requests, self.device,
                                   row_input=(width, target.dtype), pad_table_entries=False)
        runner.capture()
        return runner

    def _graph_observe_step(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """What an observe graph captures: (logits [T, V_draft], features [T, H]) of every row."""
        feature, out = self.head(fb.input_ids, fb.positions, fb.extras["row_input"], fb)
        return self.head.compute_logits(out), feature

    def _graph_chain_step(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """What a chain-step graph captures: (features [B, H], logits [B, V_draft]) of every row."""
        feature, out = self.head(fb.input_ids, fb.positions, self._feature_in[:fb.batch_size], fb)
        return feature, self.head.compute_logits(out)

    # -- internals ----------------------------------------------------------------------------
    def _ready(self, inp) -> bool:
        tail = self._tails.get(inp.rid)
        return tail is not None and tail.position == len(inp.token_ids) - 2

    def _chain_step(self, inputs: Sequence, tokens: list[int], feature: torch.Tensor, step: int):
        """One head decode step: draft ``step`` (0-based) of each request at position
        kv_len + step, its KV in the request's scratch slot ``step``."""
        long = dict(dtype=torch.int64, device=self.device)
        rows = [inp.kv_row for inp in inputs]
        pos = [len(inp.token_ids) - 1 + step for inp in inputs]
        slots = torch.tensor([self.scratch_base + r * self.max_steps + step for r in rows], **long)
        self.table[torch.tensor(rows, **long), torch.tensor(pos, **long)] = slots.to(self.table.dtype)
        ids = torch.tensor(tokens, **long)
        positions = torch.tensor(pos, **long)
        fb = self._forward_batch(ForwardMode.DECODE, ids, positions, slots, rows, pos, [1] * len(rows))
        return self._run(fb, ids, positions, feature)

    def _run(self, fb: ForwardBatch, ids, positions, hidden) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, H], logits [B, V_draft]) at each request's last row."""
        # beam steps (trees) read a per-step table the graphs were not captured with: eager
        if self.chain_graphs is not None and fb.req_to_token is self.table and self.chain_graphs.can_run(fb):
            self._feature_in[:fb.batch_size].copy_(hidden)
            return self.chain_graphs.replay(fb)      # views of the graph's outputs: used before the next step
        self.attn.init_forward_metadata(fb)
        feature, out = self.head(ids, positions, hidden, fb)
        last = fb.logits_indices
        return feature[last], self.head.compute_logits(out[last])

    def _forward_batch(self, mode, ids, positions, slots, rows, prefix, lens, table=None) -> ForwardBatch:
        long = dict(dtype=torch.int64, device=self.device)
        seq_lens = [p + n for p, n in zip(prefix, lens)]
        starts, acc = [], 0
        for n in lens:
            starts.append(acc)
            acc += n
        return ForwardBatch(
            mode=mode, batch_size=len(rows), input_ids=ids, positions=positions,
            out_cache_loc=slots.to(self.device), req_pool_indices=torch.tensor(rows, **long),
            seq_lens=torch.tensor(seq_lens, **long), seq_lens_cpu=seq_lens, extend_prefix_lens_cpu=list(prefix),
            extend_seq_lens_cpu=list(lens), extend_start_loc=torch.tensor(starts, **long),
            logits_indices=torch.tensor([s + n - 1 for s, n in zip(starts, lens)], **long),
            req_to_token=self.table if table is None else table, kv_pool=self.pool, attn_backend=self.attn)

    def _sample(self, inputs: Sequence, logits: torch.Tensor, step: int) -> list[int]:
        """Draft ``step`` of each request: its own sampler settings and seed at position
        len(token_ids) + step; logits [B, V_draft] mapped onto the target's vocabulary."""
        full = self._to_target_vocab(logits)
        reqs = [self._req(inp) for inp in inputs]
        info = SamplingBatchInfo.from_reqs(reqs, self.vocab_size, self.device)
        positions = torch.tensor([len(inp.token_ids) + step for inp in inputs], dtype=torch.int64,
                                 device=self.device)
        return self.sampler(full, info, positions).next_ids.tolist()

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        ids: Optional[torch.Tensor] = self.head.draft_to_target
        if ids is None:
            return logits
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        full[:, ids] = logits
        return full

    def _req(self, inp) -> Req:
        req = self._reqs.get(inp.rid)
        if req is None:
            req = self._reqs[inp.rid] = Req(rid=inp.rid, origin_input_ids=[], sampling_params=inp.sampling_params,
                                            sampling_seed=inp.seed, req_pool_idx=inp.kv_row)
        return req
