"""Structured output end to end: SmolLM2-135M-Instruct through kvyard.Engine at temperature 1.0.

Every constrained output must be in its language: 50 of 50 under a JSON schema (validated with
jsonschema), a regex and an EBNF grammar. The engine's KV pool is small and its admission eager,
so the 50-wide batches retract requests mid-output; grammar state must survive that. Also:
streaming, a batch mixing constrained and unconstrained requests, JSON mode, and bad grammars
as 400s that never reach the scheduler.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from kvyard import Engine
from kvyard.errors import RequestError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 16},
                                   "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                    "required": ["city", "zip"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
EBNF = 'root ::= answer " because " reason "."\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{1,30}'
EBNF_LANGUAGE = r"(yes|no) because [a-z ]{1,30}\."
SAMPLED = {"temperature": 1.0, "max_new_tokens": 256}  # SCHEMA takes 45-109 tokens sampled


@pytest.fixture(scope="module")
def engine(smollm2_path):
    with Engine(model_path=smollm2_path, dtype="float32", max_total_tokens=2500, chunked_prefill_size=128,
                schedule_conservativeness=0.05, random_seed=0, log_level="warning") as e:
        yield e


def chat(engine, text: str) -> list[int]:
    out = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def assert_all_stop(outs: list[dict]) -> None:
    reasons = [o["meta_info"]["finish_reason"] for o in outs]
    assert all(r["type"] == "stop" for r in reasons), [r for r in reasons if r["type"] != "stop"]


def test_json_schema_50_of_50_with_n_and_retraction(engine):
    before = engine.get_server_info()["retractions"]
    outs = engine.generate(input_ids=chat(engine, "Describe one user of our web shop as JSON."),
                           sampling_params={**SAMPLED, "json_schema": SCHEMA, "n": 50})
    assert len(outs) == 50
    assert_all_stop(outs)
    for out in outs:
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert len({o["text"] for o in outs}) > 25  # sampled, not one answer repeated
    assert engine.get_server_info()["retractions"] > before, "the small pool was meant to force retractions"


def test_regex_50_of_50(engine):
    prompts = [chat(engine, f"Customer {i} asks for our support phone number. Reply with it.") for i in range(50)]
    outs = engine.generate(input_ids=prompts, sampling_params={**SAMPLED, "regex": PHONE})
    assert_all_stop(outs)
    assert all(re.fullmatch(PHONE, o["text"]) for o in outs), [o["text"] for o in outs]


def test_ebnf_50_of_50(engine):
    prompts = [chat(engine, f"Question {i}: is the sky blue? Answer yes or no and say why.") for i in range(50)]
    outs = engine.generate(input_ids=prompts, sampling_params={**SAMPLED, "ebnf": EBNF})
    assert_all_stop(outs)
    assert all(re.fullmatch(EBNF_LANGUAGE, o["text"]) for o in outs), [o["text"] for o in outs]


def test_streaming_is_constrained(engine):
    chunks = list(engine.generate(input_ids=chat(engine, "What is your phone number?"),
                                  sampling_params={**SAMPLED, "regex": PHONE, "seed": 3}, stream=True))
    text = chunks[-1]["text"]  # chunks are cumulative
    assert len(chunks) > 1 and re.fullmatch(PHONE, text)
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "stop"


def test_constrained_and_unconstrained_in_one_batch(engine):
    free = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    prompts = [chat(engine, "Describe a user as JSON."), chat(engine, "Tell me about Paris."),
               chat(engine, "What is your phone number?")]
    alone = engine.generate(input_ids=prompts[1], sampling_params=free)
    outs = engine.generate(input_ids=prompts, sampling_params=[{**SAMPLED, "json_schema": SCHEMA}, free,
                                                              {**SAMPLED, "regex": PHONE}])
    jsonschema.validate(json.loads(outs[0]["text"]), SCHEMA)
    assert outs[1]["output_ids"] == alone["output_ids"]   # no mask leaks into unconstrained rows
    assert re.fullmatch(PHONE, outs[2]["text"])


def test_json_object_mode(engine):
    """OpenAI's response_format {"type": "json_object"} arrives as this schema."""
    outs = engine.generate(input_ids=chat(engine, "Give me a JSON object with a name and an age."),
                           sampling_params={"temperature": 0, "max_new_tokens": 128, "json_schema": '{"type": "object"}'})
    assert outs["meta_info"]["finish_reason"]["type"] == "stop"
    assert isinstance(json.loads(outs["text"]), dict)


@pytest.mark.parametrize("params, field, words", [
    ({"json_schema": '{"type": "objekt"}'}, "json_schema", 'Unsupported type "objekt"'),
    ({"json_schema": "{not json"}, "json_schema", "Failed to parse JSON"),
    ({"regex": "[0-9"}, "regex", "Unclosed '['"),
    ({"ebnf": "root ::= missing"}, "ebnf", 'Rule "missing" is not defined'),
])
def test_bad_grammars_are_400_with_the_compilers_message(engine, params, field, words):
    with pytest.raises(RequestError) as info:
        engine.generate("Hi", {"max_new_tokens": 4, **params})
    assert info.value.status == 400 and info.value.param == field
    assert info.value.message.startswith(f"{field}: ") and words in info.value.message


def test_two_grammars_at_once_is_400(engine):
    with pytest.raises(RequestError, match="only one of"):
        engine.generate("Hi", {"max_new_tokens": 4, "regex": "a", "ebnf": 'root ::= "a"'})
