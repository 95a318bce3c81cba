"""DiffusionArgs: the flags of `kvyard generate` / `kvyard serve` on a diffusers pipeline folder.

SGLang's names. Groups: "model" and "pipeline" (both commands), "job" (generate: what to make and
where to write it), "http" (serve; `generate` ignores them, as SGLang documents). A --config YAML
file holds the same arguments as keys (plus ``diffusers_kwargs``, a mapping passed to the pipeline
call); flags override it. ``--<component>-path`` flags are generated from model_index.json.
An LLM-only flag is refused with the reason; so is a job flag given to `serve`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from kvyard.diffusion.detect import pipeline_components, read_model_index
from kvyard.diffusion.pipeline import PRECISIONS, PipelineConfig
from kvyard.server_args import _f

logger = logging.getLogger(__name__)


@dataclass
class DiffusionArgs:
    # -- model and pipeline -----------------------------------------------------------------
    model_path: Optional[str] = _f(None, "diffusers pipeline folder (model_index.json)", "model")
    model_type: str = _f("auto", "auto: detected from the folder", "model", choices=("auto", "llm", "diffusion"))
    backend: str = _f("auto", "pipeline plugin (auto: a native plugin that claims the pipeline class, else diffusers)", "model", registry="diffusion_pipelines", allow=("auto",))
    device: str = _f("auto", "auto: cuda if available, else cpu", "model", choices=("auto", "cuda", "cpu"))
    served_model_name: Optional[str] = _f(None, "model name reported by the API", "model")
    dit_precision: str = _f("auto", "denoiser and text encoders (auto: fp32 on the CPU, bf16 on CUDA)", "pipeline", choices=PRECISIONS)
    vae_precision: str = _f("auto", "VAE (auto: fp32 on the CPU, bf16 on CUDA)", "pipeline", choices=PRECISIONS)
    vae_tiling: bool = _f(False, "decode the VAE in tiles (large images, less memory)", "pipeline")
    vae_slicing: bool = _f(False, "decode the VAE one image at a time", "pipeline")
    text_encoder_cpu_offload: bool = _f(False, "keep the text encoders on the CPU between uses (CUDA)", "pipeline")
    dit_cpu_offload: bool = _f(False, "keep the denoiser on the CPU between uses (CUDA)", "pipeline")
    vae_cpu_offload: bool = _f(False, "keep the VAE on the CPU between uses (CUDA)", "pipeline")
    enable_torch_compile: bool = _f(False, "torch.compile the denoiser", "pipeline")
    num_threads: Optional[int] = _f(None, "CPU compute threads", "pipeline")
    config: Optional[str] = _f(None, "YAML file whose keys are these arguments (and diffusers_kwargs); flags override it", "model")
    log_level: str = _f("info", "log level", "model", choices=("debug", "info", "warning", "error"))

    # -- the job (generate) -------------------------------------------------------------------
    prompt: Optional[str] = _f(None, "what to draw", "job")
    negative_prompt: Optional[str] = _f(None, "what to avoid (pipelines with classifier-free guidance)", "job")
    image_path: Optional[str] = _f(None, "input image (image-to-image / image-to-video pipelines)", "job")
    num_inference_steps: Optional[int] = _f(None, "denoising steps (default: the pipeline's)", "job")
    guidance_scale: Optional[float] = _f(None, "classifier-free guidance scale (default: the pipeline's)", "job")
    strength: Optional[float] = _f(None, "how far to move from the input image, (0, 1] (image-to-image)", "job")
    seed: Optional[int] = _f(None, "random seed (default: random); image i of a job uses seed + i", "job")
    height: Optional[int] = _f(None, "image height (default: the pipeline's)", "job")
    width: Optional[int] = _f(None, "image width (default: the pipeline's)", "job")
    num_outputs_per_prompt: int = _f(1, "images (or videos) to make", "job")
    num_frames: Optional[int] = _f(None, "frames (video pipelines)", "job")
    fps: Optional[int] = _f(None, "frames per second of the MP4 (video pipelines; default 8)", "job")
    output_file_name: Optional[str] = _f(None, "file name; its extension picks the format: .png .jpg .jpeg .webp, .mp4 for video", "job")
    save_output: bool = _f(True, "write the output files (--no-save-output: only report them)", "job", negatable=True)
    return_frames: bool = _f(False, "write a video's frames as PNG files (besides or instead of the MP4)", "job")
    output_path: str = _f("outputs", "folder of the output files (serve: of the files behind response_format=url)", "both")

    # -- HTTP (serve) -------------------------------------------------------------------------
    host: str = _f("127.0.0.1", "HTTP host", "http")
    port: int = _f(30000, "HTTP port", "http")
    api_key: Optional[str] = _f(None, "require 'Authorization: Bearer KEY' on every endpoint but /health", "http")
    enable_metrics: bool = _f(False, "serve Prometheus metrics at /metrics", "http")
    max_batch_size: int = _f(8, "most images in one pipeline call (and per request: n)", "http")
    batch_wait_ms: float = _f(20.0, "how long a not-full batch waits for more compatible requests", "http")
    max_queued_requests: Optional[int] = _f(None, "reject new requests beyond this queue length (429)", "http")
    skip_server_warmup: bool = _f(False, "do not run a warmup image before reporting ready", "http")
    max_request_body_mb: float = _f(32.0, "largest HTTP request body in MiB (413 above it)", "http")

    # -- config-file only ---------------------------------------------------------------------
    component_paths: dict = field(default_factory=dict, metadata={"group": "hidden"})
    diffusers_kwargs: dict = field(default_factory=dict, metadata={"group": "hidden"})

    def __post_init__(self) -> None:
        for name in ("num_outputs_per_prompt", "port", "max_batch_size", "max_queued_requests", "num_threads", "fps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.max_request_body_mb > 0:
            raise ValueError(f"max_request_body_mb must be > 0, got {self.max_request_body_mb}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.backend != "auto":
            from kvyard.plugins import registry
            if self.backend not in registry("diffusion_pipelines"):
                raise ValueError(f"backend: {registry('diffusion_pipelines').unknown_message(self.backend)}")
        if not isinstance(self.diffusers_kwargs, dict):
            raise ValueError("diffusers_kwargs: must be a mapping of pipeline call arguments")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def pipeline_config(self, pipeline_class: str) -> PipelineConfig:
        return PipelineConfig(
            model_path=self.model_path, pipeline_class=pipeline_class, device=self.resolved_device(),
            dit_precision=self.dit_precision, vae_precision=self.vae_precision,
            component_paths=tuple(sorted(self.component_paths.items())), vae_tiling=self.vae_tiling,
            vae_slicing=self.vae_slicing, text_encoder_cpu_offload=self.text_encoder_cpu_offload,
            dit_cpu_offload=self.dit_cpu_offload, vae_cpu_offload=self.vae_cpu_offload,
            enable_torch_compile=self.enable_torch_compile)


FIELDS = {f.name: f for f in dataclasses.fields(DiffusionArgs)}


def build_parser(prog: str, command: str, model_path: Optional[str]) -> argparse.ArgumentParser:
    """command: "generate" or "serve"; model_path adds the --<component>-path flags."""
    from kvyard.cli.common import OneLineParser
    from kvyard.server_args import add_field_argument

    parser = OneLineParser(prog=prog, description=f"{command} with a diffusion pipeline",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # every group on both commands: a job flag given to serve is refused with the reason
    # (args_from), an HTTP flag given to generate is ignored
    groups = {g: parser.add_argument_group(g) for g in ("model", "pipeline", "both", "job", "http")}
    for f in dataclasses.fields(DiffusionArgs):
        group = groups.get(f.metadata.get("group"))
        if group is not None:
            add_field_argument(group, f)
    comps = parser.add_argument_group("component overrides (from model_index.json)")
    for name in component_names(model_path):
        comps.add_argument(f"--{name.replace('_', '-')}-path", dest=f"{name}_path", default=argparse.SUPPRESS,
                           help=f"load the {name} from this folder instead")
    return parser


def component_names(model_path: Optional[str]) -> list[str]:
    index = read_model_index(model_path) or {}
    return sorted(n for n, (lib, _) in pipeline_components(index).items() if lib is not None)


def args_from(ns: argparse.Namespace, command: str, config_values: dict) -> DiffusionArgs:
    """Config values first, flags over them; --<component>-path keys gathered into component_paths."""
    values = {**config_values, **vars(ns)}
    comps = set(component_names(values.get("model_path")))
    out: dict[str, Any] = {"component_paths": dict(values.pop("component_paths", {}) or {})}
    for key, value in values.items():
        if key.endswith("_path") and key[:-5] in comps:
            out["component_paths"][key[:-5]] = value
        elif key in FIELDS:
            _check_applies(key, command)
            out[key] = value
        else:
            raise ValueError(f"config: unknown argument {key!r}")
    return DiffusionArgs(**out)


def _check_applies(name: str, command: str) -> None:
    group = FIELDS[name].metadata.get("group")
    if command == "serve" and group == "job":
        raise ValueError(f"{name}: applies to `kvyard generate`; a server takes it per request")
    if command == "generate" and group == "http":
        logger.info("%s: an HTTP server argument; `kvyard generate` ignores it", name)


def load_config(path: Optional[str]) -> dict:
    """The --config YAML file as argument names -> values (dashes become underscores)."""
    if not path:
        return {}
    from kvyard.server_args import read_yaml_mapping
    data = read_yaml_mapping(path)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def refuse_unknown(unknown: list[str]) -> None:
    """Flags the diffusion parser does not know: an LLM flag gets the reason, others argparse's word."""
    from kvyard.server_args import ServerArgs
    llm_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(ServerArgs)}
    llm_flags |= {"--max-new-tokens", "--temperature", "--top-p", "--top-k", "--min-p", "--chat", "--no-chat",
                  "--prompt-file", "--stream", "--sampling-params", "--stop", "--system", "--json"}
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if flag in llm_flags:
            raise ValueError(f"{flag}: applies to LLMs, not to diffusion pipelines")
        if flag.startswith("-"):
            raise ValueError(f"unrecognized argument {flag}")
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
