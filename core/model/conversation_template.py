"""SGLang's conversation-format chat template (a JSON file with ``name``, ``system``, ``user``,
``assistant``, ``sep_style``, ``sep``, optional ``sep2``, ``system_message``, ``stop_str``) turned
into the equivalent Jinja template, so it goes through the tokenizer like any other template.

The rendering rules follow SGLang's separator styles (the system turn is the ``system`` string,
a newline and the system message; each other turn is the role, a style-specific joiner, the
content and a separator; the generation prompt is the assistant role with the joiner's head).
Supported styles: CHATML, ADD_COLON_SINGLE, ADD_COLON_TWO, ADD_COLON_SPACE_SINGLE,
NO_COLON_SINGLE, NO_COLON_TWO, ADD_NEW_LINE_SINGLE; any other is a ValueError naming it.
``stop_str`` is not applied (the model's end-of-turn tokens stop generation).
"""
from __future__ import annotations

import json

# style -> (joiner between role and content, generation-prompt suffix after the role,
#           system prefix rule: "sep_nl" | "sep" | "none" | "sep_if_message", alternating seps)
STYLES = {
    "CHATML": ("\n", "\n", "sep_nl", False),
    "ADD_COLON_SINGLE": (": ", ":", "sep", False),
    "ADD_COLON_TWO": (": ", ":", "sep", True),
    "ADD_COLON_SPACE_SINGLE": (": ", ": ", "sep", False),
    "NO_COLON_SINGLE": ("", "", "none", False),
    "NO_COLON_TWO": ("", "", "none", True),
    "ADD_NEW_LINE_SINGLE": ("\n", "\n", "sep_if_message", False),
}


def is_conversation_json(data) -> bool:
    return isinstance(data, dict) and "chat_template" not in data and {"user", "assistant"} <= set(data)


def _lit(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)   # a Jinja string literal


def jinja_from_conversation(data: dict) -> str:
    style = data.get("sep_style", "CHATML")
    if style not in STYLES:
        raise ValueError(f"chat_template: sep_style {style!r} is not supported by kvyard "
                         f"(supported: {', '.join(STYLES)})")
    joiner, gen, system_rule, two = STYLES[style]
    sep = data.get("sep", "<|im_end|>" if style == "CHATML" else "\n")
    sep2 = data.get("sep2") or sep
    head = data.get("system", "")
    sys_line = {"sep_nl": " + " + _lit(sep + "\n"), "sep": " + " + _lit(sep), "none": "",
                "sep_if_message": " + " + _lit(sep)}[system_rule]
    sys_cond = "ns.system" if system_rule == "sep_if_message" else "true"
    turn_sep = f"({_lit(sep)} if loop.index0 % 2 == 0 else {_lit(sep2)})" if two else _lit(sep)
    turn_sep += " + " + _lit("\n") if style == "CHATML" else ""
    return (
        "{%- set ns = namespace(system=" + _lit(data.get("system_message", "")) + ") -%}"
        "{%- for m in messages if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endfor -%}"
        "{%- if " + sys_cond + " %}{{ " + _lit(head + "\n") + " + ns.system" + sys_line + " }}{% endif -%}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' %}{% set role = " + _lit(data["user"]) + " %}"
        "{%- elif m['role'] == 'assistant' %}{% set role = " + _lit(data["assistant"]) + " %}"
        "{%- else %}{{ raise_exception('this chat template has no role ' + m['role']) }}{% endif -%}"
        "{{ role + " + _lit(joiner) + " + (m['content'] or '') + " + turn_sep + " }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ " + _lit(data["assistant"] + gen) + " }}{% endif -%}"
    )
