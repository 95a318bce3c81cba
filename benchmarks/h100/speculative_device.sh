#!/usr/bin/env bash
# Speculative decoding on the H100 in one device call (kind nvidia-h100-x1, carry .whl: gguf +
# pyzmq wheels for the device's Python), Llama-3.1-8B shape with dummy weights, batch 1:
#   plain decode vs STANDALONE self-draft (acceptance 1) at num_steps 1..4, the verify forward's
#   cost vs a plain decode forward, the draft forward's, and a random EAGLE-3 head (8B EAGLE-3
#   shape) with its draft step time, chains and top-4 trees of 8 tokens (tree-masked verify on the
#   triton backend): benchmarks/speculative_device.py.
# Output under $OUT: env.txt, setup.txt, speculative.txt (the table), speculative.jsonl.
#   STEPS="2 4" OUTPUT_LEN=128 bash benchmarks/h100/speculative_device.sh   # a shorter call
set -u
cd "$(dirname "$0")/../.." || exit 1
source benchmarks/h100/device_setup.sh
timeout 560 python3 benchmarks/speculative_device.py --steps ${STEPS:-1 2 3 4} --output-len ${OUTPUT_LEN:-256} \
    --json "$OUT/speculative.jsonl" 2>&1 | tail -20 | tee "$OUT/speculative.txt"
