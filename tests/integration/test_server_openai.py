"""The OpenAI-compatible API through the official openai SDK, against a real `kvyard serve`."""
from __future__ import annotations

import pytest
import requests
from openai import BadRequestError

from conftest import SERVED_NAME

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED_NAME]
    assert client.models.retrieve(SERVED_NAME).id == SERVED_NAME


def test_chat_completion_greedy(client):
    r = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == SERVED_NAME
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details is not None  # --enable-cache-report


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=SERVED_NAME, messages=CHAT, max_completion_tokens=10, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_n2_seed_reproducible_and_logprobs(client):
    kwargs = dict(model=SERVED_NAME, messages=[{"role": "user", "content": "Name an animal."}], max_tokens=6,
                  temperature=1.0, n=2, seed=1234, logprobs=True, top_logprobs=2)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c0 = a.choices[0].logprobs.content
    assert 1 <= len(c0) <= 6
    for tok in c0:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 2
        assert tok.top_logprobs[0].logprob >= tok.top_logprobs[1].logprob
    other = client.chat.completions.create(**{**kwargs, "seed": 99, "n": 1})
    assert a.usage.prompt_tokens == other.usage.prompt_tokens  # prompt counted once for n=2


def test_completion_stop_string(client):
    prompt = "Count from one to ten in words: one, two,"
    base = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text.split(",")[1].strip()  # a word the model is about to say
    assert stop
    r = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert stop not in r.choices[0].text and text.startswith(r.choices[0].text)
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                         stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_completion_echo_logprobs_and_token_prompts(client):
    r = client.completions.create(model=SERVED_NAME, prompt="The sky is", max_tokens=4, temperature=0,
                                  echo=True, logprobs=2)
    choice = choice0 = r.choices[0]
    assert choice.text.startswith("The sky is")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text and lp.text_offset[1] == len(lp.tokens[0])
    ids = [504, 3575, 282]  # token ids: a batch of two id prompts, n=1
    batch = client.completions.create(model=SERVED_NAME, prompt=[ids, ids[:2]], max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.prompt_tokens == 5
    assert choice0.finish_reason == "length"


def test_extra_body_sampling_fields(client):
    r = client.chat.completions.create(
        model=SERVED_NAME, messages=CHAT, max_tokens=5, temperature=0.7,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 5, "ignore_eos": True,
                    "skip_special_tokens": True, "stop_token_ids": [2]})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_bad_fields_are_named(client):
    cases = [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
             ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"extra_body": {"frobnicate": 1}}, "frobnicate")]
    for kwargs, field in cases:
        with pytest.raises(BadRequestError) as exc:
            client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=2, **kwargs)
        assert exc.value.status_code == 400 and exc.value.body["param"] == field, (kwargs, exc.value.body)


def test_embeddings_on_a_generation_model_is_a_clear_400(client):
    with pytest.raises(BadRequestError, match="not an embedding model"):
        client.embeddings.create(model=SERVED_NAME, input="hello")


def test_tool_call_and_reasoning_parsers_endpoints(base_url, auth):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    r = requests.post(base_url + "/function_call", headers=auth,
                      json={"text": text, "tools": tools, "tool_call_parser": "qwen25"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["calls"][0]["name"] == "get_weather" and '"Paris"' in body["calls"][0]["parameters"]
    r = requests.post(base_url + "/separate_reasoning", headers=auth,
                      json={"text": "<think>2+2 is 4</think>The answer is 4.", "reasoning_parser": "deepseek-r1"})
    assert r.status_code == 200, r.text
    assert r.json() == {"reasoning_text": "2+2 is 4", "text": "The answer is 4."}
    bad = requests.post(base_url + "/function_call", headers=auth, json={"text": text, "tools": tools,
                                                                          "tool_call_parser": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_call_parser"
