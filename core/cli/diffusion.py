"""`kvyard generate` and `kvyard serve` on a diffusers pipeline folder.

``model_type_of(argv)`` decides the path before the real parser runs: it reads --model-path,
--model-type and --config (whose model_path counts too) and asks kvyard.diffusion.detect.
"""
from __future__ import annotations

import argparse
import logging
import os

from kvyard.cli.common import err, run_reporting_errors


def model_type_of(argv: list[str]) -> str:
    """"llm" or "diffusion"; ValueError (one line) when --model-type contradicts the folder."""
    from kvyard.diffusion.args import load_config
    from kvyard.diffusion.detect import resolve_model_type

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model-path", dest="model_path")
    pre.add_argument("--model-type", dest="model_type")
    pre.add_argument("--config")
    ns, _ = pre.parse_known_args(argv)
    config = load_config(ns.config) if ns.config else {}
    path = ns.model_path or config.get("model_path")
    requested = ns.model_type or config.get("model_type") or "auto"
    if path is None and requested != "diffusion":
        return "llm"   # the default model
    return resolve_model_type(path, requested)


def parse(argv: list[str], command: str):
    from kvyard.diffusion.args import args_from, build_parser, load_config, refuse_unknown

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model-path", dest="model_path")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    config = load_config(known.config)
    parser = build_parser(f"kvyard {command}", command, known.model_path or config.get("model_path"))
    ns, unknown = parser.parse_known_args(argv)
    refuse_unknown(unknown)
    args = args_from(ns, command, {k: v for k, v in config.items() if k != "config"})
    if args.model_path is None:
        raise ValueError("model_path: give --model-path DIR (a diffusers pipeline folder)")
    return args


def run_diffusion_generate(argv: list[str]) -> int:
    return run_reporting_errors(lambda: _generate(parse(argv, "generate")))


def run_diffusion_serve(argv: list[str]) -> int:
    def serve():
        from kvyard.server.images_app import serve_diffusion
        return serve_diffusion(parse(argv, "serve"))
    return run_reporting_errors(serve)


def _generate(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvyard.diffusion.engine import DiffusionEngine

    logging.basicConfig(level=args.log_level.upper(), format="[kvyard] %(levelname)s %(message)s")
    if not args.prompt:
        raise ValueError("prompt: give --prompt TEXT")
    with err.status("loading the pipeline…"):
        engine = DiffusionEngine(args)
    fields = job_fields(args)
    job = engine.make_job(fields, names={"image": "image_path", "n": "num_outputs_per_prompt",
                                         "extra": "diffusers_kwargs"}, max_n=args.num_outputs_per_prompt)
    check_output_args(args, engine.info.is_video)
    parts = engine.split(job)
    outputs: list = []
    with Progress(TextColumn("[bold]denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        task = progress.add_task("denoising", total=job.num_inference_steps * len(parts))
        for k, part in enumerate(parts):
            def on_step(i: int, total: int, _k=k) -> None:
                progress.update(task, completed=_k * total + i, total=total * len(parts))
            outputs += engine.run([part], on_step)[0]
    for path in write_outputs(args, job, outputs, engine.info.is_video):
        print(path)
    return 0


def job_fields(args) -> dict:
    image = None
    if args.image_path:
        image = load_image(args.image_path)
    return dict(prompt=args.prompt, negative_prompt=args.negative_prompt, image=image,
                height=args.height, width=args.width, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, seed=args.seed, n=args.num_outputs_per_prompt,
                num_frames=args.num_frames, strength=args.strength, extra=args.diffusers_kwargs)


def load_image(path: str):
    from PIL import Image, UnidentifiedImageError
    if not os.path.exists(path):
        raise ValueError(f"image_path: {path} does not exist")
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image_path: {path} is not an image ({exc})") from None


def check_output_args(args, is_video: bool) -> None:
    from kvyard.diffusion.outputs import image_format
    if not is_video:
        for name in ("fps", "return_frames"):
            if getattr(args, name):
                raise ValueError(f"{name}: the pipeline makes images, not video")
        if args.output_file_name:
            image_format(args.output_file_name)
    elif args.output_file_name and not args.output_file_name.lower().endswith(".mp4"):
        raise ValueError("output_file_name: a video is written as .mp4 (or as frames with --return-frames)")


def write_outputs(args, job, outputs: list, is_video: bool) -> list[str]:
    """Writes the job's outputs under --output-path; returns the paths written (or that would be)."""
    from kvyard.diffusion.outputs import default_file_name, numbered, save_frames, save_image, save_mp4

    name = args.output_file_name or default_file_name(job.prompt, job.seed, is_video)
    written: list[str] = []
    for i, out in enumerate(outputs):
        path = os.path.join(args.output_path, numbered(name, i, len(outputs)))
        if not args.save_output:
            written.append(f"(not saved) {path}")
            continue
        if not is_video:
            written.append(save_image(out, path))
            continue
        if args.return_frames:
            written += save_frames(out, args.output_path, os.path.splitext(os.path.basename(path))[0])
        written.append(save_mp4(out, path, args.fps or 8))
    return written
