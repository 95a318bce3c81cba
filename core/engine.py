"""kvyard.Engine: the offline, in-process API (SGLang's Engine shape).

    with kvyard.Engine(model_path="...") as e:
        e.generate("Hi", {"max_new_tokens": 8})["text"]

The engine runs its TokenizerManager on a private asyncio loop in a background thread; the
scheduler and the model live in their own process.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, AsyncIterator, Iterator, Optional, Union

from kvyard.compat.flags import engine_kwargs
from kvyard.frontend.launch import make_tokenizer_manager, start_engine_process
from kvyard.frontend.outputs import native_item, single_or_list, stream_chunks, strip_token_text
from kvyard.server_args import ServerArgs

Prompt = Union[str, list[str], None]


class Engine:
    def __init__(self, server_args: Optional[ServerArgs] = None, **kwargs: Any):
        # older SGLang's Engine(return_hidden_states=True): every request returns them
        self._request_defaults = {"return_hidden_states": True} if kwargs.pop("return_hidden_states", False) else {}
        if self._request_defaults:
            kwargs["enable_return_hidden_states"] = True
        args = server_args or ServerArgs(**engine_kwargs(kwargs, ServerArgs.__dataclass_fields__))
        import logging
        logging.basicConfig(level=args.log_level.upper(), format="[kvyard] %(levelname)s %(message)s")
        self.process = start_engine_process(args)
        self.server_args = self.process.args
        self.tokenizer = self.process.tokenizer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvyard-engine-loop", daemon=True)
        self._thread.start()
        self.tm = make_tokenizer_manager(self.process)
        self._call(self._start())
        self._closed = False

    @property
    def tokenizer_manager(self):
        """SGLang's path to the tokenizer (``engine.tokenizer_manager.tokenizer``)."""
        return self.tm

    async def _start(self) -> None:
        self.tm.start()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- generation -------------------------------------------------------------------------
    def _request(self, prompt: Prompt, sampling_params, input_ids, **kw: Any) -> dict:
        obj = {k: v for k, v in kw.items() if v is not None}
        if prompt is not None:
            obj["text"] = prompt
        if hasattr(input_ids, "keys") and "input_ids" in input_ids:
            input_ids = input_ids["input_ids"]   # transformers' apply_chat_template(tokenize=True) result
        if input_ids is not None:
            obj["input_ids"] = input_ids
        obj["sampling_params"] = sampling_params or {}
        return obj

    def generate(self, prompt: Prompt = None, sampling_params: Optional[dict | list] = None,
                 input_ids: Optional[list] = None, return_logprob: bool = False, top_logprobs_num: int = 0,
                 logprob_start_len: int = -1, return_text_in_logprobs: bool = False, stream: bool = False,
                 rid: Optional[str | list] = None, priority: Optional[int] = None, **extra: Any):
        """One prompt → one dict; a list of prompts (or n > 1) → a list; stream=True → an
        iterator of chunks {"text", "output_ids", "meta_info"} (plus "index" for a batch):
        cumulative, as SGLang streams, or only the new part with incremental_streaming_output.
        ``extra``: SGLang's other GenerateReqInput fields (ignored when off, else refused), e.g.
        ``lora_path="name"`` or one adapter name (or None) per prompt with enable_lora."""
        obj = self._request(prompt, sampling_params, input_ids, return_logprob=return_logprob,
                            top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len,
                            stream=stream, rid=rid, priority=priority, **{**self._request_defaults, **extra})
        if stream:
            return self._sync_stream(obj, return_text_in_logprobs)
        return self._call(self._generate(obj, return_text_in_logprobs))

    async def async_generate(self, prompt: Prompt = None, sampling_params: Optional[dict | list] = None,
                             input_ids: Optional[list] = None, return_logprob: bool = False,
                             top_logprobs_num: int = 0, logprob_start_len: int = -1,
                             return_text_in_logprobs: bool = False, stream: bool = False,
                             rid: Optional[str | list] = None, priority: Optional[int] = None, **extra: Any):
        """Awaitable twin of generate; with stream=True returns an async iterator of chunks."""
        obj = self._request(prompt, sampling_params, input_ids, return_logprob=return_logprob,
                            top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len,
                            stream=stream, rid=rid, priority=priority, **{**self._request_defaults, **extra})
        if stream:
            return self._async_stream(obj, return_text_in_logprobs)
        fut = asyncio.run_coroutine_threadsafe(self._generate(obj, return_text_in_logprobs), self._loop)
        return await asyncio.wrap_future(fut)

    async def _generate(self, obj: dict, text_in_logprobs: bool):
        reqs = self.tm.prepare(obj)
        states = [self.tm.submit(r, text_in_logprobs) for r in reqs]
        outs = await asyncio.gather(*(self.tm.final_output(s) for s in states))
        return single_or_list(outs, reqs.batch)

    async def _chunks(self, obj: dict, text_in_logprobs: bool) -> AsyncIterator[dict]:
        """The same chunks as /generate's stream (kvyard.frontend.outputs)."""
        reqs = self.tm.prepare(obj)
        async for c in stream_chunks(self.tm, reqs):
            item = native_item(c, self.tm.incremental_streaming, reqs.batch)
            yield item if text_in_logprobs else strip_token_text(item)

    def _sync_stream(self, obj: dict, text_in_logprobs: bool) -> Iterator[dict]:
        q: queue.Queue = queue.Queue()
        done = object()

        async def pump():
            try:
                async for chunk in self._chunks(obj, text_in_logprobs):
                    q.put(chunk)
            except BaseException as exc:  # hand errors to the consuming thread
                q.put(exc)
            finally:
                q.put(done)

        task = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := q.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()  # consumer stopped early: the request is aborted

    async def _async_stream(self, obj: dict, text_in_logprobs: bool) -> AsyncIterator[dict]:
        q: asyncio.Queue = asyncio.Queue()
        caller_loop = asyncio.get_running_loop()
        done = object()

        async def pump():
            try:
                async for chunk in self._chunks(obj, text_in_logprobs):
                    caller_loop.call_soon_threadsafe(q.put_nowait, chunk)
            except BaseException as exc:
                caller_loop.call_soon_threadsafe(q.put_nowait, exc)
            finally:
                caller_loop.call_soon_threadsafe(q.put_nowait, done)

        task = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := await q.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()

    def encode(self, prompt: Prompt = None, input_ids: Optional[list] = None, **extra: Any):
        """Embeddings of an embedding model: one prompt → {"embedding", "meta_info"}; a list → a list.
        ``extra``: SGLang's other EmbeddingReqInput fields (ignored when off, else refused)."""
        obj = self._request(prompt, None, input_ids, **extra)
        return self._call(self._encode(obj))

    async def _encode(self, obj: dict):
        reqs = self.tm.prepare_embedding(obj)
        states = [self.tm.submit(r) for r in reqs]
        outs = await asyncio.gather(*(self.tm.final_output(s) for s in states))
        return single_or_list(outs, reqs.batch)

    # -- control ----------------------------------------------------------------------------
    def flush_cache(self) -> bool:
        return self._call(self.tm.control("flush_cache")).ok

    def get_server_info(self) -> dict:
        reply = self._call(self.tm.control("get_info"))
        return {**self.server_args.to_dict(), **reply.result}

    def start_profile(self, output_dir: Optional[str] = None, num_steps: Optional[int] = None, **kw: Any) -> str:
        """torch.profiler on the scheduler's steps (see /start_profile); returns the output directory."""
        args = {k: v for k, v in {"output_dir": output_dir, "num_steps": num_steps, **kw}.items() if v is not None}
        reply = self._call(self.tm.control("start_profile", **args))
        if not reply.ok:
            raise ValueError(reply.message)
        return reply.result["output_dir"]

    def stop_profile(self) -> str:
        """Stops the profile and writes the trace; returns its path."""
        reply = self._call(self.tm.control("stop_profile"))
        if not reply.ok:
            raise ValueError(reply.message)
        return reply.result["trace"]

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> dict:
        """Loads a PEFT adapter folder as ``lora_name`` (needs enable_lora); returns the loaded
        adapters {name: path}. RequestError (a ValueError) with a one-line reason otherwise."""
        adapters = self._call(self.tm.load_lora_adapter(lora_name, lora_path))
        return {name: a["path"] for name, a in adapters.items()}

    def unload_lora_adapter(self, lora_name: str) -> dict:
        """Unloads an adapter once the requests already using it have finished (new ones are
        refused at once); returns the loaded adapters {name: path}."""
        adapters = self._call(self.tm.unload_lora_adapter(lora_name))
        return {name: a["path"] for name, a in adapters.items()}

    def check_kv_integrity(self) -> None:
        """Raises AssertionError unless every KV slot is free, cached or owned — exactly one."""
        reply = self._call(self.tm.control("check_integrity"))
        if not reply.ok:
            raise AssertionError(reply.message)

    def abort_request(self, rid: str = "") -> None:
        self._loop.call_soon_threadsafe(self.tm.abort, rid)

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._call(self.tm.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self.process.stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

