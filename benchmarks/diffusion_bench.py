"""Images per second of a diffusion pipeline: diffusers called directly in a loop against kvyard
(the DiffusionEngine in-process, and `kvyard serve` over HTTP at batch 1 and with concurrent
requests that the queue batches), on a random pipeline built here (no weights are downloaded).

    OMP_NUM_THREADS=2 python benchmarks/diffusion_bench.py --shape tiny --size 64 --steps 2 --images 32
    python benchmarks/diffusion_bench.py --shape sd15 --size 512 --steps 20 --images 16 --device cuda \
        [--enable-torch-compile] [--out results.jsonl]

Shapes: "tiny" (the tests' pipeline: UNet 4/8 channels) and "sd15" (Stable Diffusion 1.5's UNet,
VAE and CLIP text encoder shapes, random weights, ~1.07 B parameters). Rows (one JSON line each):
  diffusers_loop      pipe(prompt, generator) once per image
  diffusers_batched   pipe(prompts[:B], generators[:B]) per B images (the batched ceiling)
  engine_bs1          DiffusionEngine.run one job at a time (the plugin path, no HTTP)
  serve_bs1           one HTTP request at a time to `kvyard serve`
  serve_concurrent    B requests in flight at a time (the queue batches them)
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from kvyard.utils import free_port

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def build_sd15(path: str) -> str:
    """A random SD-1.5-shaped pipeline (configs written out, not downloaded)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_diffusion import _clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, vocab_size=520, max_position_embeddings=77,
                                        bos_token_id=517, eos_token_id=518, pad_token_id=518))
    tok = _clip_tokenizer(path + ".tok")
    tok.model_max_length = 77
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


def build(shape: str, root: str) -> str:
    from tiny_diffusion import build_sd
    return build_sd(os.path.join(root, "tiny")) if shape == "tiny" else build_sd15(os.path.join(root, "sd15"))


def rate(images: int, seconds: float) -> dict:
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 3)}


def bench_diffusers(path: str, a, dtype: torch.dtype) -> list[dict]:
    from tiny_diffusion import reference_pipeline
    pipe = reference_pipeline(path).to(a.device, dtype)
    if a.enable_torch_compile:
        pipe.unet.compile()
    kw = dict(height=a.size, width=a.size, num_inference_steps=a.steps)
    gen = lambda i: torch.Generator().manual_seed(i)  # noqa: E731
    with torch.inference_mode():
        for i in range(a.warmup):
            pipe(prompt="warmup", generator=gen(i), **kw)
            pipe(prompt=["warmup"] * a.batch, generator=[gen(j) for j in range(a.batch)], **kw)
        t0 = time.perf_counter()
        for i in range(a.images):
            pipe(prompt=f"prompt {i}", generator=gen(i), **kw)
        rows = [{"row": "diffusers_loop", **rate(a.images, time.perf_counter() - t0)}]
        t0 = time.perf_counter()
        for start in range(0, a.images, a.batch):
            ids = range(start, min(a.images, start + a.batch))
            pipe(prompt=[f"prompt {i}" for i in ids], generator=[gen(i) for i in ids], **kw)
        rows.append({"row": "diffusers_batched", "batch": a.batch, **rate(a.images, time.perf_counter() - t0)})
    del pipe
    return rows


def bench_engine(path: str, a) -> list[dict]:
    from kvyard.diffusion import DiffusionArgs, DiffusionEngine
    engine = DiffusionEngine(DiffusionArgs(model_path=path, device=a.device, dit_precision=a.precision,
                                           vae_precision=a.precision, enable_torch_compile=a.enable_torch_compile))
    job = lambda i: engine.make_job({"prompt": f"prompt {i}", "seed": i, "height": a.size, "width": a.size,  # noqa: E731
                                     "num_inference_steps": a.steps})
    for i in range(a.warmup):
        engine.run([job(i)])
    t0 = time.perf_counter()
    for i in range(a.images):
        engine.run([job(i)])
    return [{"row": "engine_bs1", **rate(a.images, time.perf_counter() - t0)}]


def bench_serve(path: str, a) -> list[dict]:
    import requests
    port = free_port()
    cmd = [sys.executable, "-m", "kvyard.cli", "serve", "--model-path", path, "--port", str(port), "--device", a.device,
           "--dit-precision", a.precision, "--vae-precision", a.precision, "--max-batch-size", str(a.batch),
           "--log-level", "warning"] + (["--enable-torch-compile"] if a.enable_torch_compile else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            if line.startswith("kvyard server ready at "):
                break
            seen.append(line)
        else:
            raise RuntimeError("kvyard serve exited before it was ready:\n" + "".join(seen[-30:]))
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        size = f"{a.size}x{a.size}"

        def one(i: int) -> None:
            r = requests.post(url, json={"prompt": f"prompt {i}", "seed": i, "size": size,
                                         "num_inference_steps": a.steps}, timeout=600)
            r.raise_for_status()
            base64.b64decode(r.json()["data"][0]["b64_json"])

        for i in range(a.warmup):
            one(i)
            with cf.ThreadPoolExecutor(a.batch) as pool:
                list(pool.map(one, range(a.batch)))
        t0 = time.perf_counter()
        for i in range(a.images):
            one(i)
        rows = [{"row": "serve_bs1", **rate(a.images, time.perf_counter() - t0)}]
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(a.batch) as pool:
            list(pool.map(one, range(a.images)))
        rows.append({"row": "serve_concurrent", "batch": a.batch, **rate(a.images, time.perf_counter() - t0)})
        return rows
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--model-path", default=None, help="an existing diffusers folder instead of --shape")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="images per batched call / requests in flight")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="default: fp32 on the CPU, fp16 on CUDA")
    p.add_argument("--enable-torch-compile", action="store_true")
    p.add_argument("--rows", default="diffusers,engine,serve", help="which groups to run")
    p.add_argument("--out", default=None, help="append the JSON rows to this file")
    p.add_argument("--build-only", default=None, metavar="DIR", help="save the --shape pipeline in DIR and exit")
    a = p.parse_args(argv)
    if a.build_only:
        print(build(a.shape, a.build_only))
        return 0
    a.precision = a.precision or ("fp32" if a.device == "cpu" else "fp16")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.precision]
    groups = set(a.rows.split(","))
    with tempfile.TemporaryDirectory() as root:
        path = a.model_path or build(a.shape, root)
        rows = []
        if "diffusers" in groups:
            rows += bench_diffusers(path, a, dtype)
        if "engine" in groups:
            rows += bench_engine(path, a)
        if "serve" in groups:
            rows += bench_serve(path, a)
    meta = {"shape": a.model_path or a.shape, "size": a.size, "steps": a.steps, "device": a.device,
            "precision": a.precision, "torch_compile": a.enable_torch_compile,
            "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None}
    print(f"{'row':<20} {'batch':>5} {'images':>6} {'seconds':>8} {'images/s':>9}")
    for row in rows:
        print(f"{row['row']:<20} {row.get('batch', 1):>5} {row['images']:>6} {row['seconds']:>8} {row['images_per_s']:>9}")
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps({**meta, **row}) + "\n")
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
