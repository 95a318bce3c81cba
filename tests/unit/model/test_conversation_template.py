"""SGLang's conversation-format JSON chat templates become Jinja that renders as SGLang does."""
from __future__ import annotations

import json

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvyard.model.tokenizer import read_chat_template

CHATML = {"name": "my_model", "system": "<|im_start|>system", "user": "<|im_start|>user",
          "assistant": "<|im_start|>assistant", "sep_style": "CHATML", "sep": "<|im_end|>",
          "stop_str": ["<|im_end|>", "<|im_start|>"]}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def render(data: dict, tmp_path, messages=MESSAGES) -> str:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)   # as transformers renders
    return env.from_string(read_chat_template(str(path))).render(messages=messages, add_generation_prompt=True)


def test_chatml(tmp_path):
    assert render(CHATML, tmp_path) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")


def test_add_colon_two(tmp_path):
    data = {"name": "v", "system": "A chat.", "user": "USER", "assistant": "ASSISTANT",
            "sep_style": "ADD_COLON_TWO", "sep": " ", "sep2": "</s>"}
    assert render(data, tmp_path, MESSAGES[1:]) == "A chat.\n USER: Hi ASSISTANT: Hello!</s>USER: Bye ASSISTANT:"


def test_unknown_style_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sep_style 'LLAMA9' is not supported by kvyard"):
        render({**CHATML, "sep_style": "LLAMA9"}, tmp_path)
