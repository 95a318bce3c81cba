#!/usr/bin/env bash
# Every GPU correctness test on CUDA, with each attention plugin, with and without CUDA graphs
# and overlap scheduling, in one command; prints a short table (tests/gpu/summarize.py) and
# exits non-zero on a failure.
#
#   bash tests/gpu/run_all.sh            from anywhere; needs a CUDA device and kvyard importable
#                                        (installed editable here when it is not)
#
# Suites (each a pytest run with its own JUnit XML and log under $OUT, default /tmp/kvyard_gpu):
#   kernels     tests/gpu/test_gpu_kernels.py   triton / flex_attention / torch_native vs dense
#               attention, triton decode through real CUDA graphs, the fused layer kernels
#   engine      tests/gpu/test_gpu_engine.py    Engine greedy == transformers per plugin, graphs
#               on / off / no padding, fused kernels on / off, a prefill/decode hybrid; overlap
#               scheduling on (the CUDA default)
#   engine-no-overlap  the same with --disable-overlap-schedule (KVYARD_TEST_DISABLE_OVERLAP=1)
#   overlap     tests/gpu/test_gpu_overlap.py   overlap on == off on a workload with aborts
#               (triton graphs, torch_native), the worker stream and events, the future map
#   flashinfer  tests/gpu/test_flashinfer.py    (skipped where flashinfer is not installed)
#   speculative tests/gpu/test_gpu_speculative_graphs.py  verify / draft steps through CUDA graphs:
#               STANDALONE, EAGLE, EAGLE-3 greedy with graphs == without == no speculation
#   core-cuda   the CPU suite's CUDA-parametrized cases (torch_native, llama vs transformers)
# Environment: SUITES (default "kernels engine engine-no-overlap overlap flashinfer speculative core-cuda"),
# SUITE_TIMEOUT_S (900).
set -u
cd "$(dirname "$0")/../.." || exit 1
OUT_DIR=${OUT:-/tmp/kvyard_gpu}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
SUITES=${SUITES:-"kernels engine engine-no-overlap overlap flashinfer speculative core-cuda"}
SUITE_TIMEOUT_S=${SUITE_TIMEOUT_S:-900}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET KVYARD_TRITON_OPS

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "run_all.sh: no CUDA device visible to $PY"; exit 2; }
"$PY" -c "import kvyard, kvyard_plugins" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "run_all.sh: kvyard is not importable and could not be installed"; exit 2; }
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

suite() {   # suite NAME PYTEST_ARGS...
    local name=$1; shift
    local t0; t0=$(date +%s)
    timeout "$SUITE_TIMEOUT_S" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
        --junitxml="$OUT_DIR/$name.xml" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc ($(( $(date +%s) - t0 )) s), log $OUT_DIR/$name.log"
    (( rc != 0 && rc != 5 )) && tail -n 20 "$OUT_DIR/$name.log" | sed 's/^/    /'
    return 0
}

for s in $SUITES; do
    case $s in
        kernels)    suite kernels tests/gpu/test_gpu_kernels.py ;;
        engine)     KVYARD_TEST_DISABLE_OVERLAP=0 suite engine tests/gpu/test_gpu_engine.py ;;
        engine-no-overlap) KVYARD_TEST_DISABLE_OVERLAP=1 suite engine-no-overlap tests/gpu/test_gpu_engine.py ;;
        overlap)    suite overlap tests/gpu/test_gpu_overlap.py ;;
        flashinfer) suite flashinfer tests/gpu/test_flashinfer.py ;;
        speculative) suite speculative tests/gpu/test_gpu_speculative_graphs.py ;;
        core-cuda)  suite core-cuda tests/unit/attention/test_torch_native_attention.py tests/unit/models/test_llama_vs_hf.py -k cuda ;;
        *) echo "run_all.sh: unknown suite $s"; exit 2 ;;
    esac
done
echo
"$PY" tests/gpu/summarize.py "$OUT_DIR"
