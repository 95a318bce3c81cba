"""Running a program: one StreamExecutor per state, the ProgramState users hold.

``s += expr`` only queues ``expr``; the state's worker thread runs its queue in order, so the
forks of a state (each its own executor) generate in parallel while the program goes on.
Reading a variable (``s["x"]``), ``text()`` or ``sync()`` waits for the queue. Invariants:
a variable name is assigned once per program (checked when the expression is queued, so the
error points at the offending line); an error in the worker is kept, later expressions are
skipped, and every waiter is woken and re-raises it — a failing program never hangs.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, AsyncIterator, Iterator, Optional

from kvyard.lang.backend.base import Backend, PromptView
from kvyard.lang.errors import LangError, NotSupportedError
from kvyard.lang.ir import CachePrefix, Expr, ExprList, Gen, Image, RoleBegin, RoleEnd, Select, Text, as_expr
from kvyard.lang.sampling import SamplingParams

_END = object()


class StreamExecutor:
    def __init__(self, backend: Backend, defaults: SamplingParams, stream: bool = False):
        self.backend = backend
        self.defaults = defaults
        self.stream = stream
        self.template = backend.get_chat_template()
        self.text = ""
        self.messages: list[dict] = []
        self.role: Optional[str] = None
        self.role_start = 0
        self.variables: dict[str, Any] = {}
        self.meta: dict[str, dict] = {}
        self.names: set[str] = set()  # every name queued, in this state or the one it forked from
        self.error: Optional[BaseException] = None
        self.children: list["StreamExecutor"] = []
        self._events: dict[str, threading.Event] = {}
        self._queue: queue.Queue = queue.Queue()
        self._stream_q: queue.Queue = queue.Queue()
        self._worker: Optional[threading.Thread] = None
        self._ended = False

    # -- queueing (the program's thread) ---------------------------------------------------
    def submit(self, expr: Expr) -> None:
        if self._ended:
            raise LangError("the program has ended: its state takes no more expressions")
        for item in expr.items if isinstance(expr, ExprList) else [expr]:
            if isinstance(item, (Gen, Select)):
                if item.name in self.names:
                    kind = "gen" if isinstance(item, Gen) else "select"
                    raise LangError(f"{kind}: the variable name {item.name!r} is used twice in one program")
                self.names.add(item.name)
                self._events[item.name] = threading.Event()
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="kvyard-lang-executor", daemon=True)
            self._worker.start()
        self._queue.put(expr)

    def sync(self) -> None:
        """Waits until every queued expression ran; raises the worker's error, if any."""
        if self._worker is not None:
            self._queue.join()
        self.raise_error()

    def end(self) -> None:
        """No more expressions; the worker (and those of forks) stop once their queues ran."""
        if not self._ended:
            self._ended = True
            self._queue.put(_END)
        for child in self.children:
            child.end()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def get_var(self, name: str) -> Any:
        if name not in self.variables:
            event = self._events.get(name)
            if event is None:
                raise LangError(f"no variable named {name!r} in this program state")
            if self._worker is not None:
                event.wait()
            self.raise_error()
        return self.variables[name]

    # -- running (the worker thread) -------------------------------------------------------
    def _run(self) -> None:
        while True:
            expr = self._queue.get()
            try:
                if expr is _END:
                    self._stream_q.put(_END)
                    return
                if self.error is None:
                    self._execute(expr)
            except BaseException as exc:  # kept for the program's thread, which re-raises it
                self.error = exc
                for event in self._events.values():
                    event.set()
            finally:
                self._queue.task_done()

    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, ExprList):
            for item in expr.items:
                self._execute(item)
        elif isinstance(expr, Text):
            self._append(expr.value)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        elif isinstance(expr, RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, Image):
            raise NotSupportedError(f"image: the model behind the {self.backend.name} backend has no vision "
                                    "support (kvyard serves no vision model yet)")
        elif isinstance(expr, CachePrefix):
            if self.text:
                self.backend.cache_prefix(self.text)
        else:
            raise LangError(f"cannot run a {type(expr).__name__}")

    def _append(self, text: str, var: Optional[str] = None) -> None:
        self.text += text
        if self.stream and text:
            self._stream_q.put((text, var))

    def view(self) -> PromptView:
        return PromptView(self.text, list(self.messages), self.role,
                          self.text[self.role_start:] if self.role else "")

    def _gen(self, gen: Gen) -> None:
        params = gen.params.over(self.defaults)
        if self.stream:
            text, meta = "", {}
            for delta, final in self.backend.generate_stream(self.view(), params):
                text += delta
                self._append(delta, gen.name)
                meta = final or meta
        else:
            text, meta = self.backend.generate(self.view(), params)
            self._append(text, gen.name)
        self._set_var(gen.name, _convert(text, gen.dtype, gen.name), meta)

    def _select(self, sel: Select) -> None:
        decision = self.backend.select(self.view(), sel.choices, sel.choices_method)
        self._append(decision.decision, sel.name)
        self._set_var(sel.name, decision.decision, decision.meta_info)

    def _set_var(self, name: str, value: Any, meta: dict) -> None:
        self.variables[name] = value
        self.meta[name] = meta
        self._events[name].set()

    def _role_begin(self, role: str) -> None:
        if self.role is not None:
            raise LangError(f"role: {role} begins while the {self.role} turn is still open")
        default_system = self.template.default_system_prompt
        if role != "system" and not self.messages and default_system and not self.text:
            self._role_begin("system")
            self._append(default_system)
            self._role_end("system")
        prefix, _ = self.template.prefix_and_suffix(role)
        self._append(prefix)
        self.role, self.role_start = role, len(self.text)

    def _role_end(self, role: str) -> None:
        if self.role != role:
            raise LangError(f"role: {role} ends but the open turn is {self.role or 'none'}")
        content = self.text[self.role_start:]
        self._append(self.template.prefix_and_suffix(role)[1])
        self.messages.append({"role": role, "content": content})
        self.role = None

    # -- forks -----------------------------------------------------------------------------
    def fork(self, size: int) -> list["StreamExecutor"]:
        """``size`` copies of this state as it stands once its queue ran. With two or more the
        text so far is first sent alone (the prefix hint), so the forks hit the radix cache."""
        if size > 1 and self.backend is not None:
            self.submit(CachePrefix())
        self.sync()
        forks = []
        for _ in range(size):
            child = StreamExecutor(self.backend, self.defaults, self.stream)
            child.template = self.template
            child.text, child.messages = self.text, [dict(m) for m in self.messages]
            child.role, child.role_start = self.role, self.role_start
            child.variables, child.meta = dict(self.variables), dict(self.meta)
            child.names = set(self.names)
            forks.append(child)
        self.children += forks
        return forks

    # -- streaming -------------------------------------------------------------------------
    def stream_events(self) -> Iterator[tuple[str, Optional[str]]]:
        """(text delta, variable or None) as the worker appends them, until the program ends."""
        while True:
            item = self._stream_q.get()
            if item is _END:
                self._stream_q.put(_END)  # later iterators end at once too
                self.raise_error()
                return
            yield item


