"""SGLang's offline-engine code for the flags kvyard honours (examples/runtime/hidden_states and
its test: input_ids in, skip_tokenizer_init, hidden states compared with transformers), on a tiny
random Llama: Engine(enable_return_hidden_states=True) with per-request return_hidden_states,
older SGLang's Engine(return_hidden_states=True), --enable-mixed-chunk, and
--delete-ckpt-after-loading; --base-gpu-id refused on the CPU naming the flag."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from kvyard import Engine

PROMPTS = [[5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13]]   # "Today is", "Today is a sunny day and I like"


def hf_hidden(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]


def rows_of(states: list) -> torch.Tensor:
    """SGLang's docs' concatenation: the prompt's rows, then one row per output token."""
    return torch.cat([torch.tensor(s).unsqueeze(0) if torch.tensor(s).dim() == 1 else torch.tensor(s)
                      for s in states])


def check_outputs(model, outputs, max_new_tokens: int) -> None:
    for input_ids, output in zip(PROMPTS, outputs):
        states = output["meta_info"]["hidden_states"]
        assert len(states) == max_new_tokens and all(isinstance(s, list) for s in states)
        torch.testing.assert_close(rows_of(states), hf_hidden(model, input_ids + output["output_ids"][:-1]),
                                   atol=1e-4, rtol=1e-4)
    assert len(outputs[1]["meta_info"]["hidden_states"][0]) > len(outputs[0]["meta_info"]["hidden_states"][0])


def test_return_hidden_states_offline(tiny_models, tmp_path):
    path, model = tiny_models["llama"]
    copy = shutil.copytree(path, tmp_path / "llama")
    sampling_params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    with Engine(model_path=str(copy), dtype="float32", skip_tokenizer_init=True, random_seed=42,
                enable_return_hidden_states=True, enable_mixed_chunk=True, delete_ckpt_after_loading=True,
                max_total_tokens=1024, log_level="warning") as engine:
        assert not os.path.exists(copy)                        # --delete-ckpt-after-loading
        outputs = engine.generate(input_ids=PROMPTS, sampling_params=sampling_params, return_hidden_states=True)
        check_outputs(model, outputs, 8)
        plain = engine.generate(input_ids=PROMPTS, sampling_params=sampling_params, return_hidden_states=False)
        assert all("hidden_states" not in o["meta_info"] for o in plain)
        assert [o["output_ids"] for o in plain] == [o["output_ids"] for o in outputs]
        chunks = list(engine.generate(input_ids=PROMPTS[0], sampling_params=sampling_params,
                                      return_hidden_states=True, stream=True))
        torch.testing.assert_close(rows_of(chunks[-1]["meta_info"]["hidden_states"]),
                                   rows_of(outputs[0]["meta_info"]["hidden_states"]), atol=1e-5, rtol=1e-5)


def test_older_engine_argument_returns_hidden_states_for_every_request(tiny_models):
    path, model = tiny_models["llama"]
    with Engine(model_path=path, dtype="float32", skip_tokenizer_init=True, return_hidden_states=True,
                max_total_tokens=1024, log_level="warning") as llm:
        outputs = llm.generate(input_ids=PROMPTS, sampling_params={"temperature": 0, "max_new_tokens": 3})
    check_outputs(model, outputs, 3)


def test_base_gpu_id_needs_a_gpu_and_the_default_model_is_never_deleted(tiny_models):
    path, _ = tiny_models["llama"]
    with pytest.raises(ValueError, match="base_gpu_id: 1 .*the device is cpu"):
        Engine(model_path=path, device="cpu", base_gpu_id=1)
    with pytest.raises(ValueError, match="delete_ckpt_after_loading: refusing to delete the built-in default model"):
        Engine(delete_ckpt_after_loading=True)
