"""Quantization methods (fp8, w8a8_fp8, w8a8_int8, awq, gptq, compressed-tensors, torchao,
bitsandbytes) loaded through the real path (config.json -> method -> loader -> model).

Per checkpoint format (tiny random Llama, packed by quant_checkpoints.py):
  - the dequantized weights equal the format's reference decoding exactly (float32);
  - logits at every prompt position close to a reference and greedy tokens equal on 4 prompts x
    16 tokens. The reference is transformers loading the same folder where transformers runs
    that format on the CPU (compressed-tensors fp8 / int8 / w4a16 symmetric); elsewhere
    transformers' LlamaForCausalLM with the reference-dequantized weights and the scheme's
    activation quantization applied in pre-hooks (fp8 per token / per tensor / per token group,
    int8 per token), i.e. the format's arithmetic in float32.
Per online method: a quantized layer's output close to the float layer (relative Frobenius
error bound stated per method); one scale per output channel and per token. Whole-model
agreement of the 8-bit methods (tiny model, SmolLM2): test_quantized_greedy_agreement.py.
"""
from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

import quant_checkpoints as qc
from kvyard.layers import quant_math as qm
from kvyard.layers.linear import Linear
from kvyard.quantization import QuantizationConfig
from kvyard.plugins import registry
from quant_helpers import PROMPTS, generate, harness, hf_greedy, runner, save_float, tiny_llama

# logits: weight-only formats differ from the reference by summation order only (2e-3); with
# quantized activations a last-bit difference in a hidden state can move a value across a
# rounding boundary of the fp8 / int8 grid, one grid step on one element (logits here are of
# order 5; measured at most 0.03): 0.05
WEIGHT_ONLY_ATOL, ACT_QUANT_ATOL = 2e-3, 5e-2


def _fp8_token(x):
    q, s = qm.fp8_per_row(x)
    return q.float() * s


def _fp8_group(x):
    q, s = qm.fp8_per_token_group(x.reshape(-1, x.shape[-1]), 32)
    return qm.dequantize_block(q, s, 32).view(x.shape)


def _int8_token(qmax):
    def fake(x):
        q, s = qm.int8_per_row(x, qmax)
        return q.float() * s
    return fake


# name -> (builder(hf, path) -> (path, ref), activation fake-quant for the reference or
#          "static", whether transformers itself is the reference)
FORMATS = {
    "fp8-per-tensor": (lambda hf, p: qc.fp8_checkpoint(hf, p), _fp8_token, False),
    "fp8-static": (lambda hf, p: qc.fp8_checkpoint(hf, p, static_scales=_static(hf)), "static", False),
    "fp8-block": (lambda hf, p: qc.fp8_checkpoint(hf, p, block=(32, 32)), _fp8_group, False),
    "w8a8_int8": (lambda hf, p: qc.w8a8_int8_checkpoint(hf, p), _int8_token(127.0), False),
    "awq-g32": (lambda hf, p: qc.awq_checkpoint(hf, p, group=32), None, False),
    "awq-g128-nozp": (lambda hf, p: qc.awq_checkpoint(hf, p, group=128, zero_point=False), None, False),
    "gptq-g32-sym": (lambda hf, p: qc.gptq_checkpoint(hf, p, group=32), None, False),
    "gptq-g64-asym-desc_act": (lambda hf, p: qc.gptq_checkpoint(hf, p, group=64, sym=False, desc_act=True), None, False),
    "ct-fp8-dynamic": (lambda hf, p: qc.ct_fp8_checkpoint(hf, p), _fp8_token, True),
    "ct-w8a8-int8": (lambda hf, p: qc.ct_int8_checkpoint(hf, p), _int8_token(127.5), True),
    "ct-w4a16-sym": (lambda hf, p: qc.ct_w4a16_checkpoint(hf, p, group=32), None, True),
    "ct-w4a16-asym": (lambda hf, p: qc.ct_w4a16_checkpoint(hf, p, group=64, symmetric=False), None, False),
}


@lru_cache(maxsize=None)
def base_model():
    return tiny_llama()


@lru_cache(maxsize=None)
def _static(hf) -> dict:
    return {k: v / float(qm.FP8_E4M3_MAX) for k, v in qc.input_amax(hf, PROMPTS).items()}


def simulated_reference(hf, ref: dict, act, static_scales: dict | None):
    """transformers' Llama with the reference-dequantized weights and activation fake-quant."""
    model = copy.deepcopy(hf)
    for name, module in model.named_modules():
        if name in ref:
            module.weight.data.copy_(ref[name])
            if act == "static":
                scale = torch.tensor(static_scales[name])
                fake = (lambda s: lambda x: qm.fp8_quantize(x, s).float() * s)(scale)
            else:
                fake = act
            if fake is not None:
                module.register_forward_pre_hook(lambda mod, args, f=fake: (f(args[0]).to(args[0].dtype),))
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = FORMATS[name][0](base_model(), root / name)
        return cache[name]
    return get


