"""ExtendBatchBuilder: accumulates the flat inputs of one extend (prefill) batch.

The scheduler adds requests one by one (each with the slots it allocated for its next ``n``
tokens); ``finish`` turns them into a ScheduleBatch. Shapes: T new tokens, B requests, S sample
rows (the last token of each request whose prompt this batch completes), P prompt-logprob rows.
With --enable-mixed-chunk the running requests' decode tokens join last (``add_decodes``): one
row each on top of their KV, sampled like a decode step.
"""
from __future__ import annotations

import torch

from kvyard.forward_batch import ForwardMode
from kvyard.sampling.batch_info import SamplingBatchInfo
from kvyard.scheduler.req import Req
from kvyard.scheduler.schedule_batch import ScheduleBatch


class ExtendBatchBuilder:
    def __init__(self):
        self.reqs: list[Req] = []
        self.input_ids: list[int] = []
        self.positions: list[int] = []
        self.slots: list[torch.Tensor] = []
        self.prefix_lens: list[int] = []
        self.extend_lens: list[int] = []
        self.sample_rows: list[int] = []
        self.sample_req_idx: list[int] = []
        self.input_logprob_rows: list[tuple[int, int, int]] = []
        self.hidden_rows: list[tuple[int, int]] = []
        self.mixed_decodes = 0

    def add(self, req: Req, slots: torch.Tensor, n: int) -> None:
        """Tokens [kv_len, kv_len + n) of ``req`` into ``slots`` [n]."""
        i, start, ids = len(self.reqs), len(self.input_ids), req.all_ids
        begin = req.kv_len
        self.reqs.append(req)
        self.input_ids += ids[begin:begin + n]
        self.positions += range(begin, begin + n)
        self.slots.append(slots)
        self.prefix_lens.append(begin)
        self.extend_lens.append(n)
        if req.return_logprob and req.logprob_start_len >= 0:
            # row j predicts token j + 1; prompt logprobs cover prompt tokens after logprob_start_len,
            # each once (the re-prefill of a retracted request skips those it already has)
            prompt_len = len(req.origin_input_ids)
            first = max(begin, req.logprob_start_len + len(req.input_token_logprobs))
            for pos in range(first, min(begin + n, prompt_len - 1)):
                self.input_logprob_rows.append((i, start + pos - begin, ids[pos + 1]))
        if req.return_hidden_states:   # each position once, also across a retraction's re-prefill
            self.hidden_rows += [(i, start + pos - begin) for pos in range(max(begin, req.hidden_len), begin + n)]
        if begin + n == len(ids):
            self.sample_rows.append(start + n - 1)
            self.sample_req_idx.append(i)

    def add_decodes(self, reqs: list[Req], slots: torch.Tensor, tokens: list[int]) -> None:
        """Running requests decoding one token each in this batch: ``tokens`` [D] (a last
        output id or its future placeholder) into ``slots`` [D]; call after every ``add``."""
        for req, token, slot in zip(reqs, tokens, slots.split(1)):
            i, row = len(self.reqs), len(self.input_ids)
            self.reqs.append(req)
            self.input_ids.append(token)
            self.positions.append(req.kv_len)
            self.slots.append(slot)
            self.prefix_lens.append(req.kv_len)
            self.extend_lens.append(1)
            if req.return_hidden_states:
                self.hidden_rows.append((i, row))
            self.sample_rows.append(row)
            self.sample_req_idx.append(i)
        self.mixed_decodes += len(reqs)

    def finish(self, vocab_size: int, device, eos_token_ids: list[int]) -> ScheduleBatch:
        batch = ScheduleBatch(
            mode=ForwardMode.EXTEND, reqs=self.reqs, input_ids=self.input_ids, positions=self.positions,
            out_cache_loc=torch.cat(self.slots), prefix_lens=self.prefix_lens, extend_lens=self.extend_lens,
            sample_rows=self.sample_rows, sample_req_idx=self.sample_req_idx,
            input_logprob_rows=self.input_logprob_rows, hidden_rows=self.hidden_rows,
            mixed_decodes=self.mixed_decodes)
        sample_reqs = [self.reqs[i] for i in self.sample_req_idx]
        if sample_reqs and not self.reqs[0].embed:
            batch.sampling_info = SamplingBatchInfo.from_reqs(sample_reqs, vocab_size, device,
                                                              eos_token_ids=eos_token_ids)
        return batch
