"""Reasoning effort -> a thinking-token budget, as SamplingParams fields.

``reasoning_effort`` (chat), ``reasoning.effort`` (responses) and ``thinking.budget_tokens``
(messages) all end here. With --reasoning-parser set, the parser names its thinking markers
(ReasoningParser.thinking_markers) and ``thinking_fields`` turns the budget into the
``thinking_budget`` / ``thinking_start_ids`` / ``thinking_end_ids`` sampling fields the scheduler
enforces (kvyard.scheduler.thinking_budget). Without a reasoning parser the model does not think
in a format the server knows, so a budget has nothing to bound and adds nothing.
"""
from __future__ import annotations

import logging
from typing import Optional

logger = logging.getLogger(__name__)

# effort -> thinking tokens at most ("none": the section is closed at once)
EFFORT_BUDGETS = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768,
                 "max": 65536}


def effort_budget(effort: Optional[str], param: str) -> Optional[int]:
    from kvyard.errors import RequestError

    if effort is None:
        return None
    if effort not in EFFORT_BUDGETS:
        raise RequestError(f"{param}: unknown effort {effort!r} (one of {', '.join(EFFORT_BUDGETS)})", param=param)
    return EFFORT_BUDGETS[effort]


def thinking_fields(ctx, budget: Optional[int]) -> dict:
    """The sampling fields for ``budget`` thinking tokens; {} without a budget or a parser."""
    if budget is None or not ctx.args.reasoning_parser:
        return {}
    from kvyard.parsers import ReasoningParserFacade

    markers = ReasoningParserFacade(ctx.args.reasoning_parser).thinking_markers()
    if markers is None:
        return {}
    start, end = markers
    encode = lambda text: ctx.tm.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    end_ids = encode(end)
    if not end_ids:  # the tokenizer cannot spell the marker: the section cannot be closed by force
        logger.warning("thinking budget ignored: the tokenizer encodes %r to no tokens", end)
        return {}
    return {"thinking_budget": budget, "thinking_start_ids": encode(start) if start else [],
            "thinking_end_ids": end_ids}
