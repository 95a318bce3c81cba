#!/usr/bin/env bash
# Wheels the diffusion benchmark needs on the device and its image lacks (KINDS.md's package list):
# diffusers and the HTTP server's stack, for Python 3.12, into .whl_diffusion/ (ignored by git, ~5 MB).
#   bash benchmarks/h100/prepare_diffusion.sh          # here, from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl_diffusion
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl_diffusion diffusers==0.42.1 python-multipart==0.0.34 importlib_metadata==10.2.0 \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.13.4 pydantic_core==2.46.4 \
    annotated-types==0.7.0 typing-inspection==0.4.2 pyzmq==27.3.0 gguf==0.18.0 prometheus_client==0.26.0 \
    annotated-doc==0.0.7 opentelemetry-api==1.45.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
    referencing==0.37.0 rpds-py==2026.9.1
# fastapi 0.165 imports annotated_doc and opentelemetry at import; kvyard's request checks import
# jsonschema: without them `kvyard serve` exits at start-up on the device.
ls .whl_diffusion
du -sh .whl_diffusion