def _linears(model):
    return {m.prefix: m for m in model.modules() if isinstance(m, Linear)}


def _parts(prefix):
    for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
        if prefix.endswith(fused):
            return [prefix[: -len(fused)] + p for p in parts]
    return [prefix]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_checkpoint_dequantizes_exactly_and_generates_like_reference(fmt, built):
    path, ref = built(fmt)
    hf = base_model()
    r = runner(path)
    assert r.quantization == qc.json.load(open(f"{path}/config.json"))["quantization_config"]["quant_method"]
    # dequantized weights: exact
    for prefix, linear in _linears(r.model).items():
        if prefix == "lm_head":
            continue
        expected = torch.cat([ref[p] for p in _parts(prefix)])
        torch.testing.assert_close(linear.method.dequantize(linear).float(), expected, rtol=0, atol=0)
    # logits and greedy tokens
    if FORMATS[fmt][2]:
        pytest.importorskip("compressed_tensors")   # transformers needs it to read the folder
        from transformers import AutoModelForCausalLM
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        reference = simulated_reference(hf, ref, FORMATS[fmt][1], _static(hf) if fmt == "fp8-static" else None)
    atol = WEIGHT_ONLY_ATOL if FORMATS[fmt][1] is None else ACT_QUANT_ATOL
    ours = harness(r.model, hf.config).prefill_logits(PROMPTS)
    with torch.inference_mode():
        for prompt, got in zip(PROMPTS, ours):
            torch.testing.assert_close(got, reference(torch.tensor([prompt])).logits[0], rtol=0, atol=atol)
    tokens, _ = generate(r.model, hf.config)
    if FORMATS[fmt][1] is None:
        assert tokens == [t for t, _ in hf_greedy(reference)]
    else:
        assert_greedy_path(reference, tokens, 2 * atol)


def assert_greedy_path(reference, tokens, slack: float):
    """Our greedy continuation is the reference's greedy continuation up to near-ties: at every
    step the reference (teacher-forced on our tokens) ranks our token within ``slack`` of its
    best. Quantized activations make exact ties of a random tiny model flip either way."""
    with torch.inference_mode():
        for prompt, out in zip(PROMPTS, tokens):
            logits = reference(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1]
            chosen = logits.gather(1, torch.tensor(out).view(-1, 1)).squeeze(1)
            gap = logits.max(dim=1).values - chosen
            assert bool((gap <= slack).all()), f"step {int(gap.argmax())}: our token is {float(gap.max()):.3f} below the best"


# -- online methods: one layer against the float layer ----------------------------------------------
# bound on ||y_q - y|| / ||y|| for x ~ N(0, 1), w ~ N(0, 0.05), K = 256 (measured well below)
ONLINE_BOUNDS = {"fp8": 0.05, "w8a8_fp8": 0.05, "w8a8_int8": 0.015, "bitsandbytes": 0.12, "gptq": 0.15}


def _online_layer(name: str, options=None):
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    method = registry("quantization_methods").get(name)(QuantizationConfig(name, torch.float32, "cpu", options=options))
    layer = Linear(256, [32, 64], method=method.linear_method("model.layers.0.mlp.gate_up_proj"))
    layer.load_shard(0, w[:32])
    layer.load_shard(1, w[32:])
    layer.process_after_loading()
    return layer, w


@pytest.mark.parametrize("name", sorted(ONLINE_BOUNDS))
def test_online_layer_is_close_to_float(name):
    if name == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    layer, w = _online_layer(name)
    x = torch.randn(7, 256)
    y, expected = layer(x), x @ w.t()
    assert ((y - expected).norm() / expected.norm()).item() < ONLINE_BOUNDS[name]


@pytest.mark.parametrize("name", ["fp8", "w8a8_fp8", "w8a8_int8"])
def test_online_8bit_scales_are_per_channel_and_per_token(name):
    """The standard online scheme (SGLang's w8a8_int8; finer than vLLM's per-tensor online fp8):
    one weight scale per output channel and one activation scale per token, so a large output
    channel or a large token changes no other channel's or token's result."""
    layer, w = _online_layer(name)
    x = torch.randn(4, 256)
    loud = x.clone()
    loud[0] *= 1000.0                                   # one token 1000x louder
    torch.testing.assert_close(layer(loud)[1:], layer(x)[1:], rtol=0, atol=0)
    w2 = w.clone()
    w2[5] *= 1000.0                                     # one output channel 1000x larger
    method = registry("quantization_methods").get(name)(QuantizationConfig(name, torch.float32, "cpu"))
    big = Linear(256, [32, 64], method=method.linear_method("model.layers.0.mlp.gate_up_proj"))
    big.load_shard(0, w2[:32])
    big.load_shard(1, w2[32:])
    big.process_after_loading()
    keep = [i for i in range(96) if i != 5]
    torch.testing.assert_close(big(x)[:, keep], layer(x)[:, keep], rtol=0, atol=0)


