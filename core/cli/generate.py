"""`kvyard generate`: one-off generation on the command line.

The chat template is applied by default when the tokenizer has one (instruct models);
--no-chat sends the prompt as raw text, --chat insists on the template.
"""
from __future__ import annotations

import json
import sys

from kvyard.cli.common import (add_sampling_flags, engine_parser, err, run_reporting_errors,
                               sampling_params_from, server_args_from)


def build_parser():
    parser = engine_parser("kvyard generate", "Generate text with a model.",
                           groups={"model", "scheduling", "runtime", "lora", "logging"})
    g = parser.add_argument_group("prompt")
    g.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    g.add_argument("--prompt-file", default=None, help="one prompt per line, or JSONL with a 'prompt' field")
    chat = g.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="apply the chat template (default when the tokenizer has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="send the prompt as raw text")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--json", dest="as_json", action="store_true", help="print the full output objects as JSON")
    g.add_argument("--lora", default=None, metavar="NAME",
                   help="generate with this LoRA adapter (a name of --lora-paths)")
    add_sampling_flags(parser)
    return parser


def read_prompts(ns) -> list[str]:
    prompts = list(ns.prompt or [])
    if ns.prompt_file:
        with open(ns.prompt_file) as fh:
            for line in fh:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    prompts.append(json.loads(line)["prompt"])
                else:
                    prompts.append(line)
    if not prompts:
        raise ValueError("prompt: give --prompt TEXT or --prompt-file FILE")
    return prompts


def run_generate(argv: list[str]) -> int:
    from kvyard.cli.diffusion import model_type_of, run_diffusion_generate

    kind: list[str] = []
    rc = run_reporting_errors(lambda: kind.append(model_type_of(argv)) or 0)
    if rc or kind[0] == "diffusion":
        return rc or run_diffusion_generate(argv)
    ns = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: _generate(ns))


def _generate(ns) -> int:
    from kvyard.engine import Engine
    from kvyard.lora.config import parse_lora_paths

    prompts = read_prompts(ns)
    params = sampling_params_from(ns)
    args = server_args_from(ns)
    if ns.lora is not None and ns.lora not in parse_lora_paths(args.lora_paths):
        raise ValueError(f"lora: {ns.lora!r} is not one of --lora-paths "
                         f"({', '.join(parse_lora_paths(args.lora_paths)) or 'none given'})")
    with err.status("loading the model…"):
        engine = Engine(server_args=args)
    with engine:
        use_chat = ns.chat if ns.chat is not None else bool(getattr(engine.tokenizer, "chat_template", None))
        if ns.chat and not getattr(engine.tokenizer, "chat_template", None):
            raise ValueError("chat: the tokenizer has no chat template; pass --chat-template or --no-chat")
        ids = [_chat_ids(engine, p, ns.system) if use_chat else None for p in prompts]
        if ns.stream:
            for p, i in zip(prompts, ids):
                stream = engine.generate(None if i else p, params, input_ids=i, stream=True, lora_path=ns.lora)
                shown = 0   # chunks are cumulative unless --incremental-streaming-output
                for chunk in stream:
                    new = chunk["text"] if engine.tm.incremental_streaming else chunk["text"][shown:]
                    shown += len(new)
                    sys.stdout.write(new)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            return 0
        outs = engine.generate(None if use_chat else prompts, params, input_ids=ids if use_chat else None,
                               lora_path=ns.lora)
        outs = outs if isinstance(outs, list) else [outs]
        for out in outs:
            print(json.dumps(out) if ns.as_json else out["text"])
    return 0


def _chat_ids(engine, prompt: str, system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return engine.tm.apply_chat_template(messages)
