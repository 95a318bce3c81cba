"""The one place where "auto" choices are resolved (plugins and automatic defaults), each logged
with its reason."""
from __future__ import annotations

import logging

from kvyard.plugins import PluginError, registry

logger = logging.getLogger(__name__)

# Preference order per device; the first installed plugin wins.
_ATTENTION_PREFERENCE = {"cuda": ("flashinfer", "triton", "torch_native"),
                         "cpu": ("torch_native", "flex_attention")}


def resolve_attention_backend(requested: str, device: str) -> str:
    reg = registry("attention_backends")
    if requested != "auto":
        reg.entry(requested)  # unknown name -> PluginError listing the valid ones
        return requested
    for name in _ATTENTION_PREFERENCE.get(device, ("torch_native",)):
        if name in reg and _can_run(reg, name, device):
            logger.info("attention backend: %s (auto: first installed of %s on %s)",
                        name, ", ".join(_ATTENTION_PREFERENCE[device]), device)
            return name
    raise ValueError(f"attention_backend: no attention plugin installed for {device}; "
                     f"installed: {', '.join(reg.names()) or '(none)'}")


def _can_run(reg, name: str, device: str) -> bool:
    """An installed backend "auto" may pick: it loads, and its is_available(device) agrees."""
    try:
        factory = reg.get(name)
    except PluginError as exc:
        logger.warning("attention backend %s skipped by auto: %s", name, exc)
        return False
    check = getattr(factory, "is_available", None)
    if check is not None and not check(device):
        logger.info("attention backend %s skipped by auto: not available on %s here", name, device)
        return False
    return True


def resolve_attention_backends(requested: str, prefill: str | None, decode: str | None,
                               device: str) -> tuple[str, str]:
    """(extend backend, decode backend). --prefill-attention-backend / --decode-attention-backend
    override --attention-backend for their mode; two different names make a hybrid."""
    base = None if prefill and decode else resolve_attention_backend(requested, device)
    prefill_name = resolve_attention_backend(prefill, device) if prefill else base
    decode_name = resolve_attention_backend(decode, device) if decode else base
    if prefill_name != decode_name:
        logger.info("attention backend: hybrid, extend steps on %s, decode steps on %s",
                    prefill_name, decode_name)
    return prefill_name, decode_name


def resolve_quantization(requested: str | None, load_format: str) -> str | None:
    """GGUF files keep their weights quantized unless --quantization none or --dtype float32 asks
    for the exact dequantized path (the caller passes requested='none' then)."""
    if requested == "none":
        return None
    if requested:
        registry("quantization_methods").entry(requested)
        return requested
    if load_format == "gguf" and "gguf" in registry("quantization_methods"):
        logger.info("quantization: gguf (auto: the model is a GGUF file; weights stay quantized)")
        return "gguf"
    return None


# Overlap scheduling by device when --disable-overlap-schedule is not given: on CUDA the host
# work of a step hides behind the GPU's; on the CPU the worker thread and the scheduler share
# the same cores.
_OVERLAP_DEFAULT = {"cuda": (True, "the host prepares the next batch while the GPU computes"),
                    "cpu": (False, "the scheduler and the compute share the CPU's cores")}


def resolve_overlap_schedule(disable: bool | None, device: str, is_generation: bool = True) -> bool:
    """Whether the scheduler overlaps scheduling with compute. disable: --disable-overlap-schedule
    (None when not given: the device's default)."""
    if not is_generation:
        logger.info("overlap schedule: off (embedding model: no sampled token to overlap on)")
        return False
    if disable is not None:
        logger.info("overlap schedule: %s (--disable-overlap-schedule=%s)", "off" if disable else "on", disable)
        return not disable
    on, why = _OVERLAP_DEFAULT.get(device, (False, f"no measured default for {device}"))
    logger.info("overlap schedule: %s (auto on %s: %s)", "on" if on else "off", device, why)
    return on
