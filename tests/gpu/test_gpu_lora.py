"""Multi-LoRA serving on a CUDA device (skipped elsewhere): the fused form (the slots' A rows in
the base GEMM, one expand launch) against the torch path, compiled for the GPU — the expand
kernel in bf16 at Llama-3.1-8B widths on a row-strided y, and a tiny Llama served with the
Triton backend through CUDA graphs giving PEFT's greedy tokens (float32) for a batch mixing
three adapters and the base model.
"""
from __future__ import annotations


import pytest
import torch

from gpu_guard import require_gpu

require_gpu()

from kvyard.kernels.triton_ops.lora import lora_expand_fused  # noqa: E402
from kvyard.lora.batch import build_batch_info  # noqa: E402
from kvyard.lora.ops import lora_torch  # noqa: E402


@pytest.mark.parametrize("fan_in,sizes", [(4096, [4096, 1024, 1024]), (4096, [14336, 14336]), (14336, [4096])])
@pytest.mark.parametrize("seg_lens,slots", [([1] * 64, [i % 9 - 1 for i in range(64)]), ([37, 1, 90], [3, -1, 7])])
def test_fused_expand_bf16(fan_in, sizes, seg_lens, slots):
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev, dt, rank, num_slots = "cuda", torch.bfloat16, 16, 8
    n, out, t = len(sizes), sum(sizes), sum(seg_lens)
    x = torch.randn(t, fan_in, device=dev, dtype=dt, generator=gen)
    a = torch.randn(num_slots, n * rank, fan_in, device=dev, dtype=dt, generator=gen) / fan_in ** 0.5
    b = torch.randn(num_slots, out, rank, device=dev, dtype=dt, generator=gen) * 0.1
    info = build_batch_info(slots, seg_lens, dev)
    y_ext = torch.cat([torch.zeros(t, out, device=dev, dtype=dt), x @ a.reshape(-1, fan_in).t()], dim=1)
    got = lora_expand_fused(y_ext[:, out:], b, y_ext[:, :out], sizes, info.seg_indptr, info.seg_slots,
                            info.max_seg_len)
    want = lora_torch(x.float(), torch.zeros(t, out, device=dev), a.float(), b.float(), sizes, info)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_fused_serving_through_graphs_matches_peft(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from kvyard.executor.cuda_graph_runner import CudaGraphCapture
    from lora_fixtures import make_adapters, peft_greedy, peft_model, run, tiny_base
    from kvyard.scheduler.process import build_scheduler
    from kvyard.server_args import ServerArgs

    base = tiny_base("llama", str(tmp_path / "base"))
    adapters = make_adapters(base, str(tmp_path))
    scheduler = build_scheduler(ServerArgs(
        model_path=str(tmp_path / "base"), device="cuda", dtype="float32", skip_tokenizer_init=True,
        max_total_tokens=256, max_running_requests=4, attention_backend="triton", lora_backend="triton",
        log_level="warning", debug_kv_integrity=True, lora_paths=[f"{n}={p}" for n, p in adapters.items()]))
    runner = scheduler.runner
    assert runner.decode_graphs is not None and runner.decode_graphs.sizes
    assert all(t.layer.lora_hook.fused for t in runner.lora.targets.values())
    prompts = {"qv": [5, 17, 33, 2, 9, 41, 7], "all": [3, 99, 14, 27, 8, 61, 22, 5], "mlp": [120, 7, 7, 44],
               None: [5, 17, 33, 2, 9, 41, 7]}
    replays, replay = [], CudaGraphCapture.replay
    monkeypatch.setattr(CudaGraphCapture, "replay", lambda self: replays.append(1) or replay(self))
    got = run(scheduler, [(f"r-{name}", prompt, name) for name, prompt in prompts.items()], steps=6)
    for name, prompt in prompts.items():
        tokens, logprobs = peft_greedy(base if name is None else peft_model(base, adapters[name]), prompt, 6)
        assert got[f"r-{name}"][0] == tokens, name
        assert got[f"r-{name}"][1] == pytest.approx(logprobs, abs=2e-3), name
    assert replays, "no decode step replayed a CUDA graph"
    scheduler.close()
