"""kvyard.lang against a real `kvyard serve` (SmolLM2): SGLang's documentation examples with only
the import changed, the choices methods against transformers, the same programs through the
OpenAI backend (kvyard's own /v1), the in-process engine and Runtime, and bad input."""
from __future__ import annotations

import asyncio
import json
import re
import time

import jsonschema
import pytest
import requests
import torch

import kvyard.lang as sgl
from conftest import API_KEY, SERVED_NAME
from lang_examples import (CHARACTER_SCHEMA, CHOICES_METHODS, IP_REGEX, character_gen, choose_with,
                           multi_turn_question, regular_expression_gen, stream_a_variable, text_qa,
                           tip_suggestion, tool_use)

QUESTIONS = [  # (question, options): prompts end without a space, options start with one
    ("The capital of France is", [" Paris", " London", " Berlin"]),
    ("2 + 2 =", [" 4", " 5", " 22"]),
    ("The color of the sky on a clear day is", [" blue", " green", " red"]),
    ("Water freezes at", [" zero degrees Celsius", " one hundred degrees Celsius", " fifty degrees"]),
    ("The largest planet in the solar system is", [" Jupiter", " Mars", " the Moon"]),
]


@pytest.fixture(scope="module")
def backend(base_url):
    be = sgl.RuntimeEndpoint(base_url, api_key=API_KEY)
    yield be
    be.shutdown()


@pytest.fixture(scope="module")
def openai_chat(base_url):
    be = sgl.OpenAI(SERVED_NAME, base_url=base_url + "/v1", api_key=API_KEY)
    yield be
    be.shutdown()


@pytest.fixture(scope="module")
def openai_text(base_url):
    be = sgl.OpenAI(SERVED_NAME, base_url=base_url + "/v1", api_key=API_KEY, is_chat_model=False,
                    chat_template="chatml")
    yield be
    be.shutdown()


def test_model_info_reports_the_chat_template(base_url, auth):
    info = requests.get(base_url + "/get_model_info", headers=auth, timeout=30).json()
    assert "<|im_start|>" in info["chat_template"] and info["eos_token"] == "<|im_end|>"


def test_multi_turn_matches_the_chat_api(backend, openai_chat):
    """The role markers derived from the server's template render what /v1/chat/completions
    renders: greedy answers agree through both backends."""
    args = dict(question_1="What is the capital of France?", question_2="And of Germany?", temperature=0)
    state = multi_turn_question.run(backend=backend, **args)
    assert state["answer_1"].strip() and state["answer_2"].strip()
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert state.text().startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert state.get_meta_info("answer_2")["cached_tokens"] > 0  # the first turn came from the radix cache
    chat = multi_turn_question.run(backend=openai_chat, **args)
    assert (chat["answer_1"], chat["answer_2"]) == (state["answer_1"], state["answer_2"])


def test_choices_control_flow(backend):
    state = tool_use.run(question="What is 123 * 456", temperature=0, backend=backend)
    assert state["tool"] in ("calculator", "search engine")
    assert ("expression" in state) == (state["tool"] == "calculator")
    assert f"I need to use a {state['tool']}. " in state.text()


@pytest.mark.parametrize("method", [CHOICES_METHODS[0]] + [pytest.param(m, marks=pytest.mark.slow)
                                                             for m in CHOICES_METHODS[1:]], ids=lambda m: m.name)
def test_choices_methods_agree_with_transformers(backend, hf_smollm2, method):
    """Each method on 5 questions, against the same computation on transformers' logprobs."""
    model, tok = hf_smollm2
    for question, options in QUESTIONS:
        state = choose_with.run(question=question, choices=options, method=method, backend=backend)
        prefix = "Question: " + question + "\nAnswer:"
        cond = [_hf_option_logprobs(model, tok, prefix, o) for o in options]
        if method is sgl.unconditional_likelihood_normalized:
            uncond = [_hf_option_logprobs(model, tok, "", o) for o in options]
            scores = [_mean([c - u for c, u in zip(cs, us)]) for cs, us in zip(cond, uncond)]
            got = state.get_meta_info("answer")["normalized_unconditional_prompt_logprobs"]
        else:
            scores = [_mean(c) for c in cond]
            got = state.get_meta_info("answer")["normalized_prompt_logprobs"]
        assert got == pytest.approx(scores, abs=2e-2), question
        expected = _greedy_pick(cond) if method is sgl.greedy_token_selection else scores.index(max(scores))
        assert state["answer"] == options[expected], (question, method.name, scores)


