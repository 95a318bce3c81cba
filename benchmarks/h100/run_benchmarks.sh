#!/usr/bin/env bash
# The H100 benchmarks (engine speed, models), one device call per group of parts (see device_call.md for the calls).
#
#   bash benchmarks/h100/run_benchmarks.sh PART...        from the repository root, on the device
#
# PART (run in the order given; each prints one status line, its numbers go to results.jsonl):
#   fi-tests    tests/gpu/test_flashinfer.py (the flashinfer plugin with the real library)
#   gpu-tests   tests/gpu/run_all.sh (the GPU-code issue's suite: every plugin, graphs on/off; it
#               includes the flashinfer file too unless SUITES="kernels engine core-cuda")
#   decode      batch-1 decode, 128 in / 256 out, Llama-3.1-8B and SmolLM2-135M shapes, every backend
#   prefill     batch 64 x 1024-token prefill, Llama-3.1-8B shape, every backend
#   compare     the same workloads through `kvyard bench offline --compare-hf` (transformers in the
#               same run, same device and dtype): prints kvyard / transformers
#   offline     Llama-3.1-8B offline throughput, OFFLINE_PROMPTS x 1024 in / 512 out, flashinfer and
#               triton; and 128 x 256/256 with --compare-hf (the issue's transformers reference point)
#   profile     where a batch-1 Llama-3.1-8B decode step's time goes (kernels, gaps, host)
#   model-tests tests/gpu/test_gpu_engine.py on the Qwen3, Phi-3 and Gemma 2/3 tiny models (sliding
#               windows, soft-caps) against transformers, triton with CUDA graphs, flex, torch_native
#   models      Qwen3-8B and Gemma-2-9B shapes on triton: batch-1 decode (128 in / 256 out) and
#               64 x 1024 prefill, and 1 x 128/256 and 128 x 256/256 through --compare-hf
#               (MODELS: the benchmarks/configs folders, default "qwen3-8b gemma-2-9b"; MODEL_PARTS:
#               which of "decode prefill compare offline" to run, default all; OFFLINE_MODELS_PROMPTS:
#               the offline comparison's prompt count, default 128)
#   models-vs-hf  benchmarks/models_vs_hf.py: per MODELS folder, one kvyard Engine (triton) then
#               transformers on the same config, WORKLOADS (default "1x128/256 64x256/128"), each
#               model under MODEL_LIMIT_S (default 260); rows in results.jsonl as they land
#   all         every part above (more than one 10-minute call holds)
#
# Setup (always, ~30 s): flashinfer's wheels and precompiled kernels from .whl_fi/ (carry it;
# benchmarks/h100/prepare_flashinfer.sh makes it), other wheels from .whl/ when present, all
# into /tmp/site; kvyard itself as an editable install. Model weights are dummy (random, from
# benchmarks/configs/*/config.json), dtype bfloat16.
#
# Environment: BACKENDS (default "flashinfer triton torch_native"), COMPARE_BACKEND (flashinfer),
# OFFLINE_PROMPTS (300: the issue's 1000 do not fit a 10-minute call next to engine start-up;
# 300 prompts keep ~250 requests decoding at once, the steady state the figure is about),
# PROFILE_BS / PROFILE_INPUT_LEN (1 / 128: the profiled decode batch), PROFILE_MODEL (a config
# folder, default the Llama-3.1-8B one),
# OFFLINE_LIMIT_S (240: the time limit of each offline-8b run),
# BUDGET_S (540: parts that would start later are skipped, so the call ends with its table
# instead of being killed at 600 s).
# Output under $OUT: results.jsonl (one JSON line per measurement), summary.txt (the tables),
# steps.txt, logs.tar.gz (every command's full output).
set -u
cd "$(dirname "$0")/../.." || exit 1
START=$(date +%s)
OUT=${OUT:-/tmp/kvyard_out}
LOGS=/tmp/kvyard_logs
mkdir -p "$OUT" "$LOGS"
RESULTS=$OUT/results.jsonl
BACKENDS=${BACKENDS:-"flashinfer triton torch_native"}
COMPARE_BACKEND=${COMPARE_BACKEND:-flashinfer}
OFFLINE_PROMPTS=${OFFLINE_PROMPTS:-300}
PROFILE_BS=${PROFILE_BS:-1}
PROFILE_INPUT_LEN=${PROFILE_INPUT_LEN:-128}
PROFILE_MODEL=${PROFILE_MODEL:-benchmarks/configs/llama-3.1-8b}
BUDGET_S=${BUDGET_S:-540}
L8=benchmarks/configs/llama-3.1-8b
SMOL=benchmarks/configs/smollm2-135m
COMMON=(--load-format dummy --dtype bfloat16 --skip-tokenizer-init --log-level warning)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

elapsed() { echo $(( $(date +%s) - START )); }

finish() {
    python3 benchmarks/h100/summarize.py table "$RESULTS" | tee "$OUT/summary.txt"
    tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
    echo "== steps ($(elapsed) s in all) =="; cat "$OUT/steps.txt" 2>/dev/null
}
trap finish EXIT

