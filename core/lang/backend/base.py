"""The backend contract: what the executor asks of a server.

A backend gets a ``PromptView`` (the state's text and chat messages so far) and returns text
plus meta info. ``cache_prefix`` is the prefix hint: send a text once, generating nothing, so
the requests that follow (forks, a batch, a select's options) find it in the radix cache; a
backend without a prefix cache makes it a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from kvyard.lang.chat_template import PLAIN, ChatTemplate
from kvyard.lang.choices import ChoicesDecision, ChoicesMethod
from kvyard.lang.errors import NotSupportedError
from kvyard.lang.sampling import SamplingParams


@dataclass
class PromptView:
    text: str
    messages: list = field(default_factory=list)  # completed turns: {"role", "content"}
    role: Optional[str] = None  # the role whose turn is open, if any
    role_text: str = ""  # what the open turn holds so far


class Backend:
    name = "backend"
    supports_images = False

    def get_chat_template(self) -> ChatTemplate:
        return PLAIN

    def cache_prefix(self, text: str) -> Optional[dict]:
        return None

    def generate(self, prompt: PromptView, params: SamplingParams) -> tuple[str, dict]:
        raise NotImplementedError

    def generate_stream(self, prompt: PromptView, params: SamplingParams) -> Iterator[tuple[str, Optional[dict]]]:
        """Yields (text delta, None) pieces, then ("", meta info) once at the end."""
        text, meta = self.generate(prompt, params)
        yield text, None
        yield "", meta

    def select(self, prompt: PromptView, choices: Sequence[str], method: ChoicesMethod) -> ChoicesDecision:
        raise NotSupportedError(f"select: the {self.name} backend cannot score choices")

    def shutdown(self) -> None:
        """Releases what the backend started (a server process, an engine); idempotent."""
