"""kvyard.lang: SGLang's frontend language — structured generation programs — for kvyard or any
OpenAI-compatible endpoint. A client library: it imports no torch and reaches servers over HTTP
(only EngineBackend, when constructed, loads the in-process engine).

    import kvyard.lang as sgl

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:30000"))
    print(qa.run(question="What is 2 + 2?")["answer"])

See docs/frontend.md.
"""
from kvyard.lang.api import (assistant, assistant_begin, assistant_end, gen, gen_int, gen_string, image, select,
                             system, system_begin, system_end, user, user_begin, user_end)
from kvyard.lang.backend.base import Backend
from kvyard.lang.backend.engine import EngineBackend, Runtime
from kvyard.lang.backend.native import NativeBackend
from kvyard.lang.backend.openai import OpenAI
from kvyard.lang.backend.runtime_endpoint import RuntimeEndpoint
from kvyard.lang.chat_template import ChatTemplate, get_chat_template
from kvyard.lang.choices import (ChoicesDecision, ChoicesMethod, greedy_token_selection, token_length_normalized,
                                 unconditional_likelihood_normalized)
from kvyard.lang.errors import BackendError, LangError, NotSupportedError
from kvyard.lang.global_config import set_default_backend
from kvyard.lang.interpreter import ProgramState, ProgramStateGroup
from kvyard.lang.program import SglFunction, function

Engine = EngineBackend  # SGLang's name for the in-process engine as a backend

__all__ = [
    "function", "SglFunction", "gen", "gen_int", "gen_string", "select", "image",
    "system", "user", "assistant", "system_begin", "system_end", "user_begin", "user_end",
    "assistant_begin", "assistant_end", "set_default_backend", "get_chat_template", "ChatTemplate",
    "Backend", "NativeBackend", "RuntimeEndpoint", "OpenAI", "Runtime", "EngineBackend", "Engine",
    "ProgramState", "ProgramStateGroup", "ChoicesMethod", "ChoicesDecision", "token_length_normalized",
    "greedy_token_selection", "unconditional_likelihood_normalized", "LangError", "NotSupportedError",
    "BackendError",
]
