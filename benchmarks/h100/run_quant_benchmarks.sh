#!/usr/bin/env bash
# Quantization on the H100, in one device call (~9 min; needs no carried folders):
#
#   run(kind="nvidia-h100-x1", timeout_s=600, command="bash benchmarks/h100/run_quant_benchmarks.sh")
#
# The fp8 kernels alone (expected ~7-8 min, inside BUDGET_S): the kernel table, batch-1 decode
# and prefill, without offline:
#
#   run(kind="nvidia-h100-x1", timeout_s=600, command='PARTS="fp8check kernels decode prefill" BUDGET_S=570 bash benchmarks/h100/run_quant_benchmarks.sh')
#
# The fp8 w8a16 GEMV autotunes its tiles on the first call of each shape (~1-2 s a shape with
# compilation); the kernels step leaves the choices in Triton's cache directory, so the decode
# servers after it start without timing runs.
#
# Parts (PARTS="kernels decode prefill offline" by default; each row lands in $OUT/results.jsonl):
#   fp8check  tests/gpu/test_gpu_fp8.py: the fp8 kernels' correctness on this GPU (~30 s; a
#             failure is reported in steps.txt, the measurements go on)
#   kernels   benchmarks/quant_kernels.py: every quantized GEMM path beside cuBLAS bf16,
#             torch._scaled_mm and dequantize-then-matmul, at Llama-3.1-8B projection shapes
#             (eager and CUDA-graph-replayed; the decode-sized fp8 w8a16 / int4 GEMVs at
#             M <= 16; the one-launch fp8 activation quantization + torch._scaled_mm)
#   decode    batch-1 decode, 128 in / 256 out, Llama-3.1-8B shape (dummy weights): bf16, then
#             --quantization fp8, w8a8_int8, gptq (online round-to-nearest int4 g128 -> the Triton
#             int4 GEMM, the path AWQ / GPTQ / compressed-tensors w4a16 checkpoints take)
#             (DECODE_QUANTS picks the methods, DECODE_STEP_S the seconds each may take, 100)
#   prefill   batch 64 x 1024 prefill, bf16 and fp8
#   offline   OFFLINE_PROMPTS (300) x 1024 in / 512 out: bf16, then fp8 weights + fp8_e4m3 KV cache
#             (each run at most OFFLINE_STEP_S seconds, 200; 1000 prompts want ~260)
#   gputests  tests/gpu/test_gpu_fp8.py, test_gpu_int4.py, test_gpu_lora.py (~1-2 min; GPU_TESTS: others)
# Attention is triton throughout (it reads the fp8 KV cache); dtype bfloat16; weights are the
# dummy loader's (random, from benchmarks/configs/llama-3.1-8b/config.json), quantized at load.
# The summary table prints each figure and its ratio to the bf16 row of the same workload.
set -u
cd "$(dirname "$0")/../.." || exit 1
START=$(date +%s)
OUT=${OUT:-/tmp/kvyard_out}
LOGS=/tmp/kvyard_quant_logs
mkdir -p "$OUT" "$LOGS"
RESULTS=$OUT/results.jsonl
PARTS=${PARTS:-"kernels decode prefill offline"}
OFFLINE_PROMPTS=${OFFLINE_PROMPTS:-300}
BUDGET_S=${BUDGET_S:-560}
L8=benchmarks/configs/llama-3.1-8b
COMMON=(--model-path $L8 --load-format dummy --dtype bfloat16 --skip-tokenizer-init --log-level warning
        --attention-backend triton)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {   # step NAME TIMEOUT CMD...: output in $LOGS/NAME.log; skipped once the budget is spent
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET_S - $(date +%s) + START ))
    if (( left < 40 )); then echo "$name: SKIPPED (budget)" | tee -a "$OUT/steps.txt"; return 0; fi
    (( limit > left )) && limit=$left
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc" | tee -a "$OUT/steps.txt"
    (( rc != 0 )) && tail -n 12 "$LOGS/$name.log" | sed 's/^/    /'
    return 0
}

bench() {  # bench WORKLOAD VARIANT TIMEOUT SUBCOMMAND ARGS...
    local workload=$1 variant=$2 limit=$3; shift 3
    local rows=/tmp/kvyard_q_${workload}_${variant}.jsonl
    rm -f "$rows"
    step "$workload-$variant" "$limit" python3 -m kvyard.cli bench "$@" "${COMMON[@]}" --output-file "$rows"
    python3 benchmarks/h100/summarize.py tag "$RESULTS" "$rows" "workload=$workload" "attention=$variant"
}

finish() {
    python3 benchmarks/h100/summarize.py table "$RESULTS" | tee "$OUT/summary.txt"
    [ -f "$OUT/kernels.jsonl" ] && python3 - "$OUT/kernels.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'m':>5} {'k':>6} {'n':>6} {'path':<15} {'us':>9} {'TFLOP/s':>8} {'vs bf16':>8} "
      f"{'graph us':>9} {'vs bf16':>8} {'rel err':>8}")
for r in rows:
    print(f"{r['m']:>5} {r['k']:>6} {r['n']:>6} {r['path']:<15} {r.get('us', 'ERR'):>9} "
          f"{r.get('tflops', ''):>8} {r.get('vs_bf16', r.get('error', '')):>8} "
          f"{str(r.get('graph_us', '')):>9} {str(r.get('graph_vs_bf16', '')):>8} {str(r.get('rel_err', '')):>8}")
PY
    tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
}
trap finish EXIT

[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$LOGS/setup.log" 2>&1 \
    && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$LOGS/setup.log" 2>&1 \
    || echo "setup: kvyard install FAILED (see logs)"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"

for part in $PARTS; do
    case $part in
        fp8check) step fp8check 90 python3 -m pytest tests/gpu/test_gpu_fp8.py -q -p no:cacheprovider ;;
        gputests) step gputests 240 sh -c "python3 -m pytest ${GPU_TESTS:-tests/gpu/test_gpu_fp8.py tests/gpu/test_gpu_int4.py tests/gpu/test_gpu_lora.py} -q -p no:cacheprovider 2>&1 | tail -n 30 | tee $OUT/gputests.txt" ;;
        kernels) step kernels 180 sh -c "python3 benchmarks/quant_kernels.py --m ${KERNEL_M:-1 16 64 1024} > $OUT/kernels.jsonl" ;;
        decode)
            for q in ${DECODE_QUANTS:-none fp8 w8a8_int8 gptq}; do
                bench decode-8b "$q" "${DECODE_STEP_S:-100}" one-batch --quantization "$q" --context-length 4096 \
                    --batch-size 1 --input-len 128 --output-len 256
            done ;;
        prefill)
            for q in none fp8; do
                bench prefill-8b "$q" 100 one-batch --quantization "$q" --context-length 2048 \
                    --batch-size 64 --input-len 1024 --output-len 1
            done ;;
        offline)
            bench offline-8b bf16 "${OFFLINE_STEP_S:-200}" offline --context-length 2048 --cuda-graph-max-bs 256 \
                --num-prompts "$OFFLINE_PROMPTS" --input-len 1024 --output-len 512
            bench offline-8b fp8-fp8kv "${OFFLINE_STEP_S:-200}" offline --quantization fp8 --kv-cache-dtype fp8_e4m3 \
                --context-length 2048 --cuda-graph-max-bs 256 --num-prompts "$OFFLINE_PROMPTS" \
                --input-len 1024 --output-len 512 ;;
        *) echo "unknown part $part (fp8check gputests kernels decode prefill offline)"; exit 2 ;;
    esac
done
