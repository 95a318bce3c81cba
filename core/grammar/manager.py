"""Structured output inside the engine: the API-side GrammarChecker and the scheduler's GrammarManager.

GrammarChecker (API process) turns every grammar problem into a RequestError before the request
is queued: grammars disabled, a kind the chosen backend lacks (naming the backends that have it),
or a spec the compiler rejects (its message). It only validates, which needs no tokenizer.

GrammarManager (scheduler process) owns the per-(backend, kind, spec) compile cache (LRU) and the
compile worker threads, so compiling never blocks a step: a request whose grammar is still
compiling stays in the waiting queue while others run. Per step it builds one packed bitmask for
the batch's sample rows (rows of unconstrained requests allow everything), unpacks it on the
device into ``SamplingBatchInfo.vocab_mask``, and after sampling advances each matcher.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

from kvyard.errors import RequestError
from kvyard.grammar import (CompiledGrammar, GrammarBackend, GrammarConfig, GrammarError, GrammarMatcher,
                            allocate_bitmask, bitmask_to_bool, grammar_spec)
from kvyard.plugins import PluginError, registry
from kvyard.scheduler.req import FinishReason

logger = logging.getLogger(__name__)

DISABLED = "none"
KIND = "grammar_backends"


def load_backend(name: str, config: GrammarConfig) -> GrammarBackend:
    """The named plugin's backend; PluginError (listing the valid names) when unknown/broken."""
    return registry(KIND).get(name)(config)


def backends_supporting(kind: str, exclude: str = "") -> list[str]:
    """Registered backends that declare ``kind``; broken plugins are skipped."""
    names = []
    for name in registry(KIND).names():
        if name == exclude:
            continue
        try:
            if kind in registry(KIND).get(name).supports:
                names.append(name)
        except PluginError:
            continue
    return names


class _LRU:
    """A bounded dict; the least recently used entry goes first when full."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()

    def get(self, key, default=None):
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key, value) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items


# -- API process -----------------------------------------------------------------------------
class GrammarChecker:
    """Checks run on the API process's preprocessing threads: the cache is guarded by a lock.
    ``load_error`` is set (and logged at start-up by ``probe``) when the backend cannot load; a
    grammar request is then a 501 that says how to install it."""

    def __init__(self, backend_name: Optional[str], vocab_size: int, whitespace_pattern: Optional[str] = None,
                 disabled_reason: str = "structured output is disabled (--grammar-backend none)",
                 cache_size: int = 1024):
        self.backend_name = None if backend_name in (None, DISABLED) else backend_name
        self.disabled_reason = disabled_reason
        self._config = GrammarConfig(vocab_size=vocab_size, whitespace_pattern=whitespace_pattern)
        self._backend: Optional[GrammarBackend] = None
        self._checked = _LRU(cache_size)   # (kind, spec) -> error message or None
        self._lock = threading.Lock()
        self.load_error: Optional[str] = None

    def probe(self) -> Optional[str]:
        """Loads the backend now; the one-line problem (also logged) when it cannot load."""
        if self.backend_name is None:
            return None
        try:
            backend = self._get_backend()
            kind = next((k for k in SMOKE_SPECS if k in backend.supports), None)
            if kind is not None:   # backends import their library lazily: make them do it now
                _validation_error(backend, kind, SMOKE_SPECS[kind])
        except (PluginError, ImportError) as exc:
            self._backend = None
            self.load_error = f"the {self.backend_name} grammar backend cannot load ({_root_cause(exc)})"
            hint = install_hint(exc)
            self.load_error += f"; install it: {hint}" if hint else ""
            logger.error("%s; structured-output requests will be refused (501)", self.load_error)
        return self.load_error

    def check(self, params: Any) -> None:
        """RequestError (status 400, param = the grammar field) unless the grammar can compile."""
        found = grammar_spec(params)
        if found is None:
            return
        kind, spec = found
        if self.backend_name is None:
            raise RequestError(f"{kind}: {self.disabled_reason}", param=kind)
        if self.load_error is None and self._backend is None:
            self.probe()
        if self.load_error is not None:
            raise RequestError(f"{kind}: {self.load_error}", param=kind, status=501)
        backend = self._backend
        if kind not in backend.supports:
            raise RequestError(unsupported_message(self.backend_name, kind), param=kind)
        with self._lock:
            error = self._checked.get((kind, spec), default=False)
        if error is False:
            error = _validation_error(backend, kind, spec)
            with self._lock:
                self._checked.put((kind, spec), error)
        if error is not None:
            raise RequestError(error, param=kind)

    def _get_backend(self) -> GrammarBackend:
        if self._backend is None:
            self._backend = load_backend(self.backend_name, self._config)
        return self._backend


# the smallest spec of each kind, compiled once at start-up to prove the backend works
SMOKE_SPECS = {"json_schema": '{"type": "object"}', "regex": "a", "ebnf": 'root ::= "a"'}


def _root_cause(exc: BaseException) -> BaseException:
    return exc.__cause__ if isinstance(exc, PluginError) and exc.__cause__ is not None else exc


def install_hint(exc: BaseException) -> Optional[str]:
    """"pip install X" for a plugin that failed on a missing module X, else None."""
    cause = _root_cause(exc)
    if isinstance(cause, ModuleNotFoundError) and cause.name:
        return f"pip install {cause.name.split('.')[0]}"
    return None


def unsupported_message(backend_name: str, kind: str) -> str:
    others = backends_supporting(kind, exclude=backend_name)
    where = (f"backends that do: {', '.join(others)} (choose one with --grammar-backend)" if others
             else "no installed grammar backend does")
    return f"{kind}: the {backend_name} grammar backend does not support {kind}; {where}"


def _validation_error(backend: GrammarBackend, kind: str, spec: str) -> Optional[str]:
    try:
        backend.validate(kind, spec)
    except GrammarError as exc:
        return _with_field(kind, str(exc))
    return None


def _with_field(kind: str, message: str) -> str:
    return message if message.startswith(f"{kind}:") else f"{kind}: {message}"


# -- scheduler process -----------------------------------------------------------------------
@dataclass
class ReqGrammar:
    """A request's grammar: its compile (shared through the cache) and its own matcher."""
    kind: str
    spec: str
    compiled: "cf.Future[CompiledGrammar]"
    matcher: Optional[GrammarMatcher] = None


