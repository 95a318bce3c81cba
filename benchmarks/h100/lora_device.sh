#!/usr/bin/env bash
# Multi-LoRA serving on the H100 in one device call (kind nvidia-h100-x1, carry .whl: the gguf and
# pyzmq wheels the device image lacks, as for moe_device.sh):
#   1. kernels: Llama-3.1-8B's four LoRA layers (qkv 4096 -> 4096+1024+1024, o, gate_up, down) at
#      decode, batch 1 and 64, 1 and 8 rank-16 adapters: the Triton shrink/expand pair (and the
#      split-K shrink and the expand alone) vs the torch path (one matmul pair per adapter) vs a
#      torch loop over the requests; beside them the fused form serving uses (base GEMM alone, GEMM
#      over W_ext = base + 8 slots' A rows with the one expand launch, the expand alone, and
#      "fused overhead" = their difference); every Triton result is checked against torch first
#   2. decode: Llama-3.1-8B shape (benchmarks/configs/llama-3.1-8b, dummy weights, bf16, triton
#      attention, CUDA graphs on), batch 1 and 64, 128-token prompts, 64 timed decode steps, no LoRA
#      vs 1 and 8 distinct rank-16 adapters (dummy, all seven projections) per batch, 3 rounds
#      alternating the configurations; the issue's target: <= 15% slower at batch 64 with 8 adapters.
#      The LoRA engine uses the triton backend, so its unquantized layers run the fused form (the
#      first line of decode.txt says how many of the 128 layers fuse). PAIR=8 adds "8 adapters
#      (pair)": a third engine whose layers keep the shrink/expand pair (the old form, same run)
# Output under $OUT: env.txt, kernels.txt, decode.txt, lora.jsonl (one JSON line per measurement).
#
#   bash benchmarks/h100/lora_device.sh            from the repository root, on the device
#   PARTS=decode PAIR=8 bash benchmarks/h100/lora_device.sh    fused vs pair, decode only
set -u
cd "$(dirname "$0")/../.." || exit 1
source benchmarks/h100/device_setup.sh
PARTS=${PARTS:-"kernels decode"}
for part in $PARTS; do
  case $part in
    kernels) timeout 180 python3 benchmarks/lora_bench.py kernels --batch-sizes 1 64 --adapters 1 8 --rank 16 \
               --json "$OUT/lora.jsonl" 2>&1 | tail -100 | tee "$OUT/kernels.txt" ;;
    decode) timeout 420 python3 benchmarks/lora_bench.py decode --model-path benchmarks/configs/llama-3.1-8b \
              --load-format dummy --dtype bfloat16 --attention-backend triton --batch-sizes 1 64 --adapters 1 8 \
              --rank 16 --rounds 3 --decode-steps 64 --max-total-tokens 32768 --max-running-requests 64 ${PAIR:+--pair-adapters $PAIR} \
              --json "$OUT/lora.jsonl" 2>&1 | tail -20 | tee "$OUT/decode.txt" ;;
  esac
done
