"""The thinking-token budget: the scheduler-side state machine, the sampling fields, the effort
mapping and the reasoning parsers' markers."""
from types import SimpleNamespace

import pytest

from kvyard.errors import RequestError
from kvyard.parsers import ReasoningParserFacade
from kvyard.sampling.params import SamplingParams
from kvyard.scheduler.req import Req
from kvyard.scheduler.thinking_budget import enforce_thinking_budget
from kvyard.server.reasoning_budget import EFFORT_BUDGETS, effort_budget, thinking_fields

END = [900, 901]


def _run(sampled: list[int], budget: int, start=()) -> list[int]:
    """Feeds ``sampled`` one token at a time as the scheduler does; returns what was kept."""
    req = Req("r", [1, 2], SamplingParams(thinking_budget=budget, thinking_start_ids=list(start),
                                          thinking_end_ids=END))
    for token in sampled:
        req.output_ids.append(token)
        enforce_thinking_budget(req)
    return req.output_ids


def test_budget_forces_the_end_marker_after_that_many_thinking_tokens():
    assert _run([5, 6, 7, 8, 9, 10], budget=3) == [5, 6, 7, 900, 901, 10]


def test_zero_budget_closes_at_once():
    assert _run([5, 6, 7], budget=0) == [900, 901, 7]


def test_a_model_that_closes_in_time_is_left_alone():
    assert _run([5, 900, 901, 8, 9, 10, 11], budget=3) == [5, 900, 901, 8, 9, 10, 11]


def test_counting_starts_at_the_start_marker():
    assert _run([5, 6, 700, 7, 8, 9, 10, 11], budget=2, start=[700]) == [5, 6, 700, 7, 8, 900, 901, 11]
    assert _run([5, 6, 7, 8], budget=0, start=[700]) == [5, 6, 7, 8]  # never opened: never cut


def test_without_a_budget_nothing_changes():
    req = Req("r", [1], SamplingParams())
    req.output_ids.append(5)
    enforce_thinking_budget(req)
    assert req.output_ids == [5] and req.thinking is None


@pytest.mark.parametrize("fields, message", [
    ({"thinking_budget": -1, "thinking_end_ids": [1]}, "thinking_budget must be >= 0"),
    ({"thinking_budget": 4}, "thinking_end_ids: required"),
    ({"thinking_budget": 4, "thinking_end_ids": [10 ** 9]}, "thinking_end_ids entry"),
    ({"thinking_budget": "4", "thinking_end_ids": [1]}, "thinking_budget must be an integer"),
])
def test_bad_budget_fields_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_dict(fields).verify(vocab_size=1000)


def test_effort_maps_to_a_budget_and_unknown_efforts_are_refused():
    assert effort_budget("low", "reasoning_effort") == EFFORT_BUDGETS["low"] < EFFORT_BUDGETS["high"]
    assert effort_budget(None, "reasoning_effort") is None
    with pytest.raises(RequestError) as err:
        effort_budget("extreme", "reasoning.effort")
    assert err.value.param == "reasoning.effort"


@pytest.mark.parametrize("name, force, markers", [
    ("deepseek-r1", None, (None, "</think>")), ("qwen3", None, ("<think>", "</think>")),
    ("qwen3", True, (None, "</think>")), ("kimi", None, ("◁think▷", "◁/think▷"))])
def test_every_reasoning_parser_names_its_markers(name, force, markers):
    assert ReasoningParserFacade(name, force_reasoning=force).thinking_markers() == markers


def test_thinking_fields_tokenize_the_parser_markers():
    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: [len(text), 7])
    ctx = SimpleNamespace(args=SimpleNamespace(reasoning_parser="qwen3"), tm=SimpleNamespace(tokenizer=tokenizer))
    assert thinking_fields(ctx, 12) == {"thinking_budget": 12, "thinking_start_ids": [7, 7],
                                        "thinking_end_ids": [8, 7]}
    assert thinking_fields(ctx, None) == {}
    ctx.args.reasoning_parser = None
    assert thinking_fields(ctx, 12) == {}  # no thinking format: nothing to bound


def _chat_ctx(reasoning_parser):
    from kvyard.frontend.tokenizer_manager import TokenizerManager
    from kvyard.server.context import ServerContext
    from tiny_tokenizer import build_tokenizer

    tokenizer = build_tokenizer(("<s>", "</s>", "<think>", "</think>"), eos="</s>", bos="<s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tm = TokenizerManager(tokenizer, {"context_length": 256, "vocab_size": len(tokenizer)}, "inproc://a",
                          "inproc://b", lambda: True)
    args = SimpleNamespace(tool_call_parser=None, reasoning_parser=reasoning_parser)
    return ServerContext(args=args, engine=SimpleNamespace(args=args), tm=tm)


def test_chat_reasoning_effort_reaches_the_sampling_params():
    from kvyard.server.openai_chat import prepare_chat
    from kvyard.server.protocol import ChatCompletionRequest

    ctx = _chat_ctx("deepseek-r1")
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "ab"}], max_tokens=8, reasoning_effort="low")
    params = prepare_chat(ctx, request)[0][0].sampling_params
    end = ctx.tm.tokenizer.encode("</think>", add_special_tokens=False)
    assert len(end) == 1 and (params.thinking_budget, params.thinking_start_ids, params.thinking_end_ids) == (1024, [], end)
    # the other APIs' own budget field wins; without a reasoning parser nothing is set
    assert prepare_chat(ctx, request, thinking_budget=5)[0][0].sampling_params.thinking_budget == 5
    assert prepare_chat(_chat_ctx(None), request)[0][0].sampling_params.thinking_budget is None
    with pytest.raises(RequestError) as err:
        prepare_chat(ctx, request.model_copy(update={"reasoning_effort": "lots"}))
    assert err.value.param == "reasoning_effort"
