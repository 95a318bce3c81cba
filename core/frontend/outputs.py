"""Output assembly, shared by kvyard.Engine and the HTTP handlers: one path from a request's
state to what the caller sees.

- ``output_of(tm, state)``: the cumulative output ``{"text", "output_ids", "meta_info"}``
  (``{"embedding", "meta_info"}`` for embeddings); reads the text the request's Detokenizer
  already decoded for this update (no decoding here).
- ``stream_chunks(tm, reqs)``: one merged stream of ``Chunk``s (what each request produced
  since its previous chunk) over several requests; closing it aborts the unfinished ones.
- ``native_item(chunk, incremental)``: SGLang's native stream shape, cumulative by default,
  deltas with ``--incremental-streaming-output``.
- ``single_or_list(outs, batch)``: one output or the list, by the ``batch`` flag that
  ``TokenizerManager.prepare`` decided once from the request's shape.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

LOGPROB_KEYS = ("output_token_logprobs", "output_top_logprobs")


@dataclass
class Chunk:
    """What one request produced since its previous chunk."""
    index: int                 # position of the request in the submitted list
    text: str                  # new visible text (stop strings never leak)
    ids: list[int]             # new output token ids
    token_logprobs: list       # new (logprob, token_id, token_text) triples
    top_logprobs: list         # new per-token lists of (logprob, token_id, token_text)
    out: dict                  # the cumulative output {"text", "output_ids", "meta_info"}
    finished: bool
    hidden_states: list = field(default_factory=list)   # new meta_info["hidden_states"] entries


def output_of(tm, state) -> dict:
    """The cumulative output of a request as of its latest update."""
    text = state.detok.text if state.detok is not None else ""
    meta = {"id": state.rid, **state.meta, "finish_reason": state.finish_reason}
    if state.first_token is not None:
        meta["ttft"] = state.first_token - state.created
    if state.return_logprob:
        meta.update(tm.logprob_meta(state))
    if state.return_hidden_states:
        meta["hidden_states"] = list(state.hidden_states)
    if state.embedding is not None:
        return {"embedding": state.embedding, "meta_info": meta}
    out = {"text": text, "output_ids": list(state.output_ids), "meta_info": meta}
    if state.detok is None:
        out["token_ids"] = out["output_ids"]   # --skip-tokenizer-init: SGLang's key for the ids
    return out


class ChunkCursor:
    """How much of one request's output was handed out already."""

    def __init__(self, index: int):
        self.index, self.ids, self.logprobs, self.hidden = index, 0, 0, 0

    def next(self, state, out: dict) -> Chunk:
        """Taken right when the update is consumed, so the text delta matches the ids delta."""
        text = state.detok.take_delta() if state.detok is not None else ""
        ids = out["output_ids"][self.ids:]
        self.ids = len(out["output_ids"])
        meta = out["meta_info"]
        token_lps, top_lps = meta.get(LOGPROB_KEYS[0], []), meta.get(LOGPROB_KEYS[1], [])
        new_lps, new_top = token_lps[self.logprobs:], top_lps[self.logprobs:]
        self.logprobs = len(token_lps)
        hidden = meta.get("hidden_states", [])
        new_hidden, self.hidden = hidden[self.hidden:], len(hidden)
        return Chunk(self.index, text, ids, new_lps, new_top, out,
                     finished=meta.get("finish_reason") is not None, hidden_states=new_hidden)


def submit_all(tm, reqs: list) -> list:
    """Submits every request or none (a failure aborts the ones already sent)."""
    states = []
    try:
        for r in reqs:
            states.append(tm.submit(r, True))
    except BaseException:
        for s in states:
            tm.abort_state(s)
        raise
    return states


async def stream_chunks(tm, reqs: list) -> AsyncIterator[Chunk]:
    """Chunks of all requests, interleaved as they arrive. Closing or cancelling the iterator
    aborts the unfinished requests."""
    states = submit_all(tm, reqs)
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, state) -> None:
        cursor = ChunkCursor(index)
        try:
            async for out in tm.stream_outputs(state):
                queue.put_nowait(cursor.next(state, out))
        except Exception as exc:  # EngineDeadError: hand it to the consumer
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(done)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(states)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for s in states:
            tm.abort_state(s)


def native_item(c: Chunk, incremental: bool, batch: bool) -> dict:
    """One event of a native stream (/generate, Engine.generate(stream=True)): the cumulative
    output (SGLang's default) or, incremental, only what is new (text, ids, logprobs, hidden
    states)."""
    out = c.out
    if incremental:
        meta = dict(out["meta_info"])
        if LOGPROB_KEYS[0] in meta:
            meta[LOGPROB_KEYS[0]], meta[LOGPROB_KEYS[1]] = c.token_logprobs, c.top_logprobs
        if "hidden_states" in meta:
            meta["hidden_states"] = c.hidden_states
        out = {"text": c.text, "output_ids": c.ids, "meta_info": meta}
    return {**out, "index": c.index} if batch else out


def strip_token_text(out: dict) -> dict:
    """Token texts in logprobs only when asked (return_text_in_logprobs), as in SGLang."""
    meta = out["meta_info"]
    if LOGPROB_KEYS[0] not in meta:
        return out
    strip = lambda triples: [(lp, tid, None) for lp, tid, _ in triples]  # noqa: E731
    new = dict(meta)
    for key in ("output_token_logprobs", "input_token_logprobs"):
        new[key] = strip(meta[key])
    for key in ("output_top_logprobs", "input_top_logprobs"):
        new[key] = [strip(t) if t else t for t in meta[key]]
    return {**out, "meta_info": new}


def single_or_list(outs: list, batch: bool):
    return list(outs) if batch else outs[0]