def _hf_option_logprobs(model, tok, prefix: str, option: str) -> list[float]:
    """Logprobs of the option's tokens after ``prefix`` (the first of a bare option: 0)."""
    prefix_ids = tok.encode(prefix) if prefix else []
    ids = tok.encode(prefix + option)
    assert ids[:len(prefix_ids)] == prefix_ids, "the option must not merge into the prefix"
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    start = max(len(prefix_ids), 1)
    out = [float(logprobs[p - 1, ids[p]]) for p in range(start, len(ids))]
    return out if prefix_ids else [0.0] + out


def _mean(xs):
    return sum(xs) / len(xs)


def _greedy_pick(rows: list[list[float]]) -> int:
    width = max(map(len, rows))
    padded = [r + [_mean(r)] * (width - len(r)) for r in rows]
    alive = list(range(len(rows)))
    for col in range(width):
        best = max(padded[i][col] for i in alive)
        alive = [i for i in alive if padded[i][col] == best]
    return alive[0]


@pytest.mark.slow
def test_fork_parallelism(backend):
    state = tip_suggestion.run(temperature=0, backend=backend)
    text = state.text()
    tip1 = text.split("Tip 1:")[1].split("\nTip 2:")[0]
    tip2 = text.split("Tip 2:")[1].split("\nIn summary")[0]
    assert tip1.strip() and tip2.strip() and tip1 != tip2
    assert state["summary"] is not None


@pytest.mark.slow
def test_regex(backend):
    state = regular_expression_gen.run(backend=backend)
    assert re.fullmatch(IP_REGEX, state["answer"]), state["answer"]


@pytest.mark.slow
def test_json_decoding(backend):
    state = character_gen.run(name="Hermione Granger", temperature=0, backend=backend)
    jsonschema.validate(json.loads(state["json_output"]), CHARACTER_SCHEMA)


def test_batching_keeps_order(backend):
    questions = ["What is the capital of the United Kingdom?", "What is the capital of France?",
                 "What is the capital of Japan?"]
    states = text_qa.run_batch([{"question": q} for q in questions], temperature=0, backend=backend,
                               progress_bar=True)
    assert len(states) == 3
    for q, s in zip(questions, states):
        assert s.text().startswith("Q: " + q + "\nA:") and isinstance(s["answer"], str)
    # the same program alone gives the same greedy answer as inside the batch
    assert text_qa.run(question=questions[2], temperature=0, backend=backend)["answer"] == states[2]["answer"]


@pytest.mark.slow
def test_streaming(backend):
    state, pieces = stream_a_variable(backend)
    assert len(pieces) > 1 and "".join(pieces) == state["answer_2"]

    async def collect():
        s = multi_turn_question.run(question_1="Hi", question_2="Bye", stream=True, temperature=0,
                                    max_new_tokens=8, backend=backend)
        return s, [p async for p in s.text_async_iter()]
    s, pieces = asyncio.run(collect())
    assert "".join(pieces) == s.text()


# -- the OpenAI backend on kvyard's /v1 ------------------------------------------------------
def test_openai_backend_choices_match_native(backend, openai_text):
    native = tool_use.run(question="What is 123 * 456", temperature=0, backend=backend)
    text = tool_use.run(question="What is 123 * 456", temperature=0, backend=openai_text)
    assert text["tool"] == native["tool"]
    assert text.get_meta_info("tool")["normalized_prompt_logprobs"] == pytest.approx(
        native.get_meta_info("tool")["normalized_prompt_logprobs"], abs=1e-3)


