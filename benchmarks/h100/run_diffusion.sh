#!/usr/bin/env bash
# The diffusion benchmark on the device, one call (see docs/performance.md for the figures):
#   run(kind="nvidia-h100-x1", timeout_s=600, carry=[".whl_diffusion"],
#       command="bash benchmarks/h100/run_diffusion.sh")
# Setup: the wheels of .whl_diffusion/ (benchmarks/h100/prepare_diffusion.sh makes them) into
# /tmp/site, kvyard as an editable install. Then a random SD-1.5-shaped pipeline (UNet, VAE, CLIP
# text encoder; ~1.07 B parameters) at 512x512, 20 steps, fp16: diffusers in a loop and batched,
# the DiffusionEngine at batch 1, `kvyard serve` at batch 1 and with 8 requests in flight; then
# diffusers and serve again with --enable-torch-compile. Before them tests/gpu/test_gpu_diffusion.py
# (pixels equal diffusers' on cuda, mixed precisions, the CPU offloads) -> $OUT/gpu_tests.txt. Rows go to $OUT/diffusion.jsonl, the
# tables to $OUT/diffusion.txt. Environment: IMAGES (16), BATCH (8), STEPS (20), SIZE (512),
# BUDGET_S (560: the compiled part is skipped when less than 200 s are left).
set -u
cd "$(dirname "$0")/../.." || exit 1
START=$(date +%s)
OUT=${OUT:-/tmp/kvyard_out}
mkdir -p "$OUT"
IMAGES=${IMAGES:-16} BATCH=${BATCH:-8} STEPS=${STEPS:-20} SIZE=${SIZE:-512} BUDGET_S=${BUDGET_S:-560}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_diffusion/*.whl > "$OUT/setup.log" 2>&1 || { echo "setup: wheel install FAILED"; tail "$OUT/setup.log"; }
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/setup.log" 2>&1 \
    || { echo "setup: kvyard install FAILED"; tail "$OUT/setup.log"; exit 1; }
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/env.txt"
# correctness on CUDA first (~1 min): pixels equal diffusers', fp16 + fp32 VAE, the CPU offloads
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_diffusion.py 2>&1 | tail -n 15 \
    | tee "$OUT/gpu_tests.txt"
python3 benchmarks/diffusion_bench.py --shape sd15 --build-only /tmp/pipes || exit 1
BENCH=(python3 benchmarks/diffusion_bench.py --model-path /tmp/pipes/sd15 --device cuda --precision fp16
       --size "$SIZE" --steps "$STEPS" --images "$IMAGES" --batch "$BATCH" --out "$OUT/diffusion.jsonl")
left() { echo $(( BUDGET_S - $(date +%s) + START )); }
echo "== eager ($(( $(date +%s) - START )) s in) ==" | tee -a "$OUT/diffusion.txt"
timeout "$(left)" "${BENCH[@]}" 2>"$OUT/eager.err" | tee -a "$OUT/diffusion.txt"
if (( $(left) > 200 )); then
    echo "== torch.compile ($(( $(date +%s) - START )) s in) ==" | tee -a "$OUT/diffusion.txt"
    timeout "$(left)" "${BENCH[@]}" --enable-torch-compile --rows diffusers,serve 2>"$OUT/compile.err" \
        | tee -a "$OUT/diffusion.txt"
else
    echo "torch.compile part SKIPPED: $(left) s left" | tee -a "$OUT/diffusion.txt"
fi
tail -n 5 "$OUT"/*.err
echo "done in $(( $(date +%s) - START )) s"
