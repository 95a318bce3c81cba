#!/usr/bin/env bash
# Speculative decoding on the H100 in one device call (kind nvidia-h100-x1, carry .whl: gguf +
# pyzmq wheels for the device's Python), Llama-3.1-8B shape with dummy weights, batch 1:
#   plain decode vs STANDALONE self-draft (acceptance 1) at num_steps 2 and 4 (STEPS), the same
#   with a 1-layer truncation of the target as the draft (acceptance 1, the upper bound with a
#   cheap draft), the verify step's cost vs a plain decode step, the draft steps', and a random
#   EAGLE-3 head (8B EAGLE-3 shape) with its draft step time; CUDA graphs on for decode, verify
#   and draft steps (the "graphs:" line says which), and the head's top-4 trees of 8 tokens
#   (tree-masked verify on the triton backend, eager): benchmarks/speculative_device.py. Its last
#   lines split each STANDALONE cycle into its forwards and the host work outside them.
# Output under $OUT: env.txt, setup.txt, speculative.txt (the table), speculative.jsonl.
#   STEPS="4" OUTPUT_LEN=128 bash benchmarks/h100/speculative_device.sh   # a shorter call
set -u
cd "$(dirname "$0")/../.." || exit 1
source benchmarks/h100/device_setup.sh
timeout 560 python3 benchmarks/speculative_device.py --steps ${STEPS:-2 4} --output-len ${OUTPUT_LEN:-256} \
    --json "$OUT/speculative.jsonl" 2>&1 | tail -50 | tee "$OUT/speculative.txt"
