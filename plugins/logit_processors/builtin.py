"""The built-in logit processors (see the package docstring for their custom_params)."""
from __future__ import annotations

import torch

from kvyard.logit_processor import LogitProcessor


class BanTokens(LogitProcessor):
    name = "ban_tokens"

    def __call__(self, logits: torch.Tensor, custom_params: list[dict]) -> torch.Tensor:
        for row, params in enumerate(custom_params):
            ids = [t for t in params.get("token_ids", ()) if 0 <= t < logits.shape[-1]]
            if ids:
                logits[row, ids] = float("-inf")
        return logits


class ForceToken(LogitProcessor):
    name = "force_token"

    def __call__(self, logits: torch.Tensor, custom_params: list[dict]) -> torch.Tensor:
        for row, params in enumerate(custom_params):
            token = params.get("token_id")
            if isinstance(token, int) and 0 <= token < logits.shape[-1]:
                logits[row].fill_(float("-inf"))
                logits[row, token] = 0.0
        return logits