@pytest.mark.slow
def test_openai_backend_runs_the_examples(openai_chat, openai_text):
    for method in CHOICES_METHODS:
        q, opts = QUESTIONS[0]
        assert choose_with.run(question=q, choices=opts, method=method, backend=openai_text)["answer"] in opts
    assert re.fullmatch(IP_REGEX, regular_expression_gen.run(backend=openai_text)["answer"])
    state = character_gen.run(name="Harry Potter", temperature=0, backend=openai_text)
    jsonschema.validate(json.loads(state["json_output"]), CHARACTER_SCHEMA)
    states = text_qa.run_batch([{"question": "What is 1 + 1?"}, {"question": "Name a color."}], temperature=0,
                               backend=openai_text)
    assert [s.text().split("\n")[0] for s in states] == ["Q: What is 1 + 1?", "Q: Name a color."]
    pieces = list(multi_turn_question.run(question_1="Hi", question_2="Bye", stream=True, temperature=0,
                                          max_new_tokens=8, backend=openai_chat).text_iter())
    assert "".join(pieces).endswith("<|im_end|>\n") is False and len(pieces) > 2
    state = tip_suggestion.run(temperature=0, backend=openai_text)
    assert state.text().count("Tip ") == 2


def test_openai_chat_backend_refuses_choices_clearly(openai_chat):
    with pytest.raises(sgl.NotSupportedError, match="select: choices need each option's prompt logprobs"):
        tool_use.run(question="What is 1 + 1", backend=openai_chat)


# -- bad input -------------------------------------------------------------------------------
def test_bad_programs_fail_clearly(backend):
    @sgl.function
    def twice(s):
        s += "Hi" + sgl.gen("answer", max_tokens=2)
        s += sgl.gen("answer", max_tokens=2)

    with pytest.raises(sgl.LangError, match="gen: the variable name 'answer' is used twice in one program"):
        twice.run(backend=backend)
    with pytest.raises(sgl.LangError, match="choices_method: unknown method 'best'"):
        choose_with.run(question="x", choices=["a", "b"], method="best", backend=backend)

    @sgl.function
    def bad_field(s):
        s += "Hi" + sgl.gen("x", max_tokens=2, top_p=7.0)

    with pytest.raises(sgl.BackendError, match="HTTP 400: .*top_p"):
        bad_field.run(backend=backend)


def test_unreachable_backends_fail_fast():
    start = time.monotonic()
    with pytest.raises(sgl.BackendError, match="cannot reach the server at http://127.0.0.1:9"):
        sgl.RuntimeEndpoint("http://127.0.0.1:9")
    dead = sgl.OpenAI("m", base_url="http://127.0.0.1:9/v1", api_key="x", is_chat_model=False)
    with pytest.raises(sgl.BackendError, match="cannot reach the server at http://127.0.0.1:9/v1"):
        text_qa.run(question="Hi", backend=dead)
    assert time.monotonic() - start < 30


def test_wrong_api_key_is_a_clear_error(base_url):
    with pytest.raises(sgl.BackendError, match="HTTP 401"):
        sgl.RuntimeEndpoint(base_url, api_key="wrong")


# -- running the model from Python -----------------------------------------------------------
@pytest.mark.slow
def test_engine_backend_in_process(smollm2_path):
    with sgl.EngineBackend(model_path=smollm2_path, dtype="float32", max_total_tokens=4096) as be:
        state = multi_turn_question.run(question_1="Hi", question_2="Bye", temperature=0, max_new_tokens=8,
                                        backend=be)
        assert state["answer_1"] and state["answer_2"]
        assert tool_use.run(question="What is 2 * 3", backend=be)["tool"] in ("calculator", "search engine")


@pytest.mark.slow
def test_runtime_starts_and_stops_a_server(smollm2_path):
    runtime = sgl.Runtime(model_path=smollm2_path, dtype="float32", max_total_tokens=4096)
    try:
        state = text_qa.run(question="What is 1 + 1?", temperature=0, backend=runtime)
        assert state["answer"]
    finally:
        runtime.shutdown()
    assert runtime.process.poll() is not None
