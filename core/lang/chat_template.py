"""Role markers of a chat template: the text before and after each role's content.

A program's ``user(...)`` appends prefix + content + suffix, so its state text is what the
server's chat template would render for the same messages. ``from_jinja`` derives the markers
from the Jinja template a kvyard server reports (or a tokenizer holds) by rendering sentinel
conversations, and checks the result reproduces a full render; templates it cannot split are
an error that says so (pass a ChatTemplate, or a built-in name, instead).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kvyard.lang.errors import LangError

ROLES = ("system", "user", "assistant")
_S = {"system": "\x01SYS\x01", "user": "\x01USR\x01", "assistant": "\x01AST\x01", "user2": "\x01US2\x01",
      "assistant2": "\x01AS2\x01"}


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    role_prefix_and_suffix: dict = field(default_factory=dict)  # role -> (prefix, suffix)
    default_system_prompt: Optional[str] = None

    def prefix_and_suffix(self, role: str) -> tuple[str, str]:
        if role not in self.role_prefix_and_suffix:
            raise LangError(f"role: the chat template {self.name!r} has no role {role!r}")
        return self.role_prefix_and_suffix[role]


PLAIN = ChatTemplate("plain", {r: ("", "") for r in ROLES})
CHATML = ChatTemplate("chatml", {r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ROLES})
LLAMA3 = ChatTemplate("llama-3-instruct",
                      {r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>") for r in ROLES})
BUILTIN = {t.name: t for t in (PLAIN, CHATML, LLAMA3)}


def get_chat_template(spec) -> ChatTemplate:
    """A ChatTemplate, or the name of a built-in one."""
    if isinstance(spec, ChatTemplate):
        return spec
    if spec in BUILTIN:
        return BUILTIN[spec]
    raise LangError(f"chat_template: unknown template {spec!r}; valid: {', '.join(BUILTIN)} or a ChatTemplate")


def from_jinja(source: str, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
               name: str = "server") -> ChatTemplate:
    """Derives role markers from a Jinja chat template (see the module docstring)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    template = env.from_string(source)

    def render(roles_and_keys, generation_prompt=False) -> str:
        messages = [{"role": r, "content": _S[k]} for r, k in roles_and_keys]
        text = template.render(messages=messages, add_generation_prompt=generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "")
        # a template that writes bos_token itself: the server's tokenizer adds that one
        emits_bos = bool(bos_token) and "bos_token" in source and text.startswith(bos_token)
        return text[len(bos_token):] if emits_bos else text

    try:
        markers, default_system = _split(render)
    except (LangError, ValueError, TypeError) as exc:
        raise LangError(f"chat_template: cannot derive role markers from the {name} template ({exc}); "
                        "pass chat_template= a ChatTemplate or one of: " + ", ".join(BUILTIN)) from None
    except Exception as exc:  # jinja2's own errors (a template that refuses a role order, ...)
        raise LangError(f"chat_template: cannot derive role markers from the {name} template "
                        f"({type(exc).__name__}: {exc})") from None
    return ChatTemplate(name, markers, default_system)


def _raise(message: str):
    raise ValueError(message)


def _between(text: str, a: str, b: str) -> str:
    start = text.index(a) + len(a) if a else 0
    end = text.index(b, start) if b else len(text)
    return text[start:end]


def _strip_suffix(text: str, suffix: str) -> str:
    if suffix and not text.endswith(suffix):
        raise LangError("markers are not a plain prefix/suffix per role")
    return text[:len(text) - len(suffix)] if suffix else text


def _split(render) -> tuple[dict, Optional[str]]:
    full = render([("system", "system"), ("user", "user"), ("assistant", "assistant"),
                   ("user", "user2"), ("assistant", "assistant2")])
    asst_suffix = full[full.index(_S["assistant2"]) + len(_S["assistant2"]):]
    two = [("system", "system"), ("user", "user")]
    asst_prefix = render(two, True)[len(render(two, False)):]
    user_prefix = _between(full, _S["assistant"], _S["user2"])
    if not user_prefix.startswith(asst_suffix):
        raise LangError("the assistant suffix does not precede the next user turn")
    user_prefix = user_prefix[len(asst_suffix):]
    user_suffix = _strip_suffix(_between(full, _S["user"], _S["assistant"]), asst_prefix)
    sys_suffix = _strip_suffix(_between(full, _S["system"], _S["user"]), user_prefix)
    sys_prefix = full[:full.index(_S["system"])]
    markers = {"system": (sys_prefix, sys_suffix), "user": (user_prefix, user_suffix),
               "assistant": (asst_prefix, asst_suffix)}
    rebuilt = "".join(markers[r][0] + _S[k] + markers[r][1] for r, k in
                      [("system", "system"), ("user", "user"), ("assistant", "assistant"),
                       ("user", "user2"), ("assistant", "assistant2")])
    if rebuilt != full:
        raise LangError("the markers do not reproduce a full conversation")
    return markers, _default_system(render([("user", "user")]), markers)


def _default_system(user_only: str, markers: dict) -> Optional[str]:
    """The system prompt the template inserts when a conversation has none (or None)."""
    head = user_only[:user_only.index(_S["user"])]
    head = _strip_suffix(head, markers["user"][0])
    if not head:
        return None
    prefix, suffix = markers["system"]
    if head.startswith(prefix) and head.endswith(suffix):
        return head[len(prefix):len(head) - len(suffix)]
    raise LangError("the template inserts a preamble that is not a system turn")