@pytest.mark.parametrize("recipe,bound", [("int8wo", 0.01), ("int8dq", 0.015), ("fp8wo", 0.05)])
def test_torchao_recipes_on_cpu(recipe, bound):
    pytest.importorskip("torchao")
    layer, w = _online_layer("torchao", {"torchao_config": recipe})
    x = torch.randn(5, 256)
    y, expected = layer(x), x @ w.t()
    assert ((y - expected).norm() / expected.norm()).item() < bound


def test_fp8_scaled_mm_path_equals_dequantized_path():
    """torch._scaled_mm (the CUDA path; it also runs on this CPU) and the float32 path agree."""
    from kvyard.layers.quantized_linear import Fp8LinearMethod, Fp8Scheme

    torch.manual_seed(1)
    w, x = torch.randn(48, 128) * 0.1, torch.randn(6, 128)
    outs = []
    for scaled in (lambda t: False, lambda t: True):
        layer = Linear(128, 48, method=Fp8LinearMethod(torch.float32, "cpu", Fp8Scheme(checkpoint=False), scaled))
        layer.load_shard(0, w)
        layer.process_after_loading()
        outs.append(layer(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_int4_packings_round_trip():
    from kvyard_plugins.quantization.awq_method import ORDER

    v = torch.randint(0, 16, (64, 40), dtype=torch.int32)
    assert torch.equal(qm.unpack_int4_rows(qm.pack_int4_rows(v)), v)
    assert torch.equal(qm.unpack_int4_cols(qm.pack_int4_cols(v, ORDER), ORDER), v)
    # AutoAWQ's interleave: nibble i of a word holds column ORDER[i]
    row = qm.pack_int4_cols(torch.arange(8, dtype=torch.int32).view(1, 8), ORDER)
    assert [(int(row) >> (4 * i)) & 0xF for i in range(8)] == list(ORDER)


def test_compressed_tensors_library_reads_our_packing():
    """The int4 packing of the test checkpoints is the compressed-tensors library's own."""
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    signed = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    ours = qm.pack_int4_cols((signed.to(torch.int32) + 8))
    assert torch.equal(ours, ct.pack_to_int32(signed, 4))
    zp = torch.randint(-8, 8, (64, 4), dtype=torch.int8)
    assert torch.equal(qm.pack_int4_rows(zp.to(torch.int32) + 8), ct.pack_to_int32(zp, 4, packed_dim=0))


# -- selection and errors -----------------------------------------------------------------------
def test_conflicting_quantization_names_the_declaration(built):
    path, _ = built("gptq-g32-sym")
    with pytest.raises(ValueError, match="declares quantization_config.quant_method='gptq'; --quantization fp8"):
        runner(path, "fp8")


def test_checkpoint_only_methods_refuse_float_checkpoints(tmp_path):
    path = save_float(base_model(), tmp_path / "float")
    with pytest.raises(ValueError, match="awq cannot quantize online"):
        runner(path, "awq")


def test_unsupported_declaration_is_one_line(built, tmp_path):
    import json
    import shutil

    path, _ = built("awq-g32")
    bad = tmp_path / "awq-gemv"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization_config.version: awq 'gemv' is not supported"):
        runner(str(bad))


def test_quantization_flags_are_checked_at_parse_time():
    from kvyard.server_args import ServerArgs

    with pytest.raises(ValueError, match="quantization: .*fp9"):
        ServerArgs(quantization="fp9")
    with pytest.raises(ValueError, match="torchao_config: 'int3wo'"):
        ServerArgs(torchao_config="int3wo")
    with pytest.raises(ValueError, match="torchao_config: it quantizes with torchao; --quantization fp8"):
        ServerArgs(torchao_config="int8wo", quantization="fp8")
    assert ServerArgs(torchao_config="int8dq").quantization_name() == "torchao"


# -- bitsandbytes checkpoints: made by transformers + bitsandbytes (the real tools run here) ------
@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_checkpoint_matches_transformers(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from quant_helpers import save_tokenizer

    path = save_float(base_model(), tmp_path / "float")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32) \
        if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    reference = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32,
                                                     device_map="cpu").eval()
    reference.save_pretrained(tmp_path / "bnb")
    save_tokenizer(tmp_path / "bnb")
    r = runner(str(tmp_path / "bnb"))
    assert r.quantization == "bitsandbytes"
    ours = harness(r.model, base_model().config).prefill_logits(PROMPTS)
    with torch.inference_mode():
        for prompt, got in zip(PROMPTS, ours):
            # 4-bit: the same nf4 weights, bitsandbytes' CPU matmul rounds differently (measured 0.073);
            # 8-bit: transformers also quantizes activations to int8 (LLM.int8 below the outlier
            # threshold), this path keeps them in float (measured 0.13). Logits are of order 5.
            torch.testing.assert_close(got, reference(torch.tensor([prompt])).logits[0].float(), rtol=0,
                                       atol=0.1 if bits == 4 else 0.2)
    tokens, _ = generate(r.model, base_model().config)
    assert_greedy_path(reference, tokens, 0.2 if bits == 4 else 0.4)
