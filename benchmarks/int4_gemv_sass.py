"""Instructions per K-tile of the int4 GEMV's main loop, read from its sm_90 SASS (no GPU needed).

Compiles kvyard.kernels.triton_ops.int4_gemm._int4_mm_kernel (or the same kernel in another copy
of the module, ``--module FILE``, e.g. `git show main:core/kernels/triton_ops/int4_gemm.py`)
for sm_90 with Triton's bundled ptxas, disassembles the cubin with its nvdisasm, finds the
longest backward branch (the K loop) and prints one JSON line per (M bucket, config): the loop's
instruction count, the count per weight a thread handles per iteration, the kernel's local-memory
accesses (LDL / STL: register spills; 0 wanted) and the loop's opcode histogram. ``--dot16 only``
compiles just the DOT16 configs (tensor-core dot on (q - z) in x's 16-bit dtype), ``--dtype fp16``
their fp16 PTX. Pointer arguments and N, K and the split lengths carry Triton's divisibility-by-16
specialization (what an 8B projection gets); x and scales are bf16 (or --dtype fp16), EVEN tiles, no K split.

    OMP_NUM_THREADS=1 python benchmarks/int4_gemv_sass.py --m 1 2 4 --group 128
    OMP_NUM_THREADS=1 python benchmarks/int4_gemv_sass.py --m 1 16 --dot16 only --dtype fp16
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

INT_ARGS_DIV16 = {"N", "K", "K_PER_SPLIT", "stride_xm", "K8", "W_PER_SPLIT"}
PTR_TYPES = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "g_ptr": "*i32",
             "out_ptr": "*fp32", "y_ptr": "*bf16", "cnt_ptr": "*i32"}


def load_module(path: str | None):
    if path is None:
        from kvyard.kernels.triton_ops import int4_gemm
        return int4_gemm
    spec = importlib.util.spec_from_file_location("int4_gemm_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_sass(mod, block_m: int, group: int, cfg: triton.Config, dtype: str = "bf16") -> str:
    """The kernel's SASS for one M bucket, group and config (x and scales in ``dtype``, bf16 or
    fp16; no split, EVEN)."""
    fn = mod._int4_mm_kernel
    ptr_types = {**PTR_TYPES, **{name: f"*{dtype}" for name in ("x_ptr", "s_ptr", "y_ptr")}}
    values = dict(GROUP=group, PARTIAL=False, FUSE=False, FP32=False, BLOCK_M=block_m, EVEN=True,
                  ASM=True, **cfg.kwargs)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in values:
            sig[name], consts[name] = "constexpr", values[name]
        elif name in ptr_types:
            sig[name] = ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in INT_ARGS_DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def loop_histogram(sass: str) -> collections.Counter:
    """Opcodes (without modifiers) between the target of the longest backward branch and it."""
    ops, labels, loops = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);", line)
        if ins:
            ops.append((ins.group(1).split(".")[0], ins.group(2)))
    for i, (op, args) in enumerate(ops):
        target = re.search(r"(\.L_x_\d+)", args) if op == "BRA" else None
        if target and labels.get(target.group(1), i + 1) <= i:
            loops.append((labels[target.group(1)], i))
    if not loops:
        raise RuntimeError("no backward branch in the SASS: the K loop was not found")
    start, end = max(loops, key=lambda se: se[1] - se[0])
    return collections.Counter(op for op, _ in ops[start:end + 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", help="another copy of int4_gemm.py to compile (default: the installed one)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4], help="M buckets (1, 2, 4, 16)")
    ap.add_argument("--group", type=int, default=128, help="the GROUP constexpr (0: act-order gather)")
    ap.add_argument("--dot16", choices=["all", "only", "none"], default="all",
                    help="which configs: all, only the DOT16 ones, or none of them")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="x's (and the scales') dtype")
    args = ap.parse_args()
    mod = load_module(args.module)
    for block_m in args.m:
        for cfg in mod.GEMV_CONFIGS[block_m]:
            dot16 = cfg.kwargs.get("DOT16", False)
            if (args.dot16 == "only" and not dot16) or (args.dot16 == "none" and dot16):
                continue
            sass = compile_sass(mod, block_m, args.group, cfg, args.dtype)
            hist = loop_histogram(sass)
            local = len(re.findall(r"\b(?:LDL|STL)\b", sass))     # local-memory (spill) accesses
            total = sum(hist.values())
            weights = cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"] // (32 * cfg.num_warps)
            print(json.dumps({"m": block_m, "group": args.group, **cfg.kwargs, "warps": cfg.num_warps,
                              "dtype": args.dtype, "loop_instructions": total,
                              "per_weight": round(total / weights, 3), "local_memory_ops": local,
                              "ops": dict(hist.most_common())}))


if __name__ == "__main__":
    main()
