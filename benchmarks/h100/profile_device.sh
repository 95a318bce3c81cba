#!/usr/bin/env bash
# Where decode steps spend their time on the H100, in one device call (kind nvidia-h100-x1, carry
# .whl): benchmarks/profile_decode.py (torch.profiler over 50 decode steps replayed from CUDA
# graphs: kernels per step, launch gaps, host waits, the top kernels) for each entry of PROFILES,
# Llama-3.1-8B shape, dummy weights, bf16, triton attention.
#   PROFILES  "name:batch:input_len:extra flags;..."  (default: int4 and fp8 at batch 1, and bf16
#             vs fp8 weights + fp8 KV at batch 256 over 1280-token contexts, the offline regime)
#   EACH_S    seconds per entry (150)
# Output under $OUT: env.txt, setup.txt, profiles.txt.
set -u
cd "$(dirname "$0")/../.." || exit 1
source benchmarks/h100/device_setup.sh
L8=benchmarks/configs/llama-3.1-8b
COMMON=(--model-path $L8 --load-format dummy --dtype bfloat16 --attention-backend triton --context-length 2048)
PROFILES=${PROFILES:-"int4:1:128:--quantization gptq;fp8:1:128:--quantization fp8;bf16-256:256:1280:--cuda-graph-max-bs 256;fp8kv-256:256:1280:--quantization fp8 --kv-cache-dtype fp8_e4m3 --cuda-graph-max-bs 256"}
IFS=';' read -ra entries <<< "$PROFILES"
for e in "${entries[@]}"; do
    IFS=':' read -r name bs len extra <<< "$e"
    echo "=== $name (batch $bs, input $len, $extra)" | tee -a "$OUT/profiles.txt"
    # shellcheck disable=SC2086
    timeout "${EACH_S:-150}" python3 benchmarks/profile_decode.py "${COMMON[@]}" --batch-size "$bs" \
        --input-len "$len" $extra > "/tmp/profile_$name.log" 2>&1
    echo "rc=$?" >> "$OUT/profiles.txt"
    sed -n '/decode profile/,$p' "/tmp/profile_$name.log" | tee -a "$OUT/profiles.txt"
    grep -q "decode profile" "/tmp/profile_$name.log" || tail -n 15 "/tmp/profile_$name.log" | tee -a "$OUT/profiles.txt"
done
