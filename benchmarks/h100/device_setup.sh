# Sourced by the single-call device scripts (moe_device.sh, lora_device.sh, speculative_device.sh) from the repository
# root: $OUT, the environment, the wheels the device image lacks (carried .whl/ into /tmp/site),
# kvyard itself (editable, else into /tmp/site), and env.txt with the library versions.
OUT=${OUT:-/tmp/kvyard_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/setup.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD/tests
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/setup.txt" 2>&1 \
    || python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >> "$OUT/setup.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
