"""Diffusion pipelines (images and video) beside the LLM path: no KV cache, the same CLI,
server conventions, auth, metrics and error bodies. The plugin contract is
kvyard.diffusion.pipeline; diffusers itself is imported only by the pipeline plugin."""
from kvyard.diffusion.pipeline import DiffusionPipelineBackend, ImageJob, PipelineConfig, PipelineInfo


def __getattr__(name: str):
    if name == "DiffusionEngine":
        from kvyard.diffusion.engine import DiffusionEngine
        return DiffusionEngine
    if name == "DiffusionArgs":
        from kvyard.diffusion.args import DiffusionArgs
        return DiffusionArgs
    raise AttributeError(name)


__all__ = ["DiffusionArgs", "DiffusionEngine", "DiffusionPipelineBackend", "ImageJob", "PipelineConfig",
           "PipelineInfo"]
