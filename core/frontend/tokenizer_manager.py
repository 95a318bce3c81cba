"""TokenizerManager: the API process's side of the engine.

Turns a request (text or token ids, one or a batch, n samples) into TokenizedGenerateReqs for
the scheduler process, and the scheduler's token updates back into SGLang-shaped outputs:
{"text", "output_ids", "meta_info": {...}}. It lives on one asyncio loop (the Engine's own
thread, or the HTTP server's loop) and never runs model compute, so it stays responsive.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

import zmq
import zmq.asyncio

from kvyard.frontend.detokenizer import DecodeState, Detokenizer
from kvyard.frontend import outputs
from kvyard.compat.request_fields import (EMBEDDING_FIELDS, GENERATE_FIELDS, check_fields, check_logit_processor,
                                          drop_ignored)
from kvyard.frontend.limits import RequestLimits, check_request_size
from kvyard.errors import EngineDeadError, RequestError
from kvyard.scheduler.io_struct import (AbortReq, BatchTokenOut, ControlReply, ControlReq, ReqUpdate,
                              SchedulerError, TokenizedGenerateReq)
from kvyard.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

REQUEST_FIELDS = {"text", "input_ids", "sampling_params", "rid", "return_logprob", "top_logprobs_num",
                  "logprob_start_len", "return_text_in_logprobs", "stream", "priority", "prompt",
                  "custom_logit_processor", "return_hidden_states", "lora_path"}
LORA_UNLOAD_POLL_S = 0.05   # how often an unload re-asks the scheduler while the adapter's requests finish


class PreparedReqs(list):
    """The TokenizedGenerateReqs of one request (prompt-major, then sample), and whether the
    caller gets a list back (``batch``): decided here, once, from the request's shape."""

    def __init__(self, reqs, batch: bool):
        super().__init__(reqs)
        self.batch = batch


@dataclass
class ReqState:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    return_logprob: bool
    return_text_in_logprobs: bool
    detok: Optional[Detokenizer]   # None without a tokenizer (--skip-tokenizer-init)
    created: float = field(default_factory=time.monotonic)
    first_token: Optional[float] = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[dict] = None
    meta: dict = field(default_factory=dict)
    logprobs: dict = field(default_factory=lambda: {"output_token_logprobs": [], "output_top_logprobs": [],
                                                    "input_token_logprobs": [], "input_top_logprobs": []})
    embedding: Optional[list[float]] = None
    return_hidden_states: bool = False
    hidden_states: list = field(default_factory=list)   # SGLang's meta_info["hidden_states"] so far
    lora_name: Optional[str] = None      # the LoRA adapter serving it (None: the base model)


