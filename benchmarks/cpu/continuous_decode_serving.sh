#!/usr/bin/env bash
# One streaming client against `kvyard serve`, continuous decode on (the default) vs off
# (--num-continuous-decode-steps 1), servers started alternately: on, off, on, off, ...
#
#   bash benchmarks/cpu/continuous_decode_serving.sh [ROUNDS]      (default 2 rounds, ~4 min)
#
# Each server: the default model, --num-threads $THREADS, --max-total-tokens 4096; the load:
# kvyard bench serving, NUM_PROMPTS (8) requests one at a time (--max-concurrency 1), 128 in /
# 128 out, streaming. results.jsonl gets one line per run (TTFT, TPOT, ITL, e2e: mean, median,
# p99); summary.txt one line per run with the setting and the load average before it.
# Environment: THREADS (2), NUM_PROMPTS (8), OUT (/tmp/kvyard_continuous_decode).
set -u
cd "$(dirname "$0")/../.." || exit 1
ROUNDS=${1:-2}
THREADS=${THREADS:-2}
NUM_PROMPTS=${NUM_PROMPTS:-8}
OUT=${OUT:-/tmp/kvyard_continuous_decode}
PORT=31290
mkdir -p "$OUT"

wait_ready() {
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0; sleep 1; done
  return 1
}

run_one() {  # NAME FLAGS...
  local name=$1; shift
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  kvyard serve --port "$PORT" --num-threads "$THREADS" --max-total-tokens 4096 "$@" > "$OUT/$name-server.log" 2>&1 &
  local pid=$!
  if ! wait_ready; then echo "$name: server did not come up (see $OUT/$name-server.log)"; kill "$pid"; return 1; fi
  kvyard bench serving --backend kvyard --base-url "http://127.0.0.1:$PORT" --num-prompts "$NUM_PROMPTS" \
    --random-input-len 128 --random-output-len 128 --random-range-ratio 1.0 --max-concurrency 1 \
    --request-rate inf --output-file "$OUT/results.jsonl" > "$OUT/$name-bench.log" 2>&1
  python - "$OUT/results.jsonl" "$name" "$load" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
row = json.loads(open(sys.argv[1]).read().splitlines()[-1])
print(f"{sys.argv[2]:>4} load {sys.argv[3]}: TTFT median {row['median_ttft_ms']:.1f} ms, "
      f"TPOT median {row['median_tpot_ms']:.2f} ms, ITL median {row['median_itl_ms']:.2f} ms "
      f"p99 {row['p99_itl_ms']:.2f} ms, output tok/s {row['output_throughput']:.1f}")
EOF
  kill "$pid"; wait "$pid" 2>/dev/null
}

for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then
    run_one "on$r"; run_one "off$r" --num-continuous-decode-steps 1
  else
    run_one "off$r" --num-continuous-decode-steps 1; run_one "on$r"
  fi
done
