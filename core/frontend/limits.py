"""Per-request size limits the TokenizerManager enforces before any tokenizing or expansion.

A request asks for ``prompts x n`` sequences; each one becomes a TokenizedGenerateReq, a
scheduler row and a response object, so an unbounded ``n`` (or a huge batch of prompts) lets
one client exhaust the API process's memory. ``RequestLimits`` caps that, and the number of top
logprobs per token (each one is a row of the response). The server passes the limits of its
flags (--max-n, --max-sequences-per-request, --max-top-logprobs-num); the offline Engine runs
without them (``None``): its caller is the operator.

Invariant: ``check_request_size`` reads only the raw request (counts, not contents), so it
costs O(number of prompts) whatever the prompts hold, and it runs before tokenization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from kvyard.errors import RequestError


@dataclass(frozen=True)
class RequestLimits:
    max_n: int = 64
    max_sequences_per_request: int = 256
    max_top_logprobs_num: int = 20

    @classmethod
    def from_args(cls, args: Any) -> "RequestLimits":
        return cls(max_n=args.max_n, max_sequences_per_request=args.max_sequences_per_request,
                   max_top_logprobs_num=args.max_top_logprobs_num)


def num_prompts(obj: dict) -> int:
    """How many prompts a native request dict carries (1 for a single prompt)."""
    text = obj.get("text", obj.get("prompt"))
    if isinstance(text, list):
        return len(text)
    ids = obj.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    return 1


def _n_of(params: Any) -> int:
    """A request's n as an int (1 when absent or mistyped: SamplingParams reports those)."""
    n = params.get("n", 1) if isinstance(params, dict) else getattr(params, "n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) else 1


def check_request_size(obj: dict, limits: Optional[RequestLimits]) -> None:
    """RequestError naming ``n`` (or ``top_logprobs_num``) when the request asks for more than
    the limits allow."""
    if limits is None:
        return
    params = obj.get("sampling_params") or {}
    if isinstance(params, list):   # one entry per prompt
        ns = [_n_of(p) for p in params] or [1]
        total = sum(ns)
    else:
        ns = [_n_of(params)]
        total = num_prompts(obj) * ns[0]
    if max(ns) > limits.max_n:
        raise RequestError(f"n must be <= {limits.max_n} (the server's --max-n), got {max(ns)}", param="n")
    if total > limits.max_sequences_per_request:
        raise RequestError(f"n: the request asks for {total} sequences (prompts x n); the server allows "
                           f"{limits.max_sequences_per_request} (--max-sequences-per-request)", param="n")
    top = obj.get("top_logprobs_num")
    if isinstance(top, int) and not isinstance(top, bool) and top > limits.max_top_logprobs_num:
        raise RequestError(f"top_logprobs_num must be <= {limits.max_top_logprobs_num} "
                           f"(the server's --max-top-logprobs-num), got {top}", param="top_logprobs_num")