# step NAME TIMEOUT_S CMD...: runs CMD with its output in $LOGS/NAME.log, unless the budget is spent.
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET_S - $(elapsed) ))
    if (( left < 45 )); then
        echo "$name: SKIPPED (budget: $(elapsed) s used of $BUDGET_S)" | tee -a "$OUT/steps.txt"; return 0
    fi
    (( limit > left )) && limit=$left
    local t0; t0=$(date +%s)
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    local verdict=ok; (( rc == 124 )) && verdict="TIMEOUT after ${limit}s"; (( rc != 0 && rc != 124 )) && verdict="FAILED rc=$rc"
    echo "$name: $verdict ($(( $(date +%s) - t0 )) s)" | tee -a "$OUT/steps.txt"
    (( rc != 0 )) && tail -n 15 "$LOGS/$name.log" | sed 's/^/    /'
    return 0
}

# bench WORKLOAD ATTENTION TIMEOUT SUBCOMMAND ARGS...: a `kvyard bench` run whose JSON rows land in
# results.jsonl tagged with the workload and the attention backend.
bench() {
    local workload=$1 attention=$2 limit=$3; shift 3
    local rows=/tmp/kvyard_rows_${workload}_${attention}.jsonl
    rm -f "$rows"
    step "$workload-$attention" "$limit" python3 -m kvyard.cli bench "$@" --attention-backend "$attention" --output-file "$rows"
    python3 benchmarks/h100/summarize.py tag "$RESULTS" "$rows" "workload=$workload" "attention=$attention" \
        ${TAG_COMPARE:+compare=$TAG_COMPARE}
}