class GrammarManager:
    def __init__(self, backend_name: str, config: GrammarConfig, cache_size: int = 256):
        self.backend_name = backend_name
        self.config = config
        self._backend: Optional[GrammarBackend] = None
        self._backend_lock = threading.Lock()
        self._cache = _LRU(cache_size)     # (kind, spec) -> Future[CompiledGrammar], failures too
        self._pool = cf.ThreadPoolExecutor(max_workers=config.compile_threads,
                                           thread_name_prefix="kvyard-grammar")
        self._pending: set[cf.Future] = set()
        # tensor parallelism: every rank must see a grammar ready at the same step, so activate
        # waits for the compile instead of letting the request keep its place
        self.lockstep = False

    # -- compiling ----------------------------------------------------------------------------
    def start(self, req: Any) -> None:
        """Sets ``req.grammar`` and starts (or reuses) the compile of its spec."""
        found = grammar_spec(req.sampling_params)
        if found is None:
            return
        kind, spec = found
        future = self._cache.get((kind, spec))
        if future is None:
            future = self._pool.submit(self._compile, kind, spec)
            self._cache.put((kind, spec), future)
            self._pending.add(future)
        req.grammar = ReqGrammar(kind, spec, future)

    def _compile(self, kind: str, spec: str) -> CompiledGrammar:
        backend = self._get_backend()
        if kind not in backend.supports:
            raise GrammarError(unsupported_message(self.backend_name, kind))
        return backend.compile(kind, spec)

    def _get_backend(self) -> GrammarBackend:
        with self._backend_lock:
            if self._backend is None:
                try:
                    self._backend = load_backend(self.backend_name, self.config)
                except PluginError as exc:
                    raise GrammarError(str(exc)) from None
            return self._backend

    def activate(self, req: Any) -> bool:
        """True when the request may run: no grammar, or its matcher exists (created here once
        the compile is done). False while compiling. GrammarError when the compile failed."""
        g = req.grammar
        if g is None or g.matcher is not None:
            return True
        if not g.compiled.done():
            if not self.lockstep:
                return False
            cf.wait([g.compiled])
        error = g.compiled.exception()
        if error is not None:
            message = str(error) if isinstance(error, GrammarError) else f"{type(error).__name__}: {error}"
            raise GrammarError(_with_field(g.kind, message))
        g.matcher = g.compiled.result().new_matcher()
        return True

    def wait_for_compile(self, timeout: float) -> None:
        """Blocks until a compile finishes or ``timeout`` seconds pass; the scheduler calls it
        when it has nothing to run but requests waiting for their grammar."""
        self._pending = {f for f in self._pending if not f.done()}
        if self._pending:
            cf.wait(self._pending, timeout=timeout, return_when=cf.FIRST_COMPLETED)

    # -- per step -------------------------------------------------------------------------------
    def apply_masks(self, batch: Any) -> None:
        """Sets ``batch.sampling_info.vocab_mask`` ([S, V] bool on the device) for the S sample
        rows, or None when no sample row is constrained."""
        info = batch.sampling_info
        if info is None:
            return
        reqs = [batch.reqs[i] for i in batch.sample_req_idx]
        rows = [k for k, r in enumerate(reqs) if _live_matcher(r) is not None]
        if not rows:
            info.vocab_mask = None
            return
        bitmask = allocate_bitmask(len(reqs), self.config.vocab_size)
        self._get_backend().fill_bitmasks([reqs[k].grammar.matcher for k in rows], bitmask, rows)
        info.vocab_mask = bitmask_to_bool(bitmask.to(info.device, non_blocking=True), info.vocab_size)

    def after_token(self, req: Any, token_id: int, reason: Optional[FinishReason]) -> Optional[FinishReason]:
        """Advances the request's matcher by its new token; returns the finish reason to keep:
        "stop" once the grammar terminated, "abort" if the token broke the grammar (only when
        another setting, e.g. min_new_tokens, left no allowed token), else ``reason``."""
        matcher = _live_matcher(req)
        if matcher is None:
            return reason
        if not matcher.accept_token(token_id):
            return FinishReason("abort", message=f"{req.grammar.kind}: token {token_id} is not allowed by "
                                                 "the grammar here (another sampling setting excluded every "
                                                 "allowed token)")
        if reason is None and matcher.is_terminated():
            return FinishReason("stop", matched=token_id)
        return reason

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _live_matcher(req: Any) -> Optional[GrammarMatcher]:
    g = req.grammar
    if g is None or g.matcher is None or g.matcher.is_terminated():
        return None
    return g.matcher


