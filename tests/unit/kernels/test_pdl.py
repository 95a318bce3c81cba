"""Programmatic dependent launch: which kernels take it, and what their H100 code does with it.

Invariant (kernels/triton_ops/common.py): with PDL each program waits for the previous kernel
(griddepcontrol.wait) before any global store and before loading anything but weights, then
lets the next kernel launch (griddepcontrol.launch_dependents); without PDL neither appears.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kvyard.kernels.triton_ops import common  # noqa: E402

_SM90 = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvyard.kernels.triton_ops import activation, int4_gemm as i4, kv_write, rmsnorm, rotary
from kvyard_plugins.attention.triton_kernels import decode_attention as da

FLOATS = {"eps", "k_inv", "v_inv", "scale_log2", "logit_cap"}

def ptx(fn, pointers, consts, warps=4, aligned=()):
    sig = {}
    for name in fn.arg_names:
        sig[name] = (pointers[name] if name in pointers else "constexpr" if name in consts
                     else "fp32" if name in FLOATS else "i32")
    names = list(sig)
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in (*pointers, *aligned)})
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
    except RuntimeError as exc:
        if str(exc).startswith("Cannot find") and "ptxas" in str(exc):
            sys.exit(3)
        raise

bf = "*bf16"
cases = {
    "rmsnorm": (rmsnorm._rmsnorm_kernel, dict(X=bf, R=bf, W=bf, OUT=bf, SUM=bf), dict(HAS_RESIDUAL=True, BLOCK=4096), {}),
    "silu_and_mul": (activation._silu_and_mul_kernel, dict(X=bf, OUT=bf), dict(BLOCK=1024), {}),
    "rotary": (rotary._rotary_kernel, dict(X=bf, COS=bf, SIN=bf, OUT=bf, V=bf, LOC="*i64", K_BUF=bf, V_BUF=bf),
               dict(BLOCK_H=16, BLOCK_HALF=64, STORE_KV=True, FP8=False, FMAX=0.0, MANT=0, EMIN=0), {}),
    "rotary_fp8_cache": (rotary._rotary_kernel, dict(X=bf, COS=bf, SIN=bf, OUT=bf, V=bf, LOC="*i64",
                         K_BUF="*fp8e4nv", V_BUF="*fp8e4nv"),
                         dict(BLOCK_H=16, BLOCK_HALF=64, STORE_KV=True, FP8=True, FMAX=448.0, MANT=3, EMIN=-6), {}),
    "kv_write": (kv_write._kv_write_kernel, dict(K=bf, V=bf, LOC="*i64", K_BUF=bf, V_BUF=bf),
                 dict(BLOCK=1024, FP8=False, FMAX=0.0, MANT=0, EMIN=0), {}),
    "decode_split": (da._decode_split_kernel, dict(Q=bf, K_BUF=bf, V_BUF=bf, REQ_TO_TOKEN="*i32",
                     REQ_POOL_INDICES="*i64", SEQ_LENS="*i64", MID_O="*fp32", MID_LSE="*fp32"),
                     dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_H=16, BLOCK_N=64, NUM_SPLITS=8,
                          FP32_DOT=False, KV_FP8=False, SOFT_CAP=False), {}),
    "decode_reduce": (da._decode_reduce_kernel, dict(MID_O="*fp32", MID_LSE="*fp32", O=bf),
                      dict(HEAD_DIM=128, BLOCK_D=128, NUM_SPLITS=8, BLOCK_S=8), {}),
}
cfg = i4.ONE_ROW_CONFIG
cases["int4_one_row"] = (i4._int4_mm_kernel, dict(x_ptr=bf, qw_ptr="*i32", s_ptr=bf, z_ptr="*u8", g_ptr="*i32",
                         out_ptr="*fp32", y_ptr=bf, cnt_ptr="*i32"),
                         dict(GROUP=128, PARTIAL=True, FUSE=True, FP32=False, BLOCK_M=1, EVEN=True, ASM=True,
                              **cfg.kwargs), dict(warps=cfg.num_warps, aligned=("K", "K_PER_SPLIT", "K8", "W_PER_SPLIT")))
for name, (fn, pointers, consts, kw) in cases.items():
    off = ptx(fn, pointers, {**consts, "PDL": False}, **kw)
    assert "griddepcontrol" not in off, name
    on = ptx(fn, pointers, {**consts, "PDL": True}, **kw)
    body = on[on.index(".entry"):]
    wait, launch = body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dependents")
    assert 0 < wait < launch, (name, wait, launch)
    store = re.search(r"\b(st|atom|red)\.global", body)
    assert store and store.start() > launch, (name, "a global write before the wait")
    loads = [m.start() for m in re.finditer(r"\bld\.global", body)]
    before = [i for i in loads if i < wait]
    if name == "int4_one_row":      # the first tile's weights, scale and zero: requested before the wait
        assert before, "int4: no weight load before the wait"
    else:
        assert not before, (name, "a load before the wait")
print("ok", len(cases))
"""


def test_pdl_kernels_wait_first_then_release_on_sm90():
    """Compiled for the H100 (Triton's bundled ptxas, no GPU): each kernel the decode step
    launches as a programmatic dependent waits before its first global store (and, but for the
    int4 GEMV's weight prologue, before its first load) and releases the next kernel after it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SM90], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "8"]


def test_pdl_launch_only_on_cuda_and_switch():
    """A CPU tensor (the interpreter) never gets a PDL launch; KVYARD_PDL=0 turns it off for
    every device, read at import."""
    assert common.pdl_launch(torch.zeros(1)) == {"PDL": False}
    code = "from kvyard.kernels.triton_ops import common; print(common.PDL_ENABLED)"
    for value, expect in (("0", "False"), ("off", "False"), ("1", "True")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KVYARD_PDL": value},
                             capture_output=True, text=True, timeout=120).stdout.strip()
        assert out == expect, (value, out)
