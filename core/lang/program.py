"""@function programs: binding arguments, run, run_batch and the prefix hint.

``run`` calls the program body on a fresh ProgramState in the calling thread (the state's own
worker does the generation). ``run_batch`` runs many bodies on a thread pool; before that it
traces the program once with placeholder arguments and sends the constant text every program
starts with (``cache_prefix``), so the batch hits the radix cache instead of computing the
shared prefix once per program.
"""
from __future__ import annotations

import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Union

from kvyard.lang import global_config
from kvyard.lang.backend.base import Backend
from kvyard.lang.errors import LangError, NotSupportedError
from kvyard.lang.interpreter import ProgramState, StreamExecutor
from kvyard.lang.sampling import DEFAULT_RUN_PARAMS, SamplingParams
from kvyard.lang.tracing import trace_prefix

MAX_AUTO_THREADS = 128


class SglFunction:
    def __init__(self, func: Callable, num_api_spec_tokens: Optional[int] = None):
        if num_api_spec_tokens is not None:
            raise NotSupportedError("function: num_api_spec_tokens (API speculative execution) is not supported")
        params = list(inspect.signature(func).parameters.values())
        if not params:
            raise LangError(f"function: {func.__name__} must take the state as its first parameter")
        self.func = func
        self.arg_names = [p.name for p in params[1:]]
        self.__name__ = func.__name__
        self.__doc__ = func.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        """Calling a program inside another one runs it on that program's state."""
        if args and isinstance(args[0], ProgramState):
            return self.func(*args, **kwargs)
        return self.run(*args, **kwargs)

    def bind(self, args: tuple, kwargs: dict) -> dict:
        try:
            bound = inspect.signature(self.func).bind(None, *args, **kwargs)
        except TypeError as exc:
            raise LangError(f"{self.__name__}: {exc}") from None
        return dict(list(bound.arguments.items())[1:])

    # -- running ---------------------------------------------------------------------------
    def run(self, *args: Any, max_new_tokens: Optional[int] = None, stop=None, stop_token_ids=None,
            temperature: Optional[float] = None, top_p: Optional[float] = None, top_k: Optional[int] = None,
            min_p: Optional[float] = None, frequency_penalty: Optional[float] = None,
            presence_penalty: Optional[float] = None, ignore_eos: Optional[bool] = None,
            return_logprob: Optional[bool] = None, logprob_start_len: Optional[int] = None,
            top_logprobs_num: Optional[int] = None, return_text_in_logprobs: Optional[bool] = None,
            stream: bool = False, backend: Optional[Backend] = None, **kwargs: Any) -> ProgramState:
        """Runs the program once. Without stream it returns when the program has finished (and
        raises its error); with stream=True it returns at once: read ``state.text_iter()``."""
        defaults = SamplingParams(
            max_new_tokens=max_new_tokens, stop=stop, stop_token_ids=stop_token_ids, temperature=temperature,
            top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs).over(DEFAULT_RUN_PARAMS)
        arguments = self.bind(args, kwargs)
        return run_program(self, _backend(backend), arguments, defaults, stream)

    def run_batch(self, batch_kwargs: list[dict], *, backend: Optional[Backend] = None,
                  num_threads: Union[str, int] = "auto", progress_bar: bool = False,
                  **run_kwargs: Any) -> list[ProgramState]:
        """Runs the program once per dict of arguments; the states come back in input order.
        A program that failed has its error in ``state.error()`` (raised again on access)."""
        if not isinstance(batch_kwargs, list) or not all(isinstance(a, dict) for a in batch_kwargs):
            raise LangError("run_batch: batch_kwargs must be a list of dicts of arguments")
        if "stream" in run_kwargs:
            raise LangError("run_batch: stream is not supported; use run(stream=True) per program")
        backend = _backend(backend)
        for a in batch_kwargs:
            self.bind((), a)  # a missing or unknown argument fails before anything runs
        if len(batch_kwargs) > 1:
            prefix = trace_prefix(self, backend)
            if prefix:
                backend.cache_prefix(prefix)
        threads = _num_threads(num_threads, len(batch_kwargs))

        def one(args: dict) -> ProgramState:
            try:
                return self.run(backend=backend, **run_kwargs, **args)
            except Exception as exc:  # noqa: BLE001 — kept in the state, as SGLang does
                return _failed_state(backend, exc)

        bar = _progress(len(batch_kwargs)) if progress_bar else None
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(one, a) for a in batch_kwargs]
            states = []
            for f in futures:
                states.append(f.result())
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return states


def run_program(program: SglFunction, backend: Backend, arguments: dict, defaults: SamplingParams,
                stream: bool) -> ProgramState:
    state = ProgramState(StreamExecutor(backend, defaults, stream))
    try:
        state.ret_value = program.func(state, **arguments)
    finally:
        state.stream_executor.end()
    if not stream:
        state.sync()
    return state


def _failed_state(backend: Backend, exc: BaseException) -> ProgramState:
    executor = StreamExecutor(backend, DEFAULT_RUN_PARAMS)
    executor.error = exc
    executor.end()
    return ProgramState(executor)


def _backend(backend: Optional[Backend]) -> Backend:
    backend = backend or global_config.default_backend
    if backend is None:
        raise LangError("backend: none given; call kvyard.lang.set_default_backend(...) or pass backend=")
    if not isinstance(backend, Backend):
        raise LangError(f"backend: expected a kvyard.lang backend, got {type(backend).__name__}")
    return backend


def _num_threads(num_threads: Union[str, int], n: int) -> int:
    if num_threads == "auto":
        return max(1, min(n, MAX_AUTO_THREADS, 16 * (os.cpu_count() or 1)))
    if not isinstance(num_threads, int) or num_threads < 1:
        raise LangError(f"num_threads: must be 'auto' or an int >= 1, got {num_threads!r}")
    return num_threads


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="run_batch")


def function(func: Optional[Callable] = None, *, num_api_spec_tokens: Optional[int] = None):
    """Decorator: ``@function`` or ``@function(num_api_spec_tokens=...)`` (the latter refused)."""
    if func is None:
        return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)
    return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