class TokenizerManager:
    def __init__(self, tokenizer, scheduler_info: dict, send_addr: str, recv_addr: str,
                 is_alive: Callable[[], bool], *, random_seed: Optional[int] = None,
                 allow_auto_truncate: bool = False, model_name: str = "default",
                 on_finish: Optional[Callable[[ReqState], None]] = None, log_requests: bool = False,
                 grammar_checker=None, incremental_streaming: bool = False,
                 enable_custom_logit_processor: bool = False, limits: Optional[RequestLimits] = None,
                 enable_return_hidden_states: bool = False,
                 sockets: Optional[Callable[[Any], tuple[Any, Any]]] = None):
        self.tokenizer = tokenizer
        self.incremental_streaming = incremental_streaming  # native streams: deltas, not cumulative
        self.enable_custom_logit_processor = enable_custom_logit_processor
        self.enable_return_hidden_states = enable_return_hidden_states
        self.limits = limits  # the server's per-request caps (None: none, the offline Engine)
        self._sockets = sockets  # ctx -> (sender, receiver) in place of one PUSH/PULL pair (data parallel)
        self.grammar_checker = grammar_checker  # kvyard.grammar.manager.GrammarChecker
        self.info = scheduler_info
        self.context_length = scheduler_info["context_length"]
        self.vocab_size = scheduler_info["vocab_size"]
        self.allow_auto_truncate = allow_auto_truncate
        self.model_name = model_name
        self.on_finish = on_finish
        self.log_requests = log_requests
        self._send_addr, self._recv_addr = send_addr, recv_addr
        self._is_alive = is_alive
        self._states: dict[str, ReqState] = {}
        self._controls: dict[int, asyncio.Future] = {}
        self._control_ids = itertools.count(1)
        self._rng = random.Random(random_seed)
        # LoRA serving (kvyard.lora): the loaded adapters {name: description}; None when off
        adapters = scheduler_info.get("lora_adapters")
        self.lora_adapters: Optional[dict[str, dict]] = None if adapters is None else {a["name"]: a for a in adapters}
        self._lora_unloading: set[str] = set()
        self._started = False
        self.dead: Optional[str] = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Binds the sockets to the running loop; call from inside it."""
        if self._started:
            return
        self._ctx = zmq.asyncio.Context()
        if self._sockets is not None:
            self._send, self._recv = self._sockets(self._ctx)
        else:
            self._send = self._ctx.socket(zmq.PUSH)
            self._send.bind(self._send_addr)
            self._recv = self._ctx.socket(zmq.PULL)
            self._recv.bind(self._recv_addr)
        self._tasks = [asyncio.ensure_future(self._receive_loop()), asyncio.ensure_future(self._watchdog())]
        self._started = True

    async def close(self) -> None:
        for t in getattr(self, "_tasks", []):
            t.cancel()
        if self._started:
            try:
                self._send.send_pyobj("shutdown", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._send.close(linger=100)
            self._recv.close(linger=0)
            self._ctx.term()
            self._started = False

    async def _receive_loop(self) -> None:
        while True:
            msg = await self._recv.recv_pyobj()
            if isinstance(msg, BatchTokenOut):
                for update in msg.updates:
                    self._on_update(update)
            elif isinstance(msg, ControlReply):
                fut = self._controls.pop(msg.id, None)
                if fut and not fut.done():
                    fut.set_result(msg)
            elif isinstance(msg, SchedulerError):
                self._fail_all(msg.message)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if not self._is_alive():
                self._fail_all("the scheduler process exited")
                return

    def _fail_all(self, message: str) -> None:
        self.dead = message
        logger.error("engine failed: %s", message)
        for state in list(self._states.values()):
            state.queue.put_nowait(EngineDeadError(message))
        for fut in self._controls.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(message))

    # -- requests ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                 return_dict=False, **kwargs)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    def prepare(self, obj: dict, embed: bool = False) -> PreparedReqs:
        """Validates and tokenizes one request dict (single or batch, n expanded).

        Raises RequestError naming the field. Order of the result: prompt-major, then sample."""
        if self.info.get("is_embedding") and not embed:
            raise RequestError("the served model is an embedding model: it does not generate text; "
                               "use encode or /v1/embeddings", param="model")
        if not embed:
            check_fields(obj, REQUEST_FIELDS, GENERATE_FIELDS)  # SGLang's other fields: ignored when off, else refused
            obj = drop_ignored(obj, REQUEST_FIELDS)
        check_request_size(obj, self.limits)  # before tokenizing: counts only
        prompts = self._prompts(obj)
        params_list = obj.get("sampling_params") or {}
        if isinstance(params_list, dict):
            params_list = [params_list] * len(prompts)
        if len(params_list) != len(prompts):
            raise RequestError("sampling_params: a list must have one entry per prompt", param="sampling_params")
        rids = obj.get("rid")
        if rids is None:
            rids = [uuid.uuid4().hex for _ in prompts]
        elif isinstance(rids, str):
            rids = [rids] if len(prompts) == 1 else [f"{rids}-{i}" for i in range(len(prompts))]
        if not isinstance(rids, list) or len(rids) != len(prompts) or not all(isinstance(r, str) for r in rids):
            raise RequestError(f"rid: give one string, or a list of {len(prompts)} strings (one per prompt)",
                               param="rid")
        out = []
        processor = obj.get("custom_logit_processor")
        hidden = self._wants_hidden_states(obj)
        loras = self._lora_names(obj.get("lora_path"), len(prompts))
        for ids, p, rid, lora in zip(prompts, params_list, rids, loras):
            params = self._sampling_params(p, len(ids), processor)
            ids = self._fit_context(ids, params)
            for i in range(params.n):
                seed = (params.seed + i) if params.seed is not None else self._rng.getrandbits(62)
                out.append(TokenizedGenerateReq(
                    rid=rid if params.n == 1 else f"{rid}-{i}", input_ids=ids, sampling_params=params,
                    return_logprob=bool(obj.get("return_logprob", False)),
                    top_logprobs_num=int(obj.get("top_logprobs_num") or 0),
                    logprob_start_len=int(obj.get("logprob_start_len", -1)),
                    stream=bool(obj.get("stream", False)), priority=int(obj.get("priority") or 0),
                    sampling_seed=seed, return_hidden_states=hidden, lora_name=lora))
        return PreparedReqs(out, batch=len(out) > 1 or _is_batch(obj))

    def _wants_hidden_states(self, obj: dict) -> bool:
        value = obj.get("return_hidden_states", False)
        if not isinstance(value, bool):
            raise RequestError("return_hidden_states: must be true or false", param="return_hidden_states")
        if value and not self.enable_return_hidden_states:
            raise RequestError("return_hidden_states: the server does not return hidden states; start it "
                               "with --enable-return-hidden-states", param="return_hidden_states")
        return value

    def _lora_names(self, value: Any, n: int) -> list[Optional[str]]:
        """``lora_path``: one adapter name (or null) for every prompt, or a list of one per prompt."""
        names = value if isinstance(value, list) else [value] * n
        if len(names) != n or not all(v is None or isinstance(v, str) for v in names):
            raise RequestError(f"lora_path: give one adapter name, or a list of {n} names or nulls (one per prompt)",
                               param="lora_path")
        for name in names:
            if name is not None:
                self.check_lora(name, "lora_path")
        return names

    def check_lora(self, name: str, param: str) -> None:
        """RequestError unless adapter ``name`` is loaded and not being unloaded (404 when unknown)."""
        if self.lora_adapters is None:
            raise RequestError(f"{param}: LoRA serving is off (start the server with --enable-lora)", param=param)
        if name not in self.lora_adapters or name in self._lora_unloading:
            known = ", ".join(n for n in self.lora_adapters if n not in self._lora_unloading) or "none"
            raise RequestError(f"{param}: unknown LoRA adapter {name!r} (loaded: {known})", param=param, status=404)

    async def load_lora_adapter(self, name: str, path: str) -> dict:
        """Loads a PEFT adapter folder under ``name``; RequestError with the scheduler's one-line reason."""
        if self.lora_adapters is None:
            raise RequestError("lora_name: LoRA serving is off (start the server with --enable-lora)", param="lora_name")
        if not isinstance(name, str) or not name or ":" in name:
            raise RequestError(f"lora_name: {name!r} must be a non-empty string without ':'", param="lora_name")
        if not isinstance(path, str) or not path:
            raise RequestError("lora_path: the adapter folder is required", param="lora_path")
        reply = await self.control("load_lora", name=name, path=path)
        if not reply.ok:
            raise RequestError(reply.message, param="lora_path" if "lora_name" not in reply.message else "lora_name")
        self._set_adapters(reply.result["adapters"])
        return self.lora_adapters

    async def unload_lora_adapter(self, name: str, timeout: float = 600.0) -> dict:
        """Unloads adapter ``name``. New requests for it are refused at once; the unload waits
        for the requests that already use it to finish (at most ``timeout`` seconds)."""
        self.check_lora(name, "lora_name")
        self._lora_unloading.add(name)
        try:
            deadline = time.monotonic() + timeout
            while True:
                reply = await self.control("unload_lora", name=name)
                if reply.ok:
                    break
                if "is used by" not in reply.message or time.monotonic() > deadline:
                    raise RequestError(reply.message, param="lora_name")
                await asyncio.sleep(LORA_UNLOAD_POLL_S)
        finally:
            self._lora_unloading.discard(name)
        self._set_adapters(reply.result["adapters"])
        return self.lora_adapters

    def _set_adapters(self, adapters: list[dict]) -> None:
        self.lora_adapters = {a["name"]: a for a in adapters}

    def prepare_embedding(self, obj: dict) -> PreparedReqs:
        """Like prepare, for embedding requests (text or input_ids, single or batch)."""
        if not self.info.get("is_embedding"):
            raise RequestError("the served model is not an embedding model (start it with an "
                               "embedding model or --is-embedding)", param="model")
        acted = {"text", "input_ids", "rid", "prompt"}
        check_fields({k: v for k, v in obj.items() if k != "sampling_params"}, acted, EMBEDDING_FIELDS)
        if _is_text_pairs(obj.get("text")):
            return self.prepare_pairs(obj["text"], obj.get("rid"))
        reqs = self.prepare(drop_ignored(obj, acted) | {"sampling_params": {"max_new_tokens": 0}}, embed=True)
        for r in reqs:
            r.embed = True
        return reqs

    def prepare_pairs(self, pairs: list, rid: Any = None) -> list[TokenizedGenerateReq]:
        """Cross-encoder inputs: each [a, b] tokenized as one pair sequence, as the model's
        tokenizer pairs them (special tokens, and token_type_ids where it returns them)."""
        if self.tokenizer is None:
            raise RequestError("text: text pairs need the tokenizer, which this server skipped "
                               "(--skip-tokenizer-init)", param="text")
        encodings = [self.tokenizer(a, b, add_special_tokens=True) for a, b in pairs]
        reqs = self.prepare_embedding({"input_ids": [list(e["input_ids"]) for e in encodings],
                                       **({"rid": rid} if rid is not None else {})})
        for req, enc in zip(reqs, encodings):
            types = enc.get("token_type_ids")
            req.token_type_ids = list(types)[:len(req.input_ids)] if types is not None else None
        return reqs

    def _prompts(self, obj: dict) -> list[list[int]]:
        text = obj.get("text", obj.get("prompt"))
        ids = obj.get("input_ids")
        if (text is None) == (ids is None):
            raise RequestError("exactly one of text or input_ids is required", param="text")
        if ids is not None:
            batch = ids if ids and isinstance(ids[0], list) else [ids]
            for row in batch:
                if not row or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in row):
                    raise RequestError(f"input_ids: token ids must be a non-empty list of ints in [0, {self.vocab_size})",
                                       param="input_ids")
            return [list(r) for r in batch]
        batch = [text] if isinstance(text, str) else text
        if not isinstance(batch, list) or not batch or not all(isinstance(t, str) for t in batch):
            raise RequestError("text: must be a string or a non-empty list of strings", param="text")
        if any(t == "" for t in batch):
            raise RequestError("text: the prompt is empty", param="text")
        return [self.tokenize(t) for t in batch]

    def _sampling_params(self, raw: Any, prompt_len: int, processor: Any = None) -> SamplingParams:
        if isinstance(raw, SamplingParams):
            params = raw
        elif isinstance(raw, dict):
            try:
                params = SamplingParams.from_dict(raw)
            except (ValueError, TypeError) as exc:
                raise RequestError(str(exc), param="sampling_params") from None
        else:
            raise RequestError("sampling_params: must be an object", param="sampling_params")
        try:
            params.verify(self.vocab_size)
            params.normalize(self.tokenizer)
        except ValueError as exc:
            raise RequestError(str(exc), param=_field_of(str(exc))) from None
        if self.grammar_checker is not None:
            self.grammar_checker.check(params)  # a bad grammar is a 400 here, never a scheduler error
        if processor is not None:
            params.custom_logit_processor = processor
        if params.custom_logit_processor is not None:
            check_logit_processor(params.custom_logit_processor, self.enable_custom_logit_processor)
        return params

    def _fit_context(self, ids: list[int], params: SamplingParams) -> list[int]:
        if len(ids) >= self.context_length:
            if not self.allow_auto_truncate:
                raise RequestError(
                    f"the prompt has {len(ids)} tokens, more than the context length "
                    f"{self.context_length} allows; shorten it or start with --allow-auto-truncate",
                    param="input_ids", status=413)
            ids = ids[:self.context_length - 1]
        room = self.context_length - len(ids)
        as_much_as_fits = params.max_new_tokens is None or params.max_new_tokens >= room
        if as_much_as_fits:
            params.max_new_tokens = room
        self._check_kv_pool(ids, params, as_much_as_fits)
        return ids

    def _check_kv_pool(self, ids: list[int], params: SamplingParams, as_much_as_fits: bool) -> None:
        """A sequence that can never fit the KV pool is refused now, not after it ran out of room.
        A max_new_tokens that only asked for "as much as fits" is capped to the pool instead."""
        pool = self.info.get("max_total_num_tokens")
        if pool is None:
            return
        if len(ids) + 1 > pool:
            raise RequestError(f"input_ids: the prompt has {len(ids)} tokens; the KV pool holds {pool} "
                               "(--max-total-tokens)", param="input_ids")
        if len(ids) + params.max_new_tokens > pool:
            if as_much_as_fits:
                params.max_new_tokens = pool - len(ids)
                return
            raise RequestError(f"max_new_tokens: the prompt ({len(ids)} tokens) plus max_new_tokens "
                               f"({params.max_new_tokens}) exceeds the KV pool of {pool} tokens "
                               "(--max-total-tokens)", param="max_new_tokens")

    # -- running ----------------------------------------------------------------------------
    def submit(self, req: TokenizedGenerateReq, return_text_in_logprobs: bool = False) -> ReqState:
        if self.dead:
            raise EngineDeadError(self.dead)
        if req.rid in self._states:
            raise RequestError(f"rid: a request with id {req.rid!r} is already running", param="rid")
        p = req.sampling_params
        detok = Detokenizer(self.tokenizer, DecodeState(p.skip_special_tokens, p.spaces_between_special_tokens,
                                                        tuple(p.stop or ()), p.no_stop_trim)) \
            if self.tokenizer is not None and not req.embed else None
        state = ReqState(rid=req.rid, prompt_ids=req.input_ids, params=p, stream=req.stream,
                         return_logprob=req.return_logprob, return_text_in_logprobs=return_text_in_logprobs,
                         detok=detok, return_hidden_states=req.return_hidden_states,
                         lora_name=req.lora_name)
        self._states[req.rid] = state
        self._send.send_pyobj(req)
        return state

    async def stream_outputs(self, state: ReqState) -> AsyncIterator[dict]:
        """Yields output dicts as updates arrive (cumulative text and ids); the last is final.

        Cancelling the consumer (client disconnect) aborts the request in the scheduler."""
        try:
            while True:
                item = await state.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield self.output_of(state)
                if state.finish_reason is not None:
                    return
        finally:
            if state.finish_reason is None and self._states.pop(state.rid, None) is not None:
                self.abort(state.rid)

    async def final_output(self, state: ReqState) -> dict:
        out = None
        async for out in self.stream_outputs(state):
            pass
        return out

    def abort_state(self, state: ReqState) -> None:
        """Aborts the request unless it has finished; idempotent. For callers that stop
        consuming its outputs (a closed HTTP stream, a disconnected client)."""
        if state.finish_reason is None and self._states.pop(state.rid, None) is not None:
            self.abort(state.rid)

    def abort(self, rid: str) -> None:
        if self._started:
            self._send.send_pyobj(AbortReq(rid))

    def _on_update(self, update: ReqUpdate) -> None:
        state = self._states.get(update.rid)
        if state is None:
            return  # aborted by the client already
        now = time.monotonic()
        if state.first_token is None and update.new_token_ids:
            state.first_token = now
        state.output_ids += update.new_token_ids
        for key in state.logprobs:
            state.logprobs[key] += getattr(update, key)
        state.meta = {"prompt_tokens": update.prompt_tokens, "completion_tokens": update.completion_tokens,
                      "cached_tokens": update.cached_tokens}
        if update.spec_verify_ct:   # speculative decoding ran for this request
            state.meta.update(spec_verify_ct=update.spec_verify_ct, spec_accepted_tokens=update.spec_accepted_tokens)
        state.embedding = update.embedding
        state.hidden_states += update.hidden_states
        if update.finished_reason is not None:
            state.finish_reason = update.finished_reason
        if state.detok is not None:
            state.detok.update(state.output_ids, state.finish_reason)  # the one decode of this update
        if state.finish_reason is not None:
            state.meta["e2e_latency"] = now - state.created
            self._states.pop(update.rid, None)
            if self.on_finish:
                self.on_finish(state)
            if self.log_requests:
                logger.info("request %s finished %s: %d prompt + %d output tokens, output %r", state.rid,
                            state.finish_reason, len(state.prompt_ids), len(state.output_ids),
                            self.output_of(state).get("text", ""))
        state.queue.put_nowait(update)

    def output_of(self, state: ReqState) -> dict:
        return outputs.output_of(self, state)

    def logprob_meta(self, state: ReqState) -> dict:
        def fmt(pairs):
            return [(lp, tid, self._token_text(tid, state)) for lp, tid in pairs]
        lp = state.logprobs
        return {"output_token_logprobs": fmt(lp["output_token_logprobs"]),
                "output_top_logprobs": [fmt(t) for t in lp["output_top_logprobs"]],
                "input_token_logprobs": fmt(lp["input_token_logprobs"]),
                "input_top_logprobs": [fmt(t) for t in lp["input_top_logprobs"]]}

    def _token_text(self, tid: int, state: ReqState) -> Optional[str]:
        return self.tokenizer.decode([tid]) if state.return_text_in_logprobs and self.tokenizer else None

    async def control(self, op: str, timeout: float = 600.0, **args: Any) -> ControlReply:
        if self.dead:
            raise EngineDeadError(self.dead)
        cid = next(self._control_ids)
        fut = asyncio.get_running_loop().create_future()
        self._controls[cid] = fut
        self._send.send_pyobj(ControlReq(cid, op, args))
        return await asyncio.wait_for(fut, timeout)

    def num_running(self) -> int:
        return len(self._states)


def _is_batch(obj: dict) -> bool:
    """A list of prompts (texts or id lists) is a batch, even of one."""
    text, ids = obj.get("text", obj.get("prompt")), obj.get("input_ids")
    return isinstance(text, list) or (isinstance(ids, list) and bool(ids) and isinstance(ids[0], list))


def _field_of(message: str) -> Optional[str]:
    """The field a SamplingParams error names (its first word)."""
    first = message.split(" ", 1)[0].strip(":'\"")
    return first if first.isidentifier() else None


def _is_text_pairs(text: Any) -> bool:
    """A non-empty list of [str, str] (cross-encoder input); a malformed pair is a RequestError."""
    if not isinstance(text, list) or not text or not all(isinstance(t, (list, tuple)) for t in text):
        return False
    for pair in text:
        if len(pair) != 2 or not all(isinstance(x, str) and x for x in pair):
            raise RequestError("text: a pair must be two non-empty strings [query, document]", param="text")
    return True