setup() {
    local wheels=()
    shopt -s nullglob; wheels=(.whl_fi/*.whl .whl/*.whl); shopt -u nullglob
    if (( ${#wheels[@]} )); then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${wheels[@]}" > "$LOGS/setup.log" 2>&1 || { echo "setup: wheel install FAILED"; tail "$LOGS/setup.log"; }
    else echo "setup: no wheels in .whl_fi/ or .whl/ (carry them)"; fi
    export PYTHONPATH=/tmp/site
    # flashinfer loads data/aot/<module>/<module>.so without compiling when it exists
    [ -d .whl_fi/aot ] && cp -r .whl_fi/aot /tmp/site/flashinfer/data/
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$LOGS/setup.log" 2>&1 \
        || python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >> "$LOGS/setup.log" 2>&1 \
        || { echo "setup: kvyard install FAILED"; tail "$LOGS/setup.log"; }
    [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
    export FLASHINFER_WORKSPACE_BASE=/tmp/fi_ws FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
    python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib.util, subprocess, torch
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE"
print(f"torch {torch.__version__} cuda {torch.version.cuda} device {device} "
      f"dlpack-exchange-api {hasattr(torch.Tensor, '__dlpack_c_exchange_api__')}")
try:
    import flashinfer, tvm_ffi
    from flashinfer.jit import env
    aot = sorted(p.name for p in env.FLASHINFER_AOT_DIR.glob("*") if p.is_dir())
    print(f"flashinfer {flashinfer.__version__} tvm_ffi {tvm_ffi.__version__} precompiled modules {len(aot)}")
except Exception as exc:  # the flashinfer parts will say what fails
    print(f"flashinfer unavailable: {type(exc).__name__}: {exc}")
for mod in ("triton", "transformers", "kvyard"):
    spec = importlib.util.find_spec(mod)
    print(mod, getattr(__import__(mod), "__version__", "?") if spec else "MISSING")
try:
    print(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
except (OSError, IndexError):
    print("nvcc not found")
EOF
}

part_fi_tests() {
    step fi-tests 300 python3 -m pytest tests/gpu/test_flashinfer.py -q -rfEs -p no:cacheprovider
    tail -n 3 "$LOGS/fi-tests.log"
}

part_gpu_tests() {
    # its per-suite logs and JUnit files go into logs.tar.gz ($OUT returns 8 files at most)
    if [ -f tests/gpu/run_all.sh ]; then
        step gpu-tests 560 env OUT="$LOGS/gpu" bash tests/gpu/run_all.sh
        tail -n 40 "$LOGS/gpu-tests.log"
    else echo "gpu-tests: SKIPPED (tests/gpu/run_all.sh does not exist)" | tee -a "$OUT/steps.txt"; fi
}

part_decode() {
    local b
    for b in $BACKENDS; do
        bench decode-8b "$b" 150 one-batch --model-path $L8 "${COMMON[@]}" --context-length 4096 \
            --batch-size 1 --input-len 128 --output-len 256
        bench decode-smol "$b" 90 one-batch --model-path $SMOL "${COMMON[@]}" --context-length 4096 \
            --batch-size 1 --input-len 128 --output-len 256
    done
}

part_prefill() {
    local b
    for b in $BACKENDS; do
        bench prefill-8b "$b" 150 one-batch --model-path $L8 "${COMMON[@]}" --context-length 2048 \
            --batch-size 64 --input-len 1024 --output-len 1
    done
}

part_compare() {
    TAG_COMPARE=hf bench decode-8b-vs-hf "$COMPARE_BACKEND" 180 offline --model-path $L8 "${COMMON[@]}" \
        --context-length 4096 --num-prompts 1 --input-len 128 --output-len 256 --compare-hf
    TAG_COMPARE=hf bench decode-smol-vs-hf "$COMPARE_BACKEND" 120 offline --model-path $SMOL "${COMMON[@]}" \
        --context-length 4096 --num-prompts 1 --input-len 128 --output-len 256 --compare-hf
    TAG_COMPARE=hf bench prefill-8b-vs-hf "$COMPARE_BACKEND" 180 offline --model-path $L8 "${COMMON[@]}" \
        --context-length 2048 --num-prompts 64 --input-len 1024 --output-len 1 --compare-hf
}

part_model_tests() {
    step model-tests ${MODEL_TESTS_LIMIT_S:-420} python3 -m pytest tests/gpu/test_gpu_engine.py -q -rfEs -p no:cacheprovider \
        -k "${MODEL_TESTS_K:-qwen3 or phi3 or gemma}"
    tail -n 5 "$LOGS/model-tests.log"
}

part_models() {
    local cfg name
    for name in ${MODELS:-qwen3-8b gemma-2-9b}; do
        cfg=benchmarks/configs/$name
        [[ " ${MODEL_PARTS:-decode prefill compare offline} " == *" decode "* ]] && \
        bench "decode-$name" triton 150 one-batch --model-path "$cfg" "${COMMON[@]}" --context-length 4096 \
            --batch-size 1 --input-len 128 --output-len 256
        [[ " ${MODEL_PARTS:-decode prefill compare offline} " == *" prefill "* ]] && \
        bench "prefill-$name" triton 150 one-batch --model-path "$cfg" "${COMMON[@]}" --context-length 2048 \
            --batch-size 64 --input-len 1024 --output-len 1
        [[ " ${MODEL_PARTS:-decode prefill compare offline} " == *" compare "* ]] && \
        TAG_COMPARE=hf bench "decode-$name-vs-hf" triton 150 offline --model-path "$cfg" "${COMMON[@]}" \
            --context-length 4096 --num-prompts 1 --input-len 128 --output-len 256 --compare-hf
        [[ " ${MODEL_PARTS:-decode prefill compare offline} " == *" offline "* ]] && \
        TAG_COMPARE=hf bench "offline-$name-${OFFLINE_MODELS_PROMPTS:-128}x256-vs-hf" triton 200 offline --model-path "$cfg" "${COMMON[@]}" \
            --context-length 2048 --num-prompts "${OFFLINE_MODELS_PROMPTS:-128}" --input-len 256 --output-len 256 --compare-hf
    done
}

part_models_vs_hf() {
    local name
    for name in ${MODELS:-qwen3-8b gemma-2-9b}; do
        step "models-vs-hf-$name" "${MODEL_LIMIT_S:-260}" python3 benchmarks/models_vs_hf.py "benchmarks/configs/$name" \
            --attention-backend triton --workloads ${WORKLOADS:-1x128/256 64x256/128} --json "$RESULTS"
        grep '^{' "$LOGS/models-vs-hf-$name.log"
    done
}

part_offline() {
    local b
    for b in flashinfer triton; do
        [[ " $BACKENDS " == *" $b "* ]] || continue
        bench offline-8b "$b" "${OFFLINE_LIMIT_S:-240}" offline --model-path $L8 "${COMMON[@]}" --context-length 2048 \
            --cuda-graph-max-bs 256 --num-prompts "$OFFLINE_PROMPTS" --input-len 1024 --output-len 512
    done
    TAG_COMPARE=hf bench offline-8b-128x256-vs-hf "$COMPARE_BACKEND" 200 offline --model-path $L8 "${COMMON[@]}" \
        --context-length 2048 --num-prompts 128 --input-len 256 --output-len 256 --compare-hf
}

part_profile() {
    local b
    for b in $BACKENDS; do
        [ "$b" = torch_native ] && continue
        step "profile-decode-$(basename "$PROFILE_MODEL")-$b-bs$PROFILE_BS" 150 python3 benchmarks/profile_decode.py --model-path "$PROFILE_MODEL" \
            "${COMMON[@]}" --context-length 4096 --attention-backend "$b" --batch-size "$PROFILE_BS" \
            --input-len "$PROFILE_INPUT_LEN"
        sed -n '/decode profile/,$p' "$LOGS/profile-decode-$(basename "$PROFILE_MODEL")-$b-bs$PROFILE_BS.log"
    done
}

setup
for part in "$@"; do
    case $part in
        fi-tests) part_fi_tests ;; gpu-tests) part_gpu_tests ;; decode) part_decode ;;
        prefill) part_prefill ;; compare) part_compare ;; offline) part_offline ;; profile) part_profile ;;
        model-tests) part_model_tests ;; models) part_models ;; models-vs-hf) part_models_vs_hf ;;
        all) part_fi_tests; part_gpu_tests; part_decode; part_prefill; part_compare; part_offline; part_profile ;;
        *) echo "unknown part $part (fi-tests gpu-tests decode prefill compare offline profile model-tests models models-vs-hf all)"; exit 2 ;;
    esac
done
