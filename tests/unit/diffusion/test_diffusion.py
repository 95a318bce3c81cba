"""Diffusion pipelines: detection, the plugin kind and "auto", job checks, the batching queue,
output files, and `kvyard generate` giving exactly the pixels diffusers gives (tiny random
pipelines built with diffusers' own classes; 32x32, 2 steps)."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

pytest.importorskip("diffusers")

from tiny_diffusion import (build_sd, build_sd3, build_sd_img2img, red_image,  # noqa: E402
                            reference_images)

from kvyard.cli.generate import run_generate  # noqa: E402
from kvyard.diffusion.detect import resolve_model_type  # noqa: E402
from kvyard.diffusion.jobs import make_job, parse_size  # noqa: E402
from kvyard.diffusion.pipeline import ImageJob, PipelineInfo  # noqa: E402
from kvyard.diffusion.queue import ImageQueue  # noqa: E402
from kvyard.errors import RequestError  # noqa: E402

COMMON = ["--num-inference-steps", "2", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd": build_sd(str(root / "sd")), "sd3": build_sd3(str(root / "sd3")),
            "img2img": build_sd_img2img(str(root / "img2img"))}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def load(path):
    from PIL import Image
    with Image.open(path) as im:
        return pixels(im)


# -- detection -----------------------------------------------------------------------------------
def test_detection(pipes, tmp_path):
    assert resolve_model_type(pipes["sd"], "auto") == "diffusion"
    assert resolve_model_type(str(tmp_path), "auto") == "llm"
    with pytest.raises(ValueError, match="model_type: llm was forced but .* is a diffusers pipeline"):
        resolve_model_type(pipes["sd"], "llm")
    with pytest.raises(ValueError, match="model_type: diffusion was forced"):
        resolve_model_type(str(tmp_path), "diffusion")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X"}))  # no _diffusers_version
    assert resolve_model_type(str(tmp_path), "auto") == "llm"


def test_engine_refuses_diffusers_folder(pipes):
    from kvyard.frontend.launch import resolve_args
    from kvyard.server_args import ServerArgs
    with pytest.raises(ValueError, match="is a diffusion pipeline; kvyard.Engine runs LLMs"):
        resolve_args(ServerArgs(model_path=pipes["sd"]))


def test_cli_forced_llm_is_one_line_error(pipes, capsys):
    assert run_generate(["--model-path", pipes["sd"], "--model-type", "llm", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "model_type: llm was forced" in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_job_flags(pipes, capsys):
    from kvyard.cli.serve import run_serve
    assert run_serve(["--model-path", pipes["sd"], "--prompt", "x"]) == 1
    assert "prompt: applies to `kvyard generate`; a server takes it per request" in capsys.readouterr().err


def test_missing_diffusers_names_the_extra(monkeypatch):
    import sys
    from kvyard_plugins.diffusion.diffusers_pipeline import import_diffusers
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ValueError, match=r'pip install "kvyard\[diffusion\]"'):
        import_diffusers()


# -- plugin kind and auto ------------------------------------------------------------------------
def test_auto_prefers_a_native_plugin_that_claims_the_class():
    from kvyard.executor.backend_select import resolve_diffusion_backend
    from kvyard.hookspecs import hookimpl
    from kvyard.plugins import PluginManager, get_plugin_manager, reset_plugin_manager
    from kvyard.diffusion.pipeline import DiffusionPipelineBackend

    class NativeSD(DiffusionPipelineBackend):
        name = "native_sd"

        @classmethod
        def claims(cls, pipeline_class):
            return pipeline_class == "StableDiffusionPipeline"

    class Plugin:
        @hookimpl
        def register_diffusion_pipelines(self, register):
            register("native_sd", NativeSD)

    saved = get_plugin_manager()
    pm = PluginManager()
    pm.add_plugin(Plugin())
    reset_plugin_manager(pm)
    try:
        assert "diffusers" in pm.registry("diffusion_pipelines")
        assert resolve_diffusion_backend("auto", "StableDiffusionPipeline") == "native_sd"
        assert resolve_diffusion_backend("auto", "FluxPipeline") == "diffusers"
        assert resolve_diffusion_backend("diffusers", "StableDiffusionPipeline") == "diffusers"
    finally:
        reset_plugin_manager(saved)


# -- job checks ----------------------------------------------------------------------------------
INFO = PipelineInfo(pipeline_class="P", backend="diffusers", size_multiple=8, default_height=64, default_width=64,
                    accepts=frozenset({"prompt", "negative_prompt", "height", "width", "guidance_scale", "eta"}))


@pytest.mark.parametrize("fields, field", [
    ({"height": 60, "width": 64}, "height"), ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"n": 9}, "n"), ({"num_frames": 4}, "num_frames"), ({"image": red_image()}, "image"),
    ({"strength": 0.5}, "strength"), ({"guidance_scale": -1}, "guidance_scale"), ({"prompt": ""}, "prompt"),
    ({"extra": {"foo": 1}}, "diffusers_kwargs"), ({"extra": {"prompt": "x"}}, "diffusers_kwargs"),
    ({"height": 64}, "width"), ({"seed": -1}, "seed"),
])
def test_bad_job_fields_name_the_field(fields, field):
    with pytest.raises(RequestError) as exc:
        make_job({"prompt": "p", **fields}, INFO, max_n=8)
    assert exc.value.param == field and exc.value.message.startswith(field + ":")


def test_job_defaults_and_size():
    job = make_job({"prompt": "p", "seed": 3, "extra": {"eta": 0.5}}, INFO, max_n=8)
    assert (job.height, job.width, job.num_inference_steps, job.seed, job.n) == (64, 64, 50, 3, 1)
    assert parse_size("48x32") == (32, 48)
    with pytest.raises(RequestError, match="size: expected WIDTHxHEIGHT"):
        parse_size("big")


# -- the queue -----------------------------------------------------------------------------------
def _job(size: int, n: int = 1, seed: int = 0) -> ImageJob:
    return ImageJob(prompt="p", height=size, width=size, num_inference_steps=2, seed=seed, n=n)


def test_queue_batches_compatible_jobs_and_survives_failures():
    gate, calls = threading.Event(), []

    def run(jobs, on_step):
        gate.wait(10)
        calls.append([(j.height, j.seed) for j in jobs])
        if any(j.seed == 99 for j in jobs):
            raise RuntimeError("boom")
        on_step(1, 1)
        return [[f"{j.height}:{j.seed}:{i}" for i in range(j.n)] for j in jobs]

    q = ImageQueue(run, max_batch_size=4)
    steps = []
    first = q.submit(_job(32, seed=0))          # the worker takes it alone, then waits on the gate
    while q.queue_length():
        pass
    futures = [q.submit(_job(32 if i % 2 else 48, seed=i + 1), on_step=lambda i, t: steps.append(i))
               for i in range(6)]
    big = q.submit(_job(32, n=3, seed=50))      # does not fit the 32-batch's 4 images
    gate.set()
    assert first.result(10) == ["32:0:0"]
    assert [f.result(10) for f in futures][:2] == [["48:1:0"], ["32:2:0"]]
    assert big.result(10) == ["32:50:0", "32:50:1", "32:50:2"]
    assert calls[1:] == [[(48, 1), (48, 3), (48, 5)], [(32, 2), (32, 4), (32, 6)], [(32, 50)]]
    assert len(steps) == 6
    bad = q.submit(_job(32, seed=99))
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(10)
    assert q.submit(_job(32, seed=7)).result(10) == ["32:7:0"]   # still serving
    q.close()
    with pytest.raises(RequestError):
        q.submit(_job(32))


def test_queue_limit_is_429():
    gate = threading.Event()
    q = ImageQueue(lambda jobs, on_step: gate.wait(10) and [[1] for _ in jobs], max_batch_size=1, max_queued=1)
    q.submit(_job(32))
    while q.queue_length():
        pass
    q.submit(_job(32))
    with pytest.raises(RequestError) as exc:
        q.submit(_job(32))
    assert exc.value.status == 429
    gate.set()
    q.close()


# -- outputs -------------------------------------------------------------------------------------
def test_output_formats_and_video(tmp_path):
    from kvyard.diffusion.outputs import save_image, save_mp4
    img = red_image()
    for ext in ("png", "webp"):
        assert np.array_equal(load(save_image(img, str(tmp_path / f"a.{ext}"))), pixels(img))  # lossless
    assert load(save_image(img, str(tmp_path / "a.jpg"))).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="output_file_name: unknown image format '.bmp'"):
        save_image(img, str(tmp_path / "a.bmp"))
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    path = save_mp4([img, img.rotate(90)], str(tmp_path / "v.mp4"), fps=4)
    assert imageio_ffmpeg.count_frames_and_secs(path) == (2, 0.5)


# -- kvyard generate: exactly diffusers' pixels --------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_generate_matches_diffusers(pipes, kind, tmp_path):
    out = tmp_path / "out"
    argv = ["--model-path", pipes[kind], "--prompt", "A red bicycle", "--negative-prompt", "blurry",
            "--guidance-scale", "5", "--seed", "7", *COMMON, "--save-output", "--output-path", str(out),
            "--output-file-name", "bike.png", "--num-outputs-per-prompt", "2"]
    if kind == "sd3":
        argv += ["--max-batch-size", "1"]   # two calls of one image each: the same images
    assert run_generate(argv) == 0
    ref = reference_images(pipes[kind], seed=7, n=2, prompt="A red bicycle", negative_prompt="blurry",
                           guidance_scale=5.0, num_inference_steps=2, height=32, width=32)
    assert np.array_equal(load(out / "bike_0.png"), pixels(ref[0]))
    assert np.array_equal(load(out / "bike_1.png"), pixels(ref[1]))


def test_generate_img2img_matches_diffusers(pipes, tmp_path):
    src = tmp_path / "in.png"
    red_image().save(src)
    argv = ["--model-path", pipes["img2img"], "--prompt", "a cat", "--image-path", str(src), "--strength", "0.8",
            "--num-inference-steps", "3", "--seed", "1", "--output-path", str(tmp_path), "--output-file-name", "o.webp"]
    assert run_generate(argv) == 0
    ref = reference_images(pipes["img2img"], seed=1, prompt="a cat", image=red_image(), strength=0.8,
                           num_inference_steps=3)
    assert np.array_equal(load(tmp_path / "o.webp"), pixels(ref[0]))


def test_generate_config_file_flags_override_and_diffusers_kwargs(pipes, tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model_path: {pipes['sd']}\nprompt: from the config\nseed: 3\nnum_inference_steps: 2\n"
                   f"height: 32\nwidth: 32\noutput_path: {tmp_path}\noutput_file_name: c.png\n"
                   "diffusers_kwargs:\n  eta: 0.7\n")
    assert run_generate(["--config", str(cfg), "--seed", "4"]) == 0
    ref = reference_images(pipes["sd"], seed=4, prompt="from the config", num_inference_steps=2, height=32,
                           width=32, eta=0.7)
    assert np.array_equal(load(tmp_path / "c.png"), pixels(ref[0]))


@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "3"], "--max-new-tokens: applies to LLMs"),
    (["--num-frames", "4"], "num_frames: StableDiffusionPipeline makes images, not video"),
    (["--fps", "4"], "fps: the pipeline makes images, not video"),
    (["--image-path", "x.png"], "image_path: x.png does not exist"),
    (["--height", "33", "--width", "32"], "height: 33 is not a multiple of 2"),
    (["--output-file-name", "a.gif"], "output_file_name: unknown image format"),
    (["--text-encoder-cpu-offload"], "text_encoder_cpu_offload: the pipeline already runs on the CPU"),
])
def test_generate_refuses_with_reason(pipes, extra, message, capsys, tmp_path):
    argv = ["--model-path", pipes["sd"], "--prompt", "x", "--num-inference-steps", "1", "--output-path",
            str(tmp_path), *extra]
    assert run_generate(argv) == 1
    assert message in " ".join(capsys.readouterr().err.split())


def test_component_path_override(pipes, tmp_path):
    """--vae-path loads the VAE (class from model_index.json) from another folder."""
    import torch
    from diffusers import AutoencoderKL
    from tiny_diffusion import _vae
    torch.manual_seed(5)
    _vae().save_pretrained(tmp_path / "vae")
    argv = ["--model-path", pipes["sd"], "--prompt", "p", "--seed", "2", *COMMON, "--vae-path", str(tmp_path / "vae"),
            "--output-path", str(tmp_path), "--output-file-name", "v.png"]
    assert run_generate(argv) == 0
    from tiny_diffusion import reference_pipeline
    pipe = reference_pipeline(pipes["sd"])
    pipe.vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    ref = pipe(prompt="p", generator=torch.Generator().manual_seed(2), num_inference_steps=2, height=32,
               width=32).images[0]
    assert np.array_equal(load(tmp_path / "v.png"), pixels(ref))


def test_queue_waits_briefly_to_fill_a_batch():
    calls = []

    def run(jobs, on_step):
        calls.append(len(jobs))
        return [[j.seed] for j in jobs]
    q = ImageQueue(run, max_batch_size=2, batch_wait_s=5.0)
    assert q.submit(_job(32, seed=0)).result(4) == [0]   # one client at a time: no wait
    q._last_batch_jobs = 2                              # as after a batch of concurrent requests
    first = q.submit(_job(32, seed=1))
    second = q.submit(_job(32, seed=2))     # arrives within the wait: the batch is full, it runs at once
    assert (first.result(4), second.result(4)) == ([1], [2]) and calls == [1, 2]
    q.close()


def test_generate_video_frames_and_mp4(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio_ffmpeg
    from tiny_diffusion import build_video, reference_pipeline
    path = build_video(str(tmp_path / "video"))
    argv = ["--model-path", path, "--prompt", "a cat", "--num-frames", "3", *COMMON, "--seed", "4", "--fps", "3",
            "--return-frames", "--output-path", str(tmp_path / "out"), "--output-file-name", "cat.mp4"]
    assert run_generate(argv) == 0
    import torch
    ref = reference_pipeline(path)(prompt="a cat", num_frames=3, height=32, width=32, num_inference_steps=2,
                                   generator=torch.Generator().manual_seed(4), output_type="pil").frames[0]
    for i, frame in enumerate(ref):
        assert np.array_equal(load(tmp_path / "out" / f"cat_frame_{i:04d}.png"), pixels(frame))
    assert imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "out" / "cat.mp4")) == (3, 1.0)
    assert run_generate(argv[:-2] + ["--output-file-name", "cat.png"]) == 1


def test_mixed_precisions_and_vae_options_run(pipes):
    """bf16 denoiser and text encoder with an fp32 VAE (inputs cast at the boundaries), VAE tiling
    and slicing: the pipeline runs and makes images of the asked size, close to float32's."""
    from kvyard.diffusion import DiffusionEngine
    engine = DiffusionEngine(model_path=pipes["sd"], dit_precision="bf16", vae_precision="fp32",
                             vae_tiling=True, vae_slicing=True)
    assert engine.backend.pipe.unet.dtype.is_floating_point and str(engine.backend.pipe.vae.dtype) == "torch.float32"
    images = engine.generate(prompt="p", seed=1, n=2, num_inference_steps=2, height=32, width=32)
    ref = reference_images(pipes["sd"], seed=1, prompt="p", num_inference_steps=2, height=32, width=32)
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    assert np.abs(pixels(images[0]).astype(int) - pixels(ref[0])).mean() < 8


def test_missing_ffmpeg_names_the_extra(monkeypatch, tmp_path):
    import sys
    from kvyard.diffusion.outputs import save_mp4
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(ValueError, match=r'pip install "kvyard\[video\]"'):
        save_mp4([red_image()], str(tmp_path / "v.mp4"), fps=1)
