"""DiffusionPipelineBackend: the interface every diffusion-pipeline plugin implements.

Lifecycle:
  1. ``claims(pipeline_class)`` (a classmethod) says whether the plugin runs a pipeline class
     named by model_index.json's ``_class_name``; "auto" picks a native plugin that claims the
     class before the generic diffusers one (core/executor/backend_select.py logs the choice).
  2. ``__init__(config)`` loads every component onto ``config.device`` with the precisions,
     offloads, tiling and compile settings in ``config``; a setting the pipeline cannot honour is
     a ValueError naming the field.
  3. ``info`` (a PipelineInfo) says what the loaded pipeline accepts: the caller validates jobs
     against it before ``run`` (core/diffusion/jobs.py), so ``run`` sees only valid jobs.
  4. ``run(jobs, on_step)`` makes the images of several compatible jobs in one pipeline call.

Invariants of ``run``:
  - every job in one call has the same ``ImageJob.batch_key()`` (size, steps, guidance, frames...);
  - the result has one list per job, in order, of ``job.n`` outputs each: a PIL image, or a list
    of PIL frames for a video pipeline;
  - image ``i`` of a job is drawn from its own CPU ``torch.Generator`` seeded ``job.seed + i``, so
    an image does not depend on the batch it ran in (beyond float rounding of batched kernels)
    and image 0 equals diffusers called directly with ``generator=Generator().manual_seed(seed)``;
  - ``on_step(i, total)`` is called after each denoising step (i = 1..total) when given.
A backend is used from one thread at a time (the serving queue's worker, or `kvyard generate`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

StepCallback = Callable[[int, int], None]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class PipelineConfig:
    """What a pipeline plugin needs to load: never the whole argument object."""
    model_path: str
    pipeline_class: str                      # model_index.json's _class_name
    device: str = "cpu"
    dit_precision: str = "auto"              # the denoiser (UNet or DiT); auto: fp32 on the CPU, bf16 on CUDA
    vae_precision: str = "auto"              # auto: fp32 (VAE decoding is precision-sensitive)
    component_paths: tuple[tuple[str, str], ...] = ()   # (component name, folder) overrides
    vae_tiling: bool = False
    vae_slicing: bool = False
    text_encoder_cpu_offload: bool = False
    dit_cpu_offload: bool = False
    vae_cpu_offload: bool = False
    enable_torch_compile: bool = False


@dataclass(frozen=True)
class PipelineInfo:
    """What the loaded pipeline accepts; the job checks are built from it."""
    pipeline_class: str
    backend: str
    accepts: frozenset[str]                  # call arguments it takes: negative_prompt, image, num_frames, ...
    size_multiple: int                       # height and width must be multiples of this
    default_height: int
    default_width: int
    is_video: bool = False
    needs_image: bool = False                # image-to-image / image-to-video
    default_steps: int = 50
    default_strength: Optional[float] = None  # image-to-image: the call's default strength

    @property
    def task(self) -> str:
        source = "image" if self.needs_image else "text"
        return f"{source}-to-{'video' if self.is_video else 'image'}"


@dataclass
class ImageJob:
    """One request: ``n`` images (or videos) for one prompt, already validated."""
    prompt: str
    height: int
    width: int
    num_inference_steps: int
    seed: int
    n: int = 1
    negative_prompt: Optional[str] = None
    guidance_scale: Optional[float] = None
    num_frames: Optional[int] = None
    strength: Optional[float] = None
    image: Any = None                        # PIL.Image for image-to-image pipelines
    extra: dict = field(default_factory=dict)    # diffusers_kwargs passed through to the call

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call (the call's scalar arguments)."""
        image_size = self.image.size if self.image is not None else None
        return (self.height, self.width, self.num_inference_steps, self.guidance_scale, self.num_frames,
                self.strength, self.negative_prompt is not None, image_size,
                tuple(sorted((k, repr(v)) for k, v in self.extra.items())))


class DiffusionPipelineBackend(ABC):
    name: str = ""

    @classmethod
    @abstractmethod
    def claims(cls, pipeline_class: str) -> bool:
        """Whether this plugin runs pipelines of this class (model_index.json's _class_name)."""

    @abstractmethod
    def __init__(self, config: PipelineConfig):
        """Loads the pipeline; ValueError naming the field for a setting it cannot honour."""

    @property
    @abstractmethod
    def info(self) -> PipelineInfo:
        ...

    @abstractmethod
    def run(self, jobs: list[ImageJob], on_step: Optional[StepCallback] = None) -> list[list[Any]]:
        """One pipeline call for compatible jobs -> per job, ``job.n`` images (or frame lists)."""
