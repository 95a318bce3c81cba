"""DiffusersPipeline: runs any diffusers pipeline folder through ``DiffusionPipeline.from_pretrained``.

Loading: absent optional components (model_index.json entries [null, null]) are passed as None;
``--<component>-path`` folders are loaded with the class model_index.json names and passed in.
Precisions: the denoiser and text encoders take dit_precision, the VAE vae_precision; when they
differ, the VAE's and the denoiser's inputs are cast to their own dtype on the way in.
A batch is one pipeline call with one prompt and one CPU generator per image (see the contract
in kvyard.diffusion.pipeline), so a request's images do not depend on its batch-mates.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Optional

import torch

from kvyard.diffusion.detect import pipeline_components, read_model_index
from kvyard.diffusion.pipeline import (DiffusionPipelineBackend, ImageJob, PipelineConfig, PipelineInfo,
                                       StepCallback)

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DENOISERS = ("transformer", "unet", "prior")
OFFLOAD_GROUPS = {"text_encoder_cpu_offload": ("text_encoder",), "dit_cpu_offload": DENOISERS,
                  "vae_cpu_offload": ("vae",)}


def import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ValueError('backend: diffusers is not installed; pip install "kvyard[diffusion]"') from None
    diffusers.utils.logging.disable_progress_bar()
    return diffusers


def resolve_precision(value: str, device: str) -> torch.dtype:
    """auto: float32 on the CPU (the exact reference), bfloat16 on CUDA."""
    if value == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return DTYPES[value]


class DiffusersPipeline(DiffusionPipelineBackend):
    name = "diffusers"

    @classmethod
    def claims(cls, pipeline_class: str) -> bool:
        return True  # the generic fallback: any diffusers pipeline class

    def __init__(self, config: PipelineConfig):
        diffusers = import_diffusers()
        self.config = config
        index = read_model_index(config.model_path) or {}
        components = pipeline_components(index)
        dit_dtype = resolve_precision(config.dit_precision, config.device)
        vae_dtype = resolve_precision(config.vae_precision, config.device)
        kwargs: dict[str, Any] = {name: None for name, (lib, _) in components.items() if lib is None}
        for name, folder in config.component_paths:
            kwargs[name] = _load_component(name, components, folder)
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(config.model_path, **kwargs)
        except Exception as exc:  # diffusers raises many kinds for a broken folder; one line names it
            raise ValueError(f"model_path: cannot load the diffusers pipeline in {config.model_path}: "
                             f"{type(exc).__name__}: {exc}") from None
        pipe.set_progress_bar_config(disable=True)
        _set_precisions(pipe, dit_dtype, vae_dtype)
        _place(pipe, config)
        _vae_options(pipe, config)
        if config.enable_torch_compile:
            denoiser_module(pipe).compile()
            logger.info("torch.compile: the %s is compiled (first calls per shape are slow)", denoiser_name(pipe))
        self.pipe = pipe
        self._info = _describe(pipe, self.name)

    @property
    def info(self) -> PipelineInfo:
        return self._info

    def run(self, jobs: list[ImageJob], on_step: Optional[StepCallback] = None) -> list[list[Any]]:
        first = jobs[0]
        assert all(j.batch_key() == first.batch_key() for j in jobs), "run: jobs of one call must share batch_key()"
        kwargs = self._call_kwargs(jobs)
        if on_step is not None and "callback_on_step_end" in self._info.accepts:
            pipe, steps = self.pipe, first.num_inference_steps

            def callback(_pipe, i, _t, _tensors):
                on_step(i + 1, getattr(pipe, "_num_timesteps", None) or steps)
                return {}
            kwargs["callback_on_step_end"] = callback
        with torch.inference_mode():
            out = self.pipe(**kwargs)
        flat = list(out.frames if self._info.is_video else out.images)
        result, start = [], 0
        for job in jobs:
            result.append(flat[start:start + job.n])
            start += job.n
        return result

    def _call_kwargs(self, jobs: list[ImageJob]) -> dict:
        first, info = jobs[0], self._info
        kw: dict[str, Any] = dict(first.extra)
        kw["prompt"] = [j.prompt for j in jobs for _ in range(j.n)]
        kw["generator"] = [torch.Generator("cpu").manual_seed(j.seed + i) for j in jobs for i in range(j.n)]
        kw["num_inference_steps"] = first.num_inference_steps
        kw["output_type"] = "pil"
        if first.image is not None:
            kw["image"] = [j.image for j in jobs for _ in range(j.n)]
        if "height" in info.accepts:
            kw["height"], kw["width"] = first.height, first.width
        if first.negative_prompt is not None:
            kw["negative_prompt"] = [j.negative_prompt for j in jobs for _ in range(j.n)]
        for name in ("guidance_scale", "num_frames", "strength"):
            if getattr(first, name) is not None:
                kw[name] = getattr(first, name)
        return kw


def _load_component(name: str, components: dict, folder: str):
    if name not in components or components[name][0] is None:
        raise ValueError(f"{name}_path: the pipeline has no {name} component "
                         f"(model_index.json lists {', '.join(sorted(components))})")
    library, class_name = components[name]
    klass = getattr(importlib.import_module(library), class_name)
    try:
        return klass.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}_path: cannot load {class_name} from {folder}: {exc}") from None


def denoiser_name(pipe) -> str:
    for name in DENOISERS:
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"model_path: {type(pipe).__name__} has no denoiser (unet or transformer)")


def denoiser_module(pipe) -> torch.nn.Module:
    return getattr(pipe, denoiser_name(pipe))


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def _set_precisions(pipe, dit_dtype: torch.dtype, vae_dtype: torch.dtype) -> None:
    for name, module in _modules(pipe).items():
        dtype = vae_dtype if name == "vae" else dit_dtype
        if module.dtype != dtype:
            module.to(dtype)
    if dit_dtype != vae_dtype and getattr(pipe, "vae", None) is not None:
        _cast_inputs(pipe.vae, ("encode", "decode"))
        _cast_inputs(denoiser_module(pipe), ("forward",))


def _cast_inputs(module: torch.nn.Module, methods: tuple[str, ...]) -> None:
    """Wraps module.<method> so floating tensor arguments arrive in the module's dtype."""
    def cast(x):
        return x.to(module.dtype) if torch.is_tensor(x) and x.is_floating_point() else x

    for method in methods:
        original = getattr(module, method)

        def wrapped(*args, _original=original, **kwargs):
            return _original(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})
        setattr(module, method, wrapped)


