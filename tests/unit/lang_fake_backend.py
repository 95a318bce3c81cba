"""A scripted kvyard.lang backend for unit tests: no server, deterministic answers, a log of
every call (so tests see the prefix hint and what each gen was sent)."""
from __future__ import annotations

import threading
import time

from kvyard.lang.backend.base import Backend
from kvyard.lang.chat_template import CHATML


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, answers=None, option_logprobs=None, unconditional=None, template=CHATML, delay=0.0):
        self.answers = answers or {}  # prompt suffix -> text; default: "gen<k>"
        self.option_logprobs = option_logprobs or {}  # option -> token logprobs given the prefix
        self.unconditional = unconditional or {}  # option -> token logprobs alone
        self.template = template
        self.delay = delay
        self.lock = threading.Lock()
        self.cached: list[str] = []
        self.prompts: list[str] = []
        self.params: list = []

    def get_chat_template(self):
        return self.template

    def cache_prefix(self, text):
        with self.lock:
            self.cached.append(text)
        return {"prompt_tokens": len(text.split())}

    def generate(self, prompt, params):
        time.sleep(self.delay)
        with self.lock:
            self.prompts.append(prompt.text)
            self.params.append(params)
            k = len(self.prompts)
        for suffix, text in self.answers.items():
            if prompt.text.endswith(suffix):
                return text, {"prompt_tokens": len(prompt.text), "finish_reason": {"type": "stop"}}
        return f"gen{k}", {"prompt_tokens": len(prompt.text), "finish_reason": {"type": "length"}}

    def generate_stream(self, prompt, params):
        text, meta = self.generate(prompt, params)
        for i in range(0, len(text), 2):
            yield text[i:i + 2], None
        yield "", meta

    def select(self, prompt, choices, method):
        cond = [self.option_logprobs[c] for c in choices]
        unc = [self.unconditional[c] for c in choices] if method.requires_unconditional_logprobs else None
        return method(choices, cond, unc)
