#!/usr/bin/env bash
# MoE / DeepSeek on the H100 in one device call (kind nvidia-h100-x1, carry .whl: gguf + pyzmq
# wheels for the device's Python):
#   1. the fused-experts kernel vs the torch path (benchmarks/moe_kernel_bench.py)
#   2. tests/gpu/test_gpu_moe.py: every MoE / DeepSeek tiny model through the Engine on cuda,
#      CUDA graphs on and off, greedy == transformers
#   3. batch-1 decode (128 in / 256 out, bf16, dummy weights, triton attention) for the
#      OLMoE-1B-7B, Qwen3-30B-A3B and DeepSeek-V2-Lite configs
# Output under $OUT: kernel.jsonl, kernel.txt, gpu_tests.txt, decode_*.jsonl / .txt.
set -u
cd "$(dirname "$0")/../.." || exit 1
source benchmarks/h100/device_setup.sh
PARTS=${PARTS:-"kernel tests decode"}
for part in $PARTS; do
  case $part in
    kernel) timeout 200 python3 benchmarks/moe_kernel_bench.py --json "$OUT/kernel.jsonl" 2>&1 | tee "$OUT/kernel.txt" ;;
    tests) timeout 300 python3 -m pytest tests/gpu/test_gpu_moe.py -q -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt" ;;
    decode)
      for cfg in olmoe-1b-7b deepseek-v2-lite qwen3-30b-a3b; do
        timeout 200 python3 -m kvyard.cli bench one-batch --model-path benchmarks/configs/$cfg --load-format dummy \
          --dtype bfloat16 --skip-tokenizer-init --log-level warning --context-length 4096 --attention-backend triton \
          --batch-size 1 --input-len 128 --output-len 256 --output-file "$OUT/decode_$cfg.jsonl" 2>&1 | tail -8 | tee "$OUT/decode_$cfg.txt"
      done ;;
  esac
done
