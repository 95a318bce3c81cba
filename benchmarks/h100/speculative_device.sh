#!/usr/bin/env bash
# Speculative decoding on the H100 in one device call (kind nvidia-h100-x1, carry .whl: gguf +
# pyzmq wheels for the device's Python), Llama-3.1-8B shape with dummy weights, batch 1:
#   plain decode vs STANDALONE self-draft (acceptance 1) at num_steps 1..4, the verify forward's
#   cost vs a plain decode forward, the draft forward's, and a random EAGLE-3 head (8B EAGLE-3
#   shape) with its draft step time: benchmarks/speculative_device.py.
# Output under $OUT: env.txt, setup.txt, speculative.txt (the table), speculative.jsonl.
#   STEPS="2 4" OUTPUT_LEN=128 bash benchmarks/h100/speculative_device.sh   # a shorter call
set -u
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/kvyard_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/setup.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD/tests
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/setup.txt" 2>&1 \
    || python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >> "$OUT/setup.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
timeout 560 python3 benchmarks/speculative_device.py --steps ${STEPS:-1 2 3 4} --output-len ${OUTPUT_LEN:-256} \
    --json "$OUT/speculative.jsonl" 2>&1 | tail -20 | tee "$OUT/speculative.txt"