# -- wiring helpers --------------------------------------------------------------------------
def make_grammar_manager(backend_name: Optional[str], vocab_size: int, eos_token_ids, tokenizer_factory,
                         whitespace_pattern: Optional[str] = None) -> Optional[GrammarManager]:
    """None when grammars are off (--grammar-backend none) or there is no tokenizer."""
    if backend_name in (None, DISABLED) or tokenizer_factory is None:
        return None
    config = GrammarConfig(vocab_size=vocab_size, eos_token_ids=tuple(eos_token_ids),
                           tokenizer_factory=tokenizer_factory, whitespace_pattern=whitespace_pattern)
    return GrammarManager(backend_name, config)


def make_grammar_checker(backend_name: Optional[str], vocab_size: int, whitespace_pattern: Optional[str],
                         has_tokenizer: bool) -> GrammarChecker:
    if not has_tokenizer:
        return GrammarChecker(None, vocab_size, disabled_reason="structured output needs the tokenizer "
                                                                "(the server runs with --skip-tokenizer-init)")
    checker = GrammarChecker(backend_name, vocab_size, whitespace_pattern)
    checker.probe()  # a backend that cannot load is reported at start-up, not at the first request
    return checker


def load_once(factory: Optional[Callable[[], Any]]) -> Optional[Callable[[], Any]]:
    """Memoizes a (thread-safe) loader, so the stop checker and the grammar compiler of one
    process share one tokenizer instead of loading it twice."""
    if factory is None:
        return None
    lock, box = threading.Lock(), []

    def load() -> Any:
        with lock:
            if not box:
                box.append(factory())
            return box[0]
    return load
