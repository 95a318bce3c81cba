"""Diffusion pipelines on a CUDA device (skipped elsewhere): the tiny Stable-Diffusion pipeline on
cuda gives diffusers' own pixels for the same dtype and seed; fp16 with an fp32 VAE runs; the
per-component CPU offloads keep the chosen components off the GPU between uses and give the same
pixels as no offload."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_guard import require_gpu

require_gpu(triton=False)
pytest.importorskip("diffusers")

from tiny_diffusion import build_sd, reference_pipeline  # noqa: E402

from kvyard.diffusion import DiffusionEngine  # noqa: E402

JOB = dict(prompt="a red bicycle", seed=3, num_inference_steps=2, height=32, width=32)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return build_sd(str(tmp_path_factory.mktemp("gpu_sd") / "sd"))


def reference(path: str, dtype: torch.dtype):
    pipe = reference_pipeline(path).to("cuda", dtype)
    return pipe(prompt=JOB["prompt"], generator=torch.Generator().manual_seed(JOB["seed"]),
                num_inference_steps=2, height=32, width=32).images[0]


def test_cuda_fp32_matches_diffusers(sd):
    engine = DiffusionEngine(model_path=sd, device="cuda", dit_precision="fp32", vae_precision="fp32")
    image = engine.generate(**JOB)[0]
    assert np.array_equal(np.asarray(image), np.asarray(reference(sd, torch.float32)))


def test_fp16_denoiser_with_fp32_vae_runs(sd):
    engine = DiffusionEngine(model_path=sd, device="cuda", dit_precision="fp16", vae_precision="fp32")
    assert engine.backend.pipe.unet.dtype == torch.float16 and engine.backend.pipe.vae.dtype == torch.float32
    assert engine.generate(**JOB)[0].size == (32, 32)


@pytest.mark.parametrize("flags", [{"text_encoder_cpu_offload": True},
                                   {"dit_cpu_offload": True, "vae_cpu_offload": True, "text_encoder_cpu_offload": True}])
def test_cpu_offload(sd, flags):
    engine = DiffusionEngine(model_path=sd, device="cuda", dit_precision="fp32", vae_precision="fp32", **flags)
    image = engine.generate(**JOB)[0]
    pipe = engine.backend.pipe
    assert pipe.text_encoder.device.type == "cpu"    # back on the CPU after use
    if "dit_cpu_offload" not in flags:
        assert pipe.unet.device.type == "cuda"        # not offloaded: stays on the device
    assert np.array_equal(np.asarray(image), np.asarray(reference(sd, torch.float32)))
