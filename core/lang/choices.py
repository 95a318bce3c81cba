"""Choices methods: how select() turns per-option prompt logprobs into one decision.

Input per option i: ``token_logprobs[i]`` — the logprobs of option i's tokens given the prefix
(length >= 1; a token the prefix and the option share at their boundary belongs to the option),
and for ``unconditional_likelihood_normalized`` also ``unconditional[i]`` — the same tokens'
logprobs with no prefix (the first has none: 0). Ties go to the earliest option.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from kvyard.lang.errors import LangError


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict = field(default_factory=dict)


def _argmax_first(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class ChoicesMethod:
    name = ""
    requires_unconditional_logprobs = False

    def __call__(self, choices: Sequence[str], token_logprobs: list[list[float]],
                 unconditional: Optional[list[list[float]]] = None) -> ChoicesDecision:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class TokenLengthNormalized(ChoicesMethod):
    """The option with the highest mean token logprob."""
    name = "token_length_normalized"

    def __call__(self, choices, token_logprobs, unconditional=None):
        scores = [_mean(lps) for lps in token_logprobs]
        return ChoicesDecision(choices[_argmax_first(scores)],
                               {"normalized_prompt_logprobs": scores, "input_token_logprobs": token_logprobs})


class GreedyTokenSelection(ChoicesMethod):
    """Token by token: keep the options with the highest logprob at each position, as greedy
    decoding would; an option that has run out of tokens continues with its mean logprob."""
    name = "greedy_token_selection"

    def __call__(self, choices, token_logprobs, unconditional=None):
        width = max(len(lps) for lps in token_logprobs)
        rows = [lps + [_mean(lps)] * (width - len(lps)) for lps in token_logprobs]
        remaining = list(range(len(choices)))
        for col in range(width):
            best = max(rows[i][col] for i in remaining)
            remaining = [i for i in remaining if rows[i][col] == best]
            if len(remaining) == 1:
                break
        return ChoicesDecision(choices[remaining[0]], {
            "normalized_prompt_logprobs": [_mean(lps) for lps in token_logprobs],
            "input_token_logprobs": token_logprobs, "greedy_logprob_matrix": rows})


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The option with the highest mean of (logprob given the prefix - logprob without it):
    corrects for options that are likely whatever the question."""
    name = "unconditional_likelihood_normalized"
    requires_unconditional_logprobs = True

    def __call__(self, choices, token_logprobs, unconditional=None):
        if unconditional is None:
            raise LangError("unconditional_likelihood_normalized: the backend returned no unconditional logprobs")
        scores = [_mean([c - u for c, u in zip(cond, unc)]) for cond, unc in zip(token_logprobs, unconditional)]
        return ChoicesDecision(choices[_argmax_first(scores)], {
            "normalized_unconditional_prompt_logprobs": scores,
            "normalized_prompt_logprobs": [_mean(lps) for lps in token_logprobs],
            "input_token_logprobs": token_logprobs, "unconditional_token_logprobs": unconditional})


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
METHODS = {m.name: m for m in (token_length_normalized, greedy_token_selection,
                               unconditional_likelihood_normalized)}


def resolve_method(method) -> ChoicesMethod:
    """A ChoicesMethod (or its name) -> the method; anything else is a one-line error."""
    if method is None:
        return token_length_normalized
    if isinstance(method, ChoicesMethod):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]
    raise LangError(f"choices_method: unknown method {method!r}; valid: {', '.join(METHODS)}")
