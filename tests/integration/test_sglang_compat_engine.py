"""SGLang's offline-engine client code against kvyard.Engine: SGLang's argument names, the
tokenizer path of its function-calling example, --incremental-streaming-output, and
--is-embedding on a causal LM (last-token pooling, checked against transformers)."""
from __future__ import annotations

import json

import pytest
import torch

from kvyard import Engine


CHATML_JSON = {"name": "chatml-json", "system": "<|im_start|>system", "user": "<|im_start|>user",
               "assistant": "<|im_start|>assistant", "sep_style": "CHATML", "sep": "<|im_end|>",
               "stop_str": ["<|im_end|>"]}


@pytest.fixture(scope="module")
def engine(smollm2_path, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chatml.json"   # SGLang's conversation format
    template.write_text(json.dumps(CHATML_JSON))
    with Engine(model_path=smollm2_path, dtype="float32", max_total_tokens=4096, tp_size=1, dp_size=1,
                incremental_streaming_output=True, enable_custom_logit_processor=True,
                chat_template=str(template), log_level="warning") as e:
        yield e


def test_sglang_engine_arguments(smollm2_path):
    with pytest.raises(ValueError, match="ep_size is not supported by kvyard"):
        Engine(model_path=smollm2_path, ep_size=2)


def test_tokenizer_manager_tokenizer_with_a_conversation_json_template(engine):
    tok = engine.tokenizer_manager.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, add_generation_prompt=True)
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 3, "temperature": 0})
    assert out["meta_info"]["completion_tokens"] == 3


def test_incremental_streaming_output(engine):
    params = {"max_new_tokens": 12, "temperature": 0}
    full = engine.generate("Write a haiku about rain.", params)
    chunks = list(engine.generate("Write a haiku about rain.", params, stream=True))
    assert len(chunks) > 1
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]


def test_generate_takes_sglang_keyword_fields(engine):
    out = engine.generate("Hi", {"max_new_tokens": 2, "custom_params": {"token_id": 42}},
                          custom_logit_processor="force_token", lora_path=None, return_hidden_states=False)
    assert out["output_ids"] == [42, 42]
    with pytest.raises(Exception, match="return_hidden_states: .* start it with --enable-return-hidden-states"):
        engine.generate("Hi", {"max_new_tokens": 2}, return_hidden_states=True)


def test_is_embedding_on_a_causal_lm_is_last_token_pooling(smollm2_path, hf_smollm2):
    model, tokenizer = hf_smollm2
    texts = ["The weather is lovely today.", "Paris"]
    with Engine(model_path=smollm2_path, dtype="float32", max_total_tokens=2048, is_embedding=True,
                log_level="warning") as e:
        outs = e.encode(texts, model="smollm2")
    for text, out in zip(texts, outs):
        ids = torch.tensor([e.tokenizer.encode(text)])
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
        ref = torch.nn.functional.normalize(hidden.float(), dim=-1)
        assert torch.allclose(torch.tensor(out["embedding"]), ref, atol=1e-4)
