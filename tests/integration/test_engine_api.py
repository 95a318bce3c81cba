"""The offline Engine API: outputs, sampling contracts, streaming, bad input, abort."""
from __future__ import annotations

import asyncio

import pytest

from kvyard import Engine
from kvyard.errors import RequestError


@pytest.fixture(scope="module")
def engine(smollm2_path):
    with Engine(model_path=smollm2_path, dtype="float32", max_total_tokens=8192, chunked_prefill_size=64,
                log_level="warning") as e:
        yield e


def test_output_shape(engine):
    out = engine.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["completion_tokens"] == len(out["output_ids"]) <= 8
    assert meta["prompt_tokens"] > 0 and "cached_tokens" in meta
    assert meta["finish_reason"]["type"] in ("stop", "length")
    assert out["text"] == engine.tokenizer.decode(out["output_ids"], skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(engine):
    params = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95, "seed": 1234}
    a = engine.generate("Tell me a story about a dragon.", params)
    filler = ["Write a poem.", "Hello there!", "Tell me a story about a dragon."]
    b = engine.generate(filler, [{"max_new_tokens": 5}, {"max_new_tokens": 9}, params])[2]
    assert a["output_ids"] == b["output_ids"]  # same seed, different batch
    c = engine.generate("Tell me a story about a dragon.", {**params, "seed": 99})
    assert c["output_ids"] != a["output_ids"]


def test_stop_strings_never_leak(engine):
    base = engine.generate("Count from one to ten in words:", {"max_new_tokens": 40, "temperature": 0})
    text = base["text"]
    stop = text.strip().split()[2]  # a word the model is going to say
    out = engine.generate("Count from one to ten in words:", {"max_new_tokens": 40, "temperature": 0, "stop": stop})
    assert stop not in out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert text.startswith(out["text"])
    chunks = list(engine.generate("Count from one to ten in words:",
                                  {"max_new_tokens": 40, "temperature": 0, "stop": stop}, stream=True))
    assert chunks[-1]["text"] == out["text"]  # cumulative chunks, as SGLang streams
    assert all(stop not in c["text"] and out["text"].startswith(c["text"]) for c in chunks)


def test_n_returns_n_outputs(engine):
    outs = engine.generate("Name a color.", {"max_new_tokens": 6, "temperature": 1.0, "n": 3, "seed": 7})
    assert isinstance(outs, list) and len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


def test_streaming_matches_non_streaming(engine):
    params = {"max_new_tokens": 20, "temperature": 0}
    full = engine.generate("Explain rain in one sentence.", params)
    chunks = list(engine.generate("Explain rain in one sentence.", params, stream=True))
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    assert all(full["output_ids"][:len(c["output_ids"])] == c["output_ids"] for c in chunks)
    assert chunks[-1]["meta_info"]["finish_reason"] is not None


def test_async_generate_and_stream(engine):
    async def main():
        one = await engine.async_generate("Say hi.", {"max_new_tokens": 5, "temperature": 0})
        stream = await engine.async_generate("Say hi.", {"max_new_tokens": 5, "temperature": 0}, stream=True)
        text = [c["text"] async for c in stream][-1]
        return one, text
    one, text = asyncio.run(main())
    assert one["text"] == text


def test_logprobs(engine):
    out = engine.generate("The sky is", {"max_new_tokens": 4, "temperature": 0}, return_logprob=True,
                          top_logprobs_num=3, logprob_start_len=0, return_text_in_logprobs=True)
    meta = out["meta_info"]
    assert len(meta["output_token_logprobs"]) == 4
    lp, tid, text = meta["output_token_logprobs"][0]
    assert tid == out["output_ids"][0] and lp <= 0 and isinstance(text, str)
    assert meta["output_top_logprobs"][0][0][1] == tid  # greedy: the top token was chosen
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["input_token_logprobs"][0][0] is None


@pytest.mark.parametrize("params, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"), ({"max_new_tokens": -1}, "max_new_tokens"), ({"stop": 5}, "stop"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_sampling_params_name_the_field(engine, params, field):
    with pytest.raises(RequestError, match=field) as exc:
        engine.generate("hi", params)
    assert "\n" not in str(exc.value)


def test_bad_prompts(engine):
    with pytest.raises(RequestError, match="text: the prompt is empty"):
        engine.generate("", {})
    with pytest.raises(RequestError, match="context length") as exc:
        engine.generate(input_ids=[1] * 10000)
    assert exc.value.status == 413
    out = engine.generate("still serving?", {"max_new_tokens": 2, "ignore_eos": True})  # the engine keeps serving
    assert out["meta_info"]["completion_tokens"] == 2


def test_abort_frees_slots(engine):
    stream = engine.generate("Write a long essay about the ocean.", {"max_new_tokens": 400, "ignore_eos": True},
                             stream=True)
    next(stream)
    stream.close()  # the consumer stops: the request is aborted
    engine.generate("ok", {"max_new_tokens": 1})
    info = engine.get_server_info()
    assert info["num_running_reqs"] == 0
    engine.check_kv_integrity()
    assert engine.flush_cache()


def test_auto_truncate(smollm2_path):
    with Engine(model_path=smollm2_path, dtype="float32", context_length=64, allow_auto_truncate=True,
                max_total_tokens=1024, log_level="warning") as e:
        out = e.generate(input_ids=[100] * 200, sampling_params={"max_new_tokens": 4})
        assert out["meta_info"]["prompt_tokens"] == 63


def test_bad_model_path():
    with pytest.raises(ValueError, match="model_path"):
        Engine(model_path="/no/such/model")
