"""The thinking-token budget: closes a request's thinking section once it used up its budget.

A request with ``SamplingParams.thinking_budget`` set (reasoning effort, Anthropic's
``thinking.budget_tokens``) also carries the token ids of its reasoning format's markers:
``thinking_start_ids`` (empty: the output starts inside the thinking, the template opened it)
and ``thinking_end_ids``. ``enforce_thinking_budget`` runs on every sampled token, right after it
is appended (StopChecker.check calls it, before the stop checks): it counts the thinking tokens,
and once ``thinking_budget`` of them were generated it overwrites the next sampled tokens with the
end marker's ids, one per step, so the model continues from a closed thinking section.

Invariants: a forced token replaces the sampled one before anything reads it (the next decode
input, the detokenizer, the stop checks; the overlap scheduler treats such requests as sync
points, so it never feeds the sampled token in its place); at most ``thinking_budget`` thinking
tokens precede the end marker; a request whose model closes the section itself is left alone.
The logprob recorded for a forced token is the sampled token's (the forced one was not sampled).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvyard.scheduler.req import Req


class Phase(Enum):
    BEFORE = "before"      # waiting for the start marker
    THINKING = "thinking"  # inside the thinking section, counting its tokens
    CLOSING = "closing"    # the budget is used up: forcing the end marker's tokens
    DONE = "done"          # the section is closed (or never opens again)


@dataclass
class ThinkingState:
    phase: Phase
    count: int = 0    # thinking tokens generated so far
    forced: int = 0   # end-marker tokens forced so far (CLOSING)


def enforce_thinking_budget(req: Req) -> None:
    """Called after each token is appended to ``req.output_ids``; may overwrite that token."""
    sp = req.sampling_params
    if sp.thinking_budget is None:
        return
    state = req.thinking
    if state is None:
        state = req.thinking = ThinkingState(Phase.THINKING if not sp.thinking_start_ids else Phase.BEFORE)
    out, end = req.output_ids, list(sp.thinking_end_ids)
    if state.phase is Phase.BEFORE:
        if _ends_with(out, sp.thinking_start_ids):
            state.phase = Phase.THINKING
    elif state.phase is Phase.THINKING:
        if _ends_with(out, end):
            state.phase = Phase.DONE
        elif state.count >= sp.thinking_budget:
            _force(req, state, end)
        else:
            state.count += 1
    elif state.phase is Phase.CLOSING:
        _force(req, state, end)


def _force(req: Req, state: ThinkingState, end: list[int]) -> None:
    req.output_ids[-1] = end[state.forced]
    state.forced += 1
    state.phase = Phase.DONE if state.forced == len(end) else Phase.CLOSING


def _ends_with(out: list[int], marker) -> bool:
    marker = list(marker or ())
    return bool(marker) and out[-len(marker):] == marker
