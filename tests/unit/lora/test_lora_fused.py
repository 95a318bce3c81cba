"""The fused-shrink form of a LoRA target (kvyard.lora.hook): an unquantized Linear's weight
re-allocated with every slot's A rows after its own, one GEMM, the expand into the row-strided
base output — equal to the unfused shrink + expand (float32, CPU; the torch form, and the Triton
kernels under the interpreter), with the base weight, bias and output layout kept."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch

from kvyard.layers.linear import Linear
from kvyard.lora.batch import build_batch_info
from kvyard.lora.hook import LoRAHook, LoRARuntime
from kvyard.lora.ops import lora_torch

SIZES, IN, RANK, SLOTS = [32, 16, 16], 24, 8, 3


def _layers(gen):
    ref = Linear(IN, SIZES, bias=True)
    ref.weight.data.copy_(torch.randn(sum(SIZES), IN, generator=gen))
    ref.bias.data.copy_(torch.randn(sum(SIZES), generator=gen))
    fused = Linear(IN, SIZES, bias=True)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("seg_lens,slots", [([1] * 5, [2, -1, 0, 2, 1]), ([4, 1, 6], [1, -1, 0])])
def test_fused_linear_matches_unfused(backend, seg_lens, slots):
    if backend == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(len(seg_lens))
    ref, layer = _layers(gen)
    a = torch.randn(SLOTS, len(SIZES) * RANK, IN, generator=gen)
    b = torch.randn(SLOTS, sum(SIZES), RANK, generator=gen)
    base_weight = ref.weight.detach().clone()
    rows = layer.method.extend_rows(layer, SLOTS * len(SIZES) * RANK)
    assert rows.shape == (SLOTS * len(SIZES) * RANK, IN) and torch.count_nonzero(rows) == 0
    assert layer.method.extend_rows(layer, rows.shape[0]).data_ptr() == rows.data_ptr()   # idempotent
    assert layer.weight.is_contiguous() and torch.equal(layer.weight, base_weight)
    assert layer.weight.data_ptr() == layer.weight_ext.data_ptr() and torch.equal(layer.bias, ref.bias)
    rows.copy_(a.reshape(rows.shape))
    runtime = LoRARuntime(backend)
    layer.lora_hook = LoRAHook(runtime, rows.view(a.shape), b, SIZES, fused=True)
    x = torch.randn(sum(seg_lens), IN, generator=gen)
    runtime.bind(None)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)     # no batch: the base rows only
    info = build_batch_info(slots, seg_lens, "cpu")
    runtime.bind(info)
    got = layer(x)
    assert got.shape == (x.shape[0], sum(SIZES)) and got.stride(0) == sum(SIZES) + rows.shape[0]
    want = lora_torch(x, ref(x), a, b, SIZES, info)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    q, k, v = layer.split(got)                                      # consumers take the strided view
    torch.testing.assert_close(torch.cat([q, k, v], 1), want, rtol=1e-5, atol=1e-5)


def test_manager_fuses_only_where_the_weight_carries_rows(tmp_path):
    """Triton backend: unquantized targets fuse, their pool A is the weight's tail (writes land in
    the GEMM's rows); the torch backend keeps the unfused form."""
    from lora_fixtures import make_adapters, tiny_base
    from kvyard.lora.config import LoRAConfig, TARGET_MODULES
    from kvyard.lora.manager import LoRAManager
    from kvyard.scheduler.process import build_scheduler
    from kvyard.server_args import ServerArgs

    base = tiny_base("llama", str(tmp_path / "base"))
    scheduler = build_scheduler(ServerArgs(model_path=str(tmp_path / "base"), dtype="float32",
                                           skip_tokenizer_init=True, max_total_tokens=128, log_level="warning"))
    model = scheduler.runner.model
    adapters = make_adapters(base, str(tmp_path))
    for backend, fused in (("torch", False), ("triton", True)):
        config = LoRAConfig(max_loras_per_batch=2, max_lora_rank=8, target_modules=TARGET_MODULES,
                            backend=backend, adapters=())
        manager = LoRAManager(config, model, torch.float32, "cpu")
        for key, t in manager.targets.items():
            assert t.layer.lora_hook.fused is fused
            if fused:
                out = t.layer.out_features
                assert manager.pool.a[key].data_ptr() == t.layer.weight_ext[out:].data_ptr()
        name = next(iter(adapters))
        manager.load(name, adapters[name])
        slot = manager.acquire(name)
        t = next(t for t in manager.targets.values() if t.peft_name(0) in manager.adapters[name].modules)
        if fused:   # the adapter's q_proj lora_A sits in the GEMM's rows of its slot
            la = manager.adapters[name].modules[t.peft_name(0)][0]
            start = t.layer.out_features + slot * len(t.shard_modules) * 8
            assert torch.equal(t.layer.weight_ext[start:start + la.shape[0]], la)
            ext = t.layer.weight_ext
            manager.attach(model)                  # again (as after a weight update): nothing moves
            assert t.layer.weight_ext is ext and torch.equal(ext[start:start + la.shape[0]], la)
    scheduler.close()