def _place(pipe, config: PipelineConfig) -> None:
    offloaded = [flag for flag in OFFLOAD_GROUPS if getattr(config, flag)]
    if offloaded and config.device == "cpu":
        raise ValueError(f"{offloaded[0]}: the pipeline already runs on the CPU; offloading needs --device cuda")
    if not offloaded:
        pipe.to(config.device)
        return
    _offload(pipe, tuple(p for flag in offloaded for p in OFFLOAD_GROUPS[flag]), config.device)


def _offload(pipe, prefixes: tuple[str, ...], device: str) -> None:
    """diffusers' model offload restricted to the components named by ``prefixes``: the offload
    chain keeps only them (each moves to the device for its forward and back after the call);
    every other module is excluded and moved to the device for good."""
    modules = _modules(pipe)
    chosen = [n for n in modules if n.startswith(prefixes)]
    seq = [n for n in pipe.model_cpu_offload_seq.split("->") if n in chosen]
    pipe.model_cpu_offload_seq = "->".join(seq + [n for n in chosen if n not in seq])
    pipe._exclude_from_cpu_offload = [n for n in modules if n not in chosen]
    pipe.enable_model_cpu_offload(device=device)
    logger.info("cpu offload: %s kept on the CPU between uses; %s stay on %s", ", ".join(chosen),
                ", ".join(pipe._exclude_from_cpu_offload) or "nothing", device)


def _vae_options(pipe, config: PipelineConfig) -> None:
    for flag, method in (("vae_tiling", "enable_tiling"), ("vae_slicing", "enable_slicing")):
        if not getattr(config, flag):
            continue
        vae = getattr(pipe, "vae", None)
        if vae is None or not hasattr(vae, method):
            raise ValueError(f"{flag}: the VAE of {type(pipe).__name__} does not support it")
        getattr(vae, method)()


def _describe(pipe, backend: str) -> PipelineInfo:
    params = {n: p for n, p in inspect.signature(type(pipe).__call__).parameters.items()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    vae_factor = int(getattr(pipe, "vae_scale_factor", 8))
    denoiser = denoiser_module(pipe)
    patch = int(getattr(denoiser.config, "patch_size", 1) or 1)
    if hasattr(pipe, "_pack_latents"):
        patch = max(patch, 2)  # Flux-style pipelines pack 2x2 latent patches
    sample = getattr(pipe, "default_sample_size", None) or getattr(denoiser.config, "sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    steps, strength = params.get("num_inference_steps"), params.get("strength")
    return PipelineInfo(
        pipeline_class=type(pipe).__name__, backend=backend, accepts=frozenset(params) - {"self"},
        size_multiple=vae_factor * patch, default_height=int(sample) * vae_factor,
        default_width=int(sample) * vae_factor, is_video="num_frames" in params,
        needs_image="image" in params,
        default_steps=int(steps.default) if steps is not None and isinstance(steps.default, int) else 50,
        default_strength=float(strength.default) if strength is not None and isinstance(strength.default, float)
        else None)
