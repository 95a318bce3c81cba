"""Decides after each sampled token whether a request is finished, and why (after the thinking
budget, kvyard.scheduler.thinking_budget, had its say about that token)."""
from __future__ import annotations

from typing import Callable, Optional

from kvyard.scheduler.req import FinishReason, Req
from kvyard.scheduler.thinking_budget import enforce_thinking_budget


class StopChecker:
    def __init__(self, eos_token_ids: list[int], tokenizer_factory: Callable[[], object] | None):
        self.eos = set(eos_token_ids)
        self._tokenizer_factory = tokenizer_factory
        self._tokenizer = None  # loaded on the first request with stop strings

    def check(self, req: Req, context_length: int) -> Optional[FinishReason]:
        enforce_thinking_budget(req)  # may replace the last token with a forced end-of-thinking one
        sp, out = req.sampling_params, req.output_ids
        last = out[-1]
        if len(out) >= sp.max_new_tokens:
            return FinishReason("length", matched=None)
        if last in (sp.stop_token_ids or ()) or (not sp.ignore_eos and last in self.eos):
            return FinishReason("stop", matched=last)
        if sp.stop:
            matched = self._stop_string(sp.stop, out)
            if matched is not None:
                return FinishReason("stop", matched=matched)
        if req.seq_len >= context_length:
            return FinishReason("length", matched=None)
        return None

    def _stop_string(self, stops: list[str], out: list[int]) -> Optional[str]:
        if self._tokenizer is None:
            if self._tokenizer_factory is None:
                return None
            self._tokenizer = self._tokenizer_factory()
        window = max(len(s) for s in stops) + 1  # a token holds at least one character
        tail = self._tokenizer.decode(out[-window:], skip_special_tokens=False)
        for s in stops:
            if s and s in tail:
                return s
        return None