def _convert(text: str, dtype: Optional[type], name: str) -> Any:
    if dtype is int:
        try:
            return int(text.strip())
        except ValueError:
            raise LangError(f"gen: variable {name!r} should be an int but the model wrote {text!r}") from None
    return text


class ProgramState:
    """What a program's ``s`` is, and what run() returns."""

    def __init__(self, executor: StreamExecutor):
        self.stream_executor = executor
        self.ret_value: Any = None

    def __iadd__(self, other: Any) -> "ProgramState":
        if isinstance(other, ProgramStateGroup):
            raise LangError("cannot append forks to a state; read their variables or call forks.join()")
        self.stream_executor.submit(as_expr(other))
        return self

    def __getitem__(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def __contains__(self, name: str) -> bool:
        return name in self.stream_executor.names

    def get_meta_info(self, name: str) -> dict:
        self.stream_executor.get_var(name)
        return self.stream_executor.meta[name]

    def text(self) -> str:
        self.stream_executor.sync()
        return self.stream_executor.text

    def messages(self) -> list[dict]:
        self.stream_executor.sync()
        return [dict(m) for m in self.stream_executor.messages]

    def sync(self) -> "ProgramState":
        self.stream_executor.sync()
        return self

    def error(self) -> Optional[BaseException]:
        return self.stream_executor.error

    def fork(self, size: int = 1) -> "ProgramStateGroup":
        if not isinstance(size, int) or size < 1:
            raise LangError(f"fork: size must be an int >= 1, got {size!r}")
        return ProgramStateGroup([ProgramState(e) for e in self.stream_executor.fork(size)], self)

    def text_iter(self, var_name: Optional[str] = None) -> Iterator[str]:
        """Text as it is generated (stream=True): every delta, or only those of ``var_name``.
        Without streaming, the final text (or the variable) once."""
        ex = self.stream_executor
        if not ex.stream:
            yield self.text() if var_name is None else str(self[var_name])
            return
        for delta, var in ex.stream_events():
            if var_name is None or var == var_name:
                yield delta

    async def text_async_iter(self, var_name: Optional[str] = None) -> AsyncIterator[str]:
        """text_iter for asyncio: the blocking waits run in the loop's default executor."""
        loop = asyncio.get_running_loop()
        it = self.text_iter(var_name)
        done = object()
        while (piece := await loop.run_in_executor(None, next, it, done)) is not done:
            yield piece

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """The states ``s.fork(n)`` returns; index or iterate them, then join."""

    def __init__(self, states: list[ProgramState], parent: ProgramState):
        self.states = states
        self.parent = parent
        self.base = len(parent.stream_executor.text)  # the text the forks started from

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __iter__(self):
        return iter(self.states)

    def join(self, mode: str = "gather_variable") -> None:
        """Waits for every fork. ``gather_variable``: each variable a fork set becomes, in the
        parent, the list of the forks' values. ``concate_and_append``: the text each fork
        added is appended to the parent, fork by fork."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise LangError(f"join: unknown mode {mode!r}; valid: gather_variable, concate_and_append")
        parent = self.parent.stream_executor
        for s in self.states:
            s.sync()
        if mode == "gather_variable":
            for name in [n for n in self.states[0].stream_executor.variables if n not in parent.variables]:
                values = [s.stream_executor.variables.get(name) for s in self.states]
                parent.names.add(name)
                parent.variables[name] = values
                parent.meta[name] = {"forks": [s.stream_executor.meta.get(name) for s in self.states]}
        else:
            self.parent += "".join(s.stream_executor.text[self.base:] for s in self.states)
