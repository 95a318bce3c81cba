"""The backend over kvyard's native generate API (SGLang's /generate shape), whatever carries
it: HTTP (RuntimeEndpoint) or an in-process kvyard.Engine (EngineBackend).

select(): one request caches the prefix (max_new_tokens=0), one batch scores every option
from its prompt logprobs (the radix cache serves the shared prefix), and for
unconditional_likelihood_normalized one more scores the options' tokens alone.

Prompt logprob alignment: a reply lists (logprob, token id, token text) for the prompt's
last tokens (SGLang puts a None first; kvyard does when logprob_start_len is 0). Counting from
the end, entry -k is prompt token n-k. An option's tokens are those at positions >= P (P: the
prefix's token count) plus the one at P-1 when its text is not the prefix's own last token —
the prefix's last token merged with the option's first ("token healing").
"""
from __future__ import annotations

from typing import Iterator, Optional, Protocol, Sequence

from kvyard.lang.backend.base import Backend, PromptView
from kvyard.lang.chat_template import ChatTemplate, from_jinja, get_chat_template
from kvyard.lang.choices import ChoicesDecision, ChoicesMethod
from kvyard.lang.errors import BackendError
from kvyard.lang.sampling import SamplingParams


class Transport(Protocol):
    """How a NativeBackend reaches the engine; errors are BackendErrors."""
    name: str

    def model_info(self) -> dict: ...

    def generate(self, obj: dict): ...

    def generate_stream(self, obj: dict) -> Iterator[tuple[str, Optional[dict]]]: ...


class NativeBackend(Backend):
    def __init__(self, transport: Transport, chat_template=None):
        self.transport = transport
        self.name = transport.name
        self.model_info = transport.model_info()
        self._template = get_chat_template(chat_template) if chat_template is not None else None

    def get_chat_template(self) -> ChatTemplate:
        if self._template is None:
            source = self.model_info.get("chat_template")
            if source:
                self._template = from_jinja(source, self.model_info.get("bos_token"),
                                            self.model_info.get("eos_token"), name=self.name)
            else:  # an SGLang server, or a model without a template: plain text roles
                self._template = get_chat_template("plain")
        return self._template

    # -- generation --------------------------------------------------------------------------
    def cache_prefix(self, text: str) -> Optional[dict]:
        out = self.transport.generate({"text": text, "sampling_params": {"max_new_tokens": 0}})
        return out["meta_info"]

    def _request(self, prompt: PromptView, params: SamplingParams) -> dict:
        return {"text": prompt.text, "sampling_params": params.native(), **params.logprob_request()}

    def generate(self, prompt: PromptView, params: SamplingParams) -> tuple[str, dict]:
        out = self.transport.generate(self._request(prompt, params))
        return out["text"], out["meta_info"]

    def generate_stream(self, prompt: PromptView, params: SamplingParams):
        yield from self.transport.generate_stream({**self._request(prompt, params), "stream": True})

    # -- choices ---------------------------------------------------------------------------
    def select(self, prompt: PromptView, choices: Sequence[str], method: ChoicesMethod) -> ChoicesDecision:
        prefix = prompt.text
        prefix_len = self.cache_prefix(prefix)["prompt_tokens"] if prefix else 0
        outs = self.transport.generate({
            "text": [prefix + c for c in choices], "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": max(prefix_len - 2, 0)})
        entries = [option_entries(prefix, prefix_len, out) for out in outs]
        conditional = [[lp for lp, _, _ in e] for e in entries]
        unconditional = self._unconditional(entries) if method.requires_unconditional_logprobs else None
        decision = method(choices, conditional, unconditional)
        decision.meta_info["prefix_tokens"] = prefix_len
        return decision

    def _unconditional(self, entries: list[list]) -> list[list[float]]:
        """Each option's tokens scored alone: the first has no context (0)."""
        outs = self.transport.generate({
            "input_ids": [[tid for _, tid, _ in e] for e in entries],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True, "logprob_start_len": 0})
        rows = []
        for e, out in zip(entries, outs):
            lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"] if lp is not None]
            rows.append([0.0] + lps[-(len(e) - 1):] if len(e) > 1 else [0.0])
        return rows


def option_entries(prefix: str, prefix_len: int, out: dict) -> list[tuple]:
    """The (logprob, token id, text) entries of an option's tokens (see the module docstring)."""
    meta = out["meta_info"]
    n = meta["prompt_tokens"]
    valid = [tuple(e) for e in meta.get("input_token_logprobs") or [] if e[0] is not None]
    first_pos = n - len(valid)  # position of valid[0]
    start = max(prefix_len - 1, first_pos)
    picked = valid[start - first_pos:]
    if picked and start == prefix_len - 1 and prefix_len > 0:
        text = picked[0][2]
        if text is not None and text != "" and prefix.endswith(text):
            picked = picked[1:]  # the prefix's own last token
    if not picked:
        raise BackendError(f"select: the {meta.get('id', 'reply')} prompt logprobs do not cover the option's tokens")
    return picked
