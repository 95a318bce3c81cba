"""SamplingParams: from_dict type checks, verify range checks, normalize canonical forms."""
import pytest

from kvyard.sampling.params import SamplingParams

VOCAB = 100


def verified(**kwargs) -> SamplingParams:
    params = SamplingParams.from_dict(kwargs)
    params.verify(VOCAB)
    return params


def test_defaults_match_sglang():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.n) == (128, 1.0, 1.0, -1, 0.0, 1)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.skip_special_tokens and p.spaces_between_special_tokens and not p.ignore_eos
    p.verify(VOCAB)


def test_from_dict_rejects_unknown_key():
    with pytest.raises(ValueError, match="unknown sampling parameter 'foo'"):
        SamplingParams.from_dict({"temperature": 0.5, "foo": 1})


def test_from_dict_rejects_derived_field():
    with pytest.raises(ValueError, match="'stop_str_max_len'"):
        SamplingParams.from_dict({"stop_str_max_len": 3})


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("top_p", [1]), ("top_k", 1.5), ("top_k", True), ("min_p", "x"),
    ("max_new_tokens", "10"), ("n", 2.0), ("stop", 3), ("stop_token_ids", 7), ("ignore_eos", 1),
    ("seed", "42"), ("logit_bias", [1, 2]), ("regex", 5), ("json_schema", 5), ("custom_params", "x"),
    ("frequency_penalty", "0.1"), ("repetition_penalty", False), ("min_new_tokens", 1.0),
])
def test_from_dict_wrong_type_names_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams.from_dict({field: value})


def test_from_dict_none_means_default_and_ints_are_numbers():
    p = SamplingParams.from_dict({"temperature": None, "top_p": 1, "seed": None, "max_new_tokens": 5})
    assert p.temperature == 1.0 and p.top_p == 1 and p.seed is None and p.max_new_tokens == 5


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k"),
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"min_new_tokens": 20, "max_new_tokens": 10}, "min_new_tokens"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"frequency_penalty": -2.1}, "frequency_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": 2.5}, "repetition_penalty"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids"), ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"), ({"logit_bias": {str(VOCAB): 1.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"logit_bias": {"5": "big"}}, "logit_bias"),
    ({"regex": "a+", "json_schema": "{}"}, "json_schema"),
    ({"ebnf": "root ::= 'a'", "regex": "a"}, "regex"),
])
def test_verify_rejects_out_of_range_with_field_name(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        verified(**kwargs)
    message = str(err.value)
    assert "\n" not in message
    assert message.split(" ", 1)[0].strip(":") in kwargs  # first word names a field


def test_verify_checks_types_of_directly_built_params():
    with pytest.raises(ValueError, match="^top_k must be an integer"):
        SamplingParams(top_k="5").verify(VOCAB)


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0}, {"top_p": 1.0}, {"top_k": 1}, {"min_p": 1.0}, {"repetition_penalty": 2.0},
    {"frequency_penalty": -2, "presence_penalty": 2}, {"min_new_tokens": 128},
    {"logit_bias": {"0": -100, 99: 5.5}}, {"stop_token_ids": [0, 99]}, {"regex": "a+"},
    {"stop": "x"}, {"stop": ["a", "b"]},
])
def test_verify_accepts_edges(kwargs):
    verified(**kwargs)


def test_normalize_greedy_and_stop_forms():
    p = verified(temperature=0.0, stop="END", stop_token_ids=[3, 3, 4], logit_bias={"7": 2}).normalize()
    assert (p.temperature, p.top_k) == (1.0, 1) and p.is_greedy
    assert p.stop == ["END"] and p.stop_token_ids == {3, 4}
    assert p.logit_bias == {7: 2.0}
    assert p.stop_str_max_len == 3  # no tokenizer: characters, an upper bound on tokens


def test_normalize_keeps_sampling_temperature_and_empty_stop():
    p = verified(temperature=0.7).normalize()
    assert (p.temperature, p.top_k, p.stop, p.stop_token_ids) == (0.7, -1, [], set())
    assert not p.is_greedy and p.stop_str_max_len == 0


def test_normalize_counts_stop_tokens_with_tokenizer():
    class TwoCharTokenizer:
        def encode(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return [0] * ((len(text) + 1) // 2)

    p = verified(stop=["abcde", "xy"]).normalize(TwoCharTokenizer())
    assert p.stop_str_max_len == 3


def test_normalize_serializes_dict_schema():
    p = verified(json_schema={"type": "object"}).normalize()
    assert p.json_schema == '{"type": "object"}'
