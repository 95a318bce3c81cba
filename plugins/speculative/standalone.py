"""STANDALONE: a smaller model with the target's tokenizer drafts ``num_steps`` tokens.

The draft model runs in the scheduler process with its own weights and KV pool
(core/executor/draft_model.py, built through DraftContext.make_draft_model): any model plugin and
load format work for it. Each draft is sampled with the request's own settings, seed and
position, so under sampling too a draft model close to the target is accepted often; the target
decides every token (core/speculative.py).
"""
from __future__ import annotations

import logging
from typing import Sequence

from kvyard.speculative import DraftContext, DraftInput, SpeculativeAlgorithm, SpeculativeConfig

logger = logging.getLogger(__name__)


class StandaloneAlgorithm(SpeculativeAlgorithm):
    name = "STANDALONE"

    def __init__(self, config: SpeculativeConfig, context: DraftContext):
        super().__init__(config, context)
        if context.make_draft_model is None:
            raise ValueError("speculative_algorithm STANDALONE: this engine cannot build a draft model")
        self.draft = context.make_draft_model(config.draft_model_path, config.draft_model_revision)
        if self.draft.vocab_size != context.vocab_size:
            logger.warning("the draft model's vocabulary (%d) differs from the target's (%d): drafts of "
                           "ids the target lacks are always rejected", self.draft.vocab_size, context.vocab_size)

    def propose(self, requests: Sequence[DraftInput]) -> list[list[int]]:
        depth = [min(r.max_draft_len, self.config.num_steps) for r in requests]
        return self.draft.propose(requests, depth)

    def release(self, rid: str) -> None:
        self.draft.release(rid)

    def close(self) -> None:
        self.draft.close()
