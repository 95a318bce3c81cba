"""`kvyard serve` without a model: flags, start-up failures, and the app's gates (readiness,
API key, error bodies) on a stand-in engine."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from conftest import free_port


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvyard.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_is_grouped_by_topic():
    out = _serve("--help").stdout
    for section in ("model and tokenizer:", "HTTP server:", "memory and scheduling:", "logging:"):
        assert section in out
    for flag in ("--api-key", "--skip-server-warmup", "--enable-metrics", "--file-storage-path", "--config",
                 "--served-model-name", "--chat-template", "--allow-auto-truncate", "--log-level-http"):
        assert flag in out


def test_busy_port_fails_before_loading_the_model():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = _serve("--port", str(s.getsockname()[1]))
    assert r.returncode == 1 and "cannot listen on 127.0.0.1" in r.stderr


def test_broken_diffusion_folder_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_diffusers_version": "0.30.0"}))
    r = _serve("--model-path", str(tmp_path), "--port", str(free_port()))
    assert r.returncode == 1 and "names no pipeline class (_class_name)" in " ".join(r.stderr.split())
    r = _serve("--model-path", str(tmp_path), "--model-type", "llm", "--port", str(free_port()))
    assert r.returncode == 1 and "model_type: llm was forced" in " ".join(r.stderr.split())


def test_bad_flag_values_are_one_line():
    r = _serve("--attention-backend", "nope")
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _serve("--warmups", "nope", "--port", str(free_port()))
    assert r.returncode == 1 and "warmups: unknown warmup 'nope'" in r.stderr


def test_config_file_with_flags_overriding(tmp_path):
    from kvyard.cli.common import server_args_from
    from kvyard.cli.serve import build_parser

    config = tmp_path / "server.yaml"
    config.write_text("port: 31111\nenable-metrics: true\napi_key: from-file\n")
    args = server_args_from(build_parser().parse_args(["--config", str(config), "--port", "32222"]))
    assert (args.port, args.enable_metrics, args.api_key) == (32222, True, "from-file")


# -- the app on a stand-in engine ------------------------------------------------------------
@pytest.fixture
def app_ctx():
    from kvyard.server.app import create_app
    from kvyard.server.context import ServerContext
    from kvyard.server_args import ServerArgs

    tm = SimpleNamespace(info={"is_embedding": False}, context_length=2048, tokenizer=None, dead=None,
                         vocab_size=100, lora_adapters=None)
    ctx = ServerContext(args=ServerArgs(model_path="/models/x", served_model_name="x", api_key="k"),
                        engine=SimpleNamespace(args=None), tm=tm)
    return TestClient(create_app(ctx)), ctx  # no `with`: the lifespan (engine start) does not run


def test_not_ready_is_503_then_open(app_ctx):
    client, ctx = app_ctx
    key = {"Authorization": "Bearer k"}
    assert client.get("/health").status_code == 503
    r = client.get("/v1/models", headers=key)
    assert r.status_code == 503 and r.json()["error"]["code"] == 503
    ctx.ready = True
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models", headers=key).json()["data"][0]["id"] == "x"


def test_api_key_and_error_bodies(app_ctx):
    client, ctx = app_ctx
    ctx.ready = True
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer kk"}).status_code == 401
    key = {"Authorization": "Bearer k"}
    r = client.get("/nowhere", headers=key)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.post("/v1/chat/completions", headers=key, json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "skip-tokenizer-init" in r.json()["error"]["message"]
    r = client.post("/v1/completions", headers=key, json={"prompt": "hi", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


# -- chat output parsing (tool calls, reasoning) on fixed texts ---------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TOOL_TEXT = ('<think>The user wants weather.</think>Checking. <tool_call>\n'
             '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


def _plan():
    from kvyard.server.openai_chat import ChatPlan
    return ChatPlan(id="chatcmpl-x", created=0, n=1, logprobs=False, tools=TOOLS, tool_call_parser="qwen25",
                    forced_tools=False,
                    reasoning_parser="deepseek-r1", stream_reasoning=True)


def test_chat_choice_splits_reasoning_and_tool_calls():
    from kvyard.server.openai_chat import chat_choice

    out = {"text": TOOL_TEXT, "output_ids": [], "meta_info": {"finish_reason": {"type": "stop", "matched": 2}}}
    choice = chat_choice(_plan(), 0, out)
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["reasoning_content"] == "The user wants weather."
    assert message["content"].strip() == "Checking."
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"} and call["id"].startswith("call_")


def test_chat_stream_deltas_add_up_to_the_non_stream_message():
    from kvyard.server.openai_chat import ChoiceStreamParser

    parser = ChoiceStreamParser(_plan())
    pieces = [TOOL_TEXT[i:i + 7] for i in range(0, len(TOOL_TEXT), 7)]
    deltas = [parser.delta(p, final=(i == len(pieces) - 1)) for i, p in enumerate(pieces)]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert reasoning == "The user wants weather." and content.strip() == "Checking."
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0 and "id" in calls[0]
    args = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(args) == {"city": "Paris"} and parser.saw_calls
