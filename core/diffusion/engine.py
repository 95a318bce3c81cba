"""DiffusionEngine: a loaded pipeline plugin plus the job checks, for `kvyard generate`, the
server's queue and Python callers.

    engine = DiffusionEngine(DiffusionArgs(model_path="./pipe"))
    images = engine.generate(prompt="a red bicycle", num_inference_steps=20, seed=7)   # list of PIL

Loading: the pipeline class comes from model_index.json, the plugin from --backend (auto resolved
in kvyard.executor.backend_select), the plugin gets a PipelineConfig only.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Optional

from kvyard.diffusion.args import DiffusionArgs
from kvyard.diffusion.detect import read_model_index, resolve_model_type
from kvyard.diffusion.jobs import make_job
from kvyard.diffusion.pipeline import DiffusionPipelineBackend, ImageJob, PipelineInfo, StepCallback

logger = logging.getLogger(__name__)


def load_backend(args: DiffusionArgs) -> DiffusionPipelineBackend:
    from kvyard.executor.backend_select import resolve_diffusion_backend
    from kvyard.plugins import registry

    resolve_model_type(args.model_path, "diffusion" if args.model_type == "auto" else args.model_type)
    pipeline_class = read_model_index(args.model_path).get("_class_name")
    if not isinstance(pipeline_class, str):
        raise ValueError(f"model_path: {args.model_path}/model_index.json names no pipeline class (_class_name)")
    if args.num_threads:
        import torch
        torch.set_num_threads(args.num_threads)
    name = resolve_diffusion_backend(args.backend, pipeline_class)
    cls = registry("diffusion_pipelines").get(name)
    backend = cls(args.pipeline_config(pipeline_class))
    info = backend.info
    logger.info("diffusion pipeline %s (%s) on %s through %s", info.pipeline_class, info.task,
                args.resolved_device(), name)
    return backend


class DiffusionEngine:
    def __init__(self, args: Optional[DiffusionArgs] = None, **kwargs: Any):
        self.args = args or DiffusionArgs(**kwargs)
        self.backend = load_backend(self.args)

    @property
    def info(self) -> PipelineInfo:
        return self.backend.info

    def make_job(self, fields: dict, names: Optional[dict] = None, max_n: Optional[int] = None) -> ImageJob:
        """fields without "extra" get the configured diffusers_kwargs; max_n: the most images
        (default --max-batch-size)."""
        if fields.get("extra") is None and self.args.diffusers_kwargs:
            fields = {**fields, "extra": self.args.diffusers_kwargs}
        return make_job(fields, self.info, max_n or self.args.max_batch_size, names)

    def run(self, jobs: list[ImageJob], on_step: Optional[StepCallback] = None) -> list[list[Any]]:
        return self.backend.run(jobs, on_step)

    def split(self, job: ImageJob) -> list[ImageJob]:
        """A job of more images than --max-batch-size as several calls' jobs; image i keeps
        seed + i, so the images are the same as in one call."""
        size = self.args.max_batch_size
        return [replace(job, n=min(size, job.n - start), seed=job.seed + start) for start in range(0, job.n, size)]

    def generate(self, on_step: Optional[StepCallback] = None, **fields: Any) -> list[Any]:
        """One job's outputs (PIL images, or frame lists for video pipelines)."""
        job = self.make_job(fields, max_n=max(1, fields.get("n") or 1))
        return [out for part in self.split(job) for out in self.run([part], on_step)[0]]