def test_triton_consumers_take_the_row_strided_output():
    """What reads a fused target's output on CUDA — the rotary, silu-and-mul and rmsnorm (+
    residual) kernels — gives the same on y_ext[:, :out] as on a contiguous copy (interpreter)."""
    pytest.importorskip("triton")
    from kvyard.kernels.triton_ops.activation import silu_and_mul
    from kvyard.kernels.triton_ops.rmsnorm import rmsnorm
    from kvyard.kernels.triton_ops.rotary import apply_rotary

    gen = torch.Generator().manual_seed(0)
    t, out = 5, 32
    y = torch.randn(t, out + 48, generator=gen)[:, :out]              # row stride 80, as y_ext's
    assert not y.is_contiguous()
    dense = y.contiguous()
    torch.testing.assert_close(silu_and_mul(y), silu_and_mul(dense), rtol=0, atol=0)
    weight, residual = torch.randn(out, generator=gen), torch.randn(t, out, generator=gen)
    for a, b in zip(rmsnorm(y, weight, 1e-6, residual), rmsnorm(dense, weight, 1e-6, residual)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cos, sin = torch.randn(t, 4, generator=gen), torch.randn(t, 4, generator=gen)
    torch.testing.assert_close(apply_rotary(y.view(t, 4, 8), cos, sin), apply_rotary(dense.view(t, 4, 8), cos, sin),
                               rtol=0, atol=0)


def test_fused_serving_matches_peft(tmp_path):
    """The Triton backend (interpreter) serves every unquantized layer fused: one batch mixing
    three adapters and the base model, chunked prefill, gives PEFT's greedy tokens."""
    pytest.importorskip("triton")
    from lora_fixtures import make_adapters, peft_greedy, peft_model, run, tiny_base
    from kvyard.scheduler.process import build_scheduler
    from kvyard.server_args import ServerArgs

    base = tiny_base("llama", str(tmp_path / "base"))
    adapters = make_adapters(base, str(tmp_path))
    scheduler = build_scheduler(ServerArgs(
        model_path=str(tmp_path / "base"), dtype="float32", skip_tokenizer_init=True, max_total_tokens=256,
        chunked_prefill_size=8, lora_backend="triton", log_level="warning", debug_kv_integrity=True,
        lora_paths=[f"{n}={p}" for n, p in adapters.items()], max_loras_per_batch=3))
    assert all(t.layer.lora_hook.fused for t in scheduler.runner.lora.targets.values())
    prompts = {"qv": [5, 17, 33, 2, 9, 41, 7], "all": [3, 99, 14, 27, 8, 61, 22, 5, 19, 70, 11],
               "mlp": [120, 7, 7, 44], None: [5, 17, 33, 2, 9, 41, 7]}
    got = run(scheduler, [(f"r-{name}", prompt, name) for name, prompt in prompts.items()], steps=3)
    for name, prompt in prompts.items():
        tokens, logprobs = peft_greedy(base if name is None else peft_model(base, adapters[name]), prompt, 3)
        assert got[f"r-{name}"][0] == tokens, name
        assert got[f"r-{name}"][1] == pytest.approx(logprobs, abs=2e-4), name
    scheduler.close()
