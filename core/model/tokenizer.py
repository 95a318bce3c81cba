"""Tokenizer and chat template loading (transformers does the work)."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)


def load_tokenizer(model_path: str, tokenizer_path: Optional[str] = None, tokenizer_mode: str = "auto",
                   load_format: str = "auto", revision: Optional[str] = None,
                   trust_remote_code: bool = False, chat_template: Optional[str] = None):
    from transformers import AutoTokenizer

    from kvyard.loader import LoadConfig
    from kvyard.model.source import resolve_load_format
    from kvyard.plugins import registry

    if tokenizer_path:
        path, kwargs = tokenizer_path, {}
    else:
        fmt = resolve_load_format(model_path, load_format)
        source = registry("load_formats").get(fmt)(LoadConfig(load_format=fmt, revision=revision)) \
            .tokenizer_source(model_path)
        path, kwargs = source.path, dict(source.kwargs)
    kwargs.setdefault("revision", revision)
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, use_fast=tokenizer_mode != "slow", **kwargs)
    if chat_template:
        tok.chat_template = read_chat_template(chat_template)
    return tok


def read_chat_template(spec: str) -> str:
    """A .jinja file, a JSON file with a "chat_template" key or in SGLang's conversation format,
    or an inline Jinja template."""
    if os.path.exists(spec):
        with open(spec) as fh:
            text = fh.read()
        if spec.endswith(".json"):
            data = json.loads(text)
            if isinstance(data, dict) and "chat_template" in data:
                return data["chat_template"]
            from kvyard.model.conversation_template import is_conversation_json, jinja_from_conversation
            if is_conversation_json(data):
                return jinja_from_conversation(data)
            raise ValueError(f"chat_template: {spec} has neither a 'chat_template' key nor SGLang's "
                             "conversation format (user, assistant, sep_style, ...)")
        return text
    if "{%" in spec or "{{" in spec:
        return spec
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    raise ValueError(f"chat_template: {spec!r} is neither a file nor a built-in template "
                     f"({', '.join(sorted(BUILTIN_TEMPLATES))})")


BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-2": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
        "{% else %}{{ ' ' + message['content'] + ' </s>' }}{% endif %}{% endfor %}"
    ),
}
