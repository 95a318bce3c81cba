#!/usr/bin/env bash
# Prepares .whl_fi/ (ignored by git) on a machine WITH network access, for the H100 device that
# has none: the flashinfer wheels, and flashinfer's attention kernels compiled ahead of time.
#
#   .whl_fi/flashinfer_python-0.6.18.post1-py3-none-any.whl        18 MB, pure Python + sources
#   .whl_fi/apache_tvm_ffi-0.1.15.post2-cp312-...whl                  3 MB, its only needed binary dep
#   .whl_fi/aot/<module>/<module>.so                                  ~6 MB, see below
#
# Why 0.6.18.post1: the newest 0.7.x wheel alone is 62 MB (64 MiB is all one device call may
# carry); 0.2-0.4 ship no wheels; 0.5+ compile their kernels against apache-tvm-ffi's C ABI,
# not torch's C++ one, so they do not care that the device has torch 2.11. Of its declared
# dependencies, the paged prefill/decode path imports none beyond apache-tvm-ffi and what the
# device image has (numpy, requests, einops, tabulate, tqdm, click, packaging, nvidia-ml-py,
# ninja): nvidia-cutlass-dsl, nvidia-cudnn-frontend, cuda-python, cuda-tile and nccl4py are
# only imported by other features (CuTe-DSL, cuDNN, comm kernels), so they stay behind.
#
# Ahead-of-time kernels: flashinfer JIT-compiles each (dtype, head_dim) variant with nvcc on
# first use (about 8 CPU-minutes for a prefill module). It loads a module from
# flashinfer/data/aot/<name>/<name>.so without compiling when that file exists, so the four
# variants the device runs (bf16; head_dim 64 for SmolLM2 and the tests, 128 for Llama-3.1-8B;
# the prefill module, which also serves tensor-core decode, and the plain decode module) are
# built here with the same nvcc major version as the device's (CUDA 13.0) for sm_90a, and
# run_benchmarks.sh copies them into place. Anything else still JIT-compiles there.
#
# Needs: nvcc 13.x at $CUDA_HOME (default /usr/local/cuda), ninja, g++; ~25 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
FI_VERSION=0.6.18.post1
TVM_FFI_VERSION=0.1.15.post2
DEST=${DEST:-.whl_fi}
WORK=${WORK:-/tmp/kvyard_fi_build}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
grep -qx "/.whl_fi/" .git/info/exclude 2>/dev/null || echo "/.whl_fi/" >> .git/info/exclude
mkdir -p "$DEST" "$WORK"

platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d "$DEST" "flashinfer-python==$FI_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION"

# A local install (this machine's Python) only to run flashinfer's own module generator.
python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK/local" \
    "apache-tvm-ffi==$TVM_FFI_VERSION" nvidia-ml-py einops tabulate ninja
python3 -m pip install -q --no-deps --no-index --target "$WORK/site" "$DEST/flashinfer_python-$FI_VERSION-py3-none-any.whl" "$WORK"/local/*.whl

# The link line names -lcuda; the driver library is not needed to link a shared object, so an
# empty stub stands in for it where no driver is installed (the .so records no dependency on it).
mkdir -p "$WORK/stubs"
echo 'void kvyard_cuda_stub(void) {}' > "$WORK/stubs/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$WORK/stubs/libcuda.so" "$WORK/stubs/stub.c"

PYTHONPATH="$WORK/site" FLASHINFER_CUDA_ARCH_LIST=9.0a FLASHINFER_WORKSPACE_BASE="$WORK/ws" \
FLASHINFER_EXTRA_LDFLAGS="-L$WORK/stubs" MAX_JOBS=${MAX_JOBS:-2} AOT_DIR="$DEST/aot" python3 - <<'EOF'
import os, shutil, time
import torch
from flashinfer.jit.attention.modules import gen_batch_decode_module, gen_batch_prefill_module

bf16, i32 = torch.bfloat16, torch.int32
specs = []
for head_dim in (64, 128):
    specs.append(gen_batch_prefill_module("fa2", bf16, bf16, bf16, i32, head_dim, head_dim, 0, False, False, False))
    specs.append(gen_batch_decode_module(bf16, bf16, bf16, i32, head_dim, head_dim, 0, False, False))
for spec in specs:
    start = time.time()
    spec.build()
    target = os.path.join(os.environ["AOT_DIR"], spec.name)
    os.makedirs(target, exist_ok=True)
    shutil.copy2(spec.jit_library_path, os.path.join(target, spec.name + ".so"))
    print(f"{spec.name}: {time.time() - start:.0f} s", flush=True)
EOF
du -sh "$DEST"/* "$DEST"/aot/* | sed "s|$DEST/||"
