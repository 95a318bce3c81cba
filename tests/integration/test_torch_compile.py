"""--enable-torch-compile (decode steps padded to batch-size buckets, compiled by inductor) gives
the same greedy tokens as the eager path, and the eager float32 path still equals transformers."""
from __future__ import annotations

import random

import pytest

from kvyard import Engine


@pytest.mark.slow
def test_compiled_decode_equals_eager(tiny_models, hf_greedy):
    path, hf_model = tiny_models["llama"]
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 256) for _ in range(n)] for n in (4, 9, 23)]
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    expected = [hf_greedy(hf_model, p, 12) for p in prompts]
    with Engine(model_path=path, dtype="float32", skip_tokenizer_init=True, enable_torch_compile=True,
                torch_compile_max_bs=4, max_total_tokens=1024, log_level="warning") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)   # 3 rows pad to bucket 4
        one = engine.generate(input_ids=prompts[1], sampling_params=params)  # bucket 1
    assert [o["output_ids"] for o in outs] == expected
    assert one["output_ids"] == expected[1]


@pytest.mark.slow
def test_compiled_decode_equals_eager_on_kept_quantized_smollm2(smollm2_path):
    """The GGUF kernels and the CPU paged-decode kernel run inside the compiled step (custom ops
    with fake shapes): greedy tokens equal the eager step's."""
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 49152) for _ in range(n)] for n in (5, 17, 40)]
    params = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    runs = []
    for compiled in (False, True):
        with Engine(model_path=smollm2_path, quantization="gguf", dtype="float32", skip_tokenizer_init=True,
                    enable_torch_compile=compiled, torch_compile_max_bs=4, max_total_tokens=2048,
                    log_level="warning") as engine:
            runs.append([o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)])
    assert runs[1] == runs[0]
