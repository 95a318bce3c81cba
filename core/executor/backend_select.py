"""The one place where "auto" choices are resolved (plugins and automatic defaults), each logged
with its reason."""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Mapping, Sequence

from kvyard.attention import AttentionConfig
from kvyard.attention.timing import AttentionTiming
from kvyard.plugins import PluginError, registry

logger = logging.getLogger(__name__)

# Preference order per device; the first installed plugin wins.
_ATTENTION_PREFERENCE = {"cuda": ("flashinfer", "triton", "torch_native"),
                         "cpu": ("torch_native", "flex_attention")}


# On the CPU "auto" times the installed candidates on the model's head shapes; a later one in
# the preference order wins only when it is this much faster than the earlier one (noise).
MEASURED_MARGIN = 0.9


def resolve_attention_backend(requested: str, device: str, attention: AttentionConfig | None = None) -> str:
    """A backend name. "auto": on CUDA the first installed of the preference order; on the CPU,
    given ``attention`` (the model's head shapes), torch_native or flex_attention by a quick
    timing (attention_timing.py, cached per shape), else the first installed."""
    reg = registry("attention_backends")
    if requested != "auto":
        reg.entry(requested)  # unknown name -> PluginError listing the valid ones
        return requested
    preference = _ATTENTION_PREFERENCE.get(device, ("torch_native",))
    if attention is not None and attention.kv_layout_kind != "mha":
        kind = attention.kv_layout_kind
        preference = tuple(n for n in preference if n in reg and _serves(reg, n, kind))
        logger.info("attention backend candidates for the %s KV layout: %s", kind, ", ".join(preference) or "none")
    if device == "cpu" and attention is not None:
        candidates = tuple(n for n in preference if n in reg and _can_run(reg, n, device, attention))
        if len(candidates) > 1:
            key = _timing_key(candidates, attention)
            cached = _cached_choice(key)
            if cached is not None:
                logger.info("attention backend: %s (auto on cpu, timed earlier on this machine on the "
                            "model's head shapes: %s)", *cached)
                return cached[0]
            name, why = pick_by_timing(candidates, _timings(candidates, attention))
            logger.info("attention backend: %s (auto on cpu, timed on the model's head shapes: %s)", name, why)
            _store_choice(key, name, why)
            return name
    for name in preference:
        if name in reg and _can_run(reg, name, device, attention):
            logger.info("attention backend: %s (auto: first installed of %s on %s)",
                        name, ", ".join(preference), device)
            return name
    raise ValueError(f"attention_backend: no attention plugin installed for {device}; "
                     f"installed: {', '.join(reg.names()) or '(none)'}")


def pick_by_timing(candidates: Sequence[str], timings: Mapping[str, AttentionTiming | BaseException]
                   ) -> tuple[str, str]:
    """(backend, why) from each candidate's timing or the exception its timing raised.
    candidates: in preference order. A failed candidate is never picked; when all failed, the
    first is (its own error then shows where it is used)."""
    ran = {n: timings[n] for n in candidates if isinstance(timings[n], AttentionTiming)}
    why = "; ".join(f"{n} {t.describe()}" if n in ran else f"{n} failed ({type(t).__name__}: {t})"
                    for n, t in ((n, timings[n]) for n in candidates))
    if not ran:
        return candidates[0], why + f"; none ran, {candidates[0]} as the first installed"
    chosen = next(iter(ran))                      # the most preferred that ran
    fastest = min(ran, key=lambda n: ran[n].total_s)
    if ran[fastest].total_s < MEASURED_MARGIN * ran[chosen].total_s:
        chosen = fastest
    return chosen, why


def _timings(candidates: tuple[str, ...], attention: AttentionConfig) -> dict:
    """Per candidate its AttentionTiming or the exception its timing raised."""
    return _timings_per_shape(candidates, attention.num_heads, attention.num_kv_heads, attention.head_dim,
                              attention.dtype, attention.page_size)


@lru_cache(maxsize=16)
def _timings_per_shape(candidates: tuple[str, ...], heads: int, kv_heads: int, head_dim: int,
                       dtype, page_size: int) -> dict:
    from kvyard.attention.timing import time_backend

    config = AttentionConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                             device="cpu", page_size=page_size, max_context_len=1, max_batch_size=1)
    reg = registry("attention_backends")
    out: dict = {}
    give_up_s = float("inf")          # once one ran: what a later candidate must beat
    for name in candidates:
        try:
            out[name] = time_backend(reg.get(name), config, give_up_s=give_up_s)
        except Exception as exc:      # a candidate that cannot run these shapes is not chosen
            out[name] = exc
            continue
        give_up_s = min(give_up_s, MEASURED_MARGIN * out[name].total_s)
    return out


# -- the CPU timing's choice, kept across starts (a timing costs seconds, flex_attention's compile most) --
def _timing_key(candidates: Sequence[str], attention: AttentionConfig) -> str:
    import hashlib

    import torch

    from kvyard.kernels.cpp_build import _cpu_identity

    text = repr((tuple(candidates), attention.num_heads, attention.num_kv_heads, attention.head_dim,
                 str(attention.dtype), attention.page_size, torch.__version__, _cpu_identity()))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _choice_file():
    from kvyard.kernels.cpp_build import cache_root

    return cache_root() / "attention_timing" / "choices.json"


def _cached_choice(key: str) -> tuple[str, str] | None:
    """(name, why) chosen by an earlier timing of the same shapes, candidates, torch and CPU."""
    import json

    try:
        entry = json.loads(_choice_file().read_text()).get(key)
    except (OSError, ValueError):
        return None
    return (entry[0], entry[1]) if isinstance(entry, list) and len(entry) == 2 else None


def _store_choice(key: str, name: str, why: str) -> None:
    import json
    import os

    path = _choice_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            choices = json.loads(path.read_text())
        except (OSError, ValueError):
            choices = {}
        choices[key] = [name, why]
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(choices))
        os.replace(tmp, path)
    except OSError as exc:   # a read-only cache: time again next start
        logger.debug("attention timing not cached: %s", exc)


def _serves(reg, name: str, kind: str) -> bool:
    """Whether backend ``name`` declares the KV layout ``kind`` (AttentionBackend.kv_layouts)."""
    try:
        return kind in getattr(reg.get(name), "kv_layouts", ("mha",))
    except PluginError:
        return False


def _can_run(reg, name: str, device: str, attention: AttentionConfig | None = None) -> bool:
    """An installed backend "auto" may pick: it loads, its is_available(device) agrees and it
    serves the layer features the model needs (``attention.features``)."""
    try:
        factory = reg.get(name)
    except PluginError as exc:
        logger.warning("attention backend %s skipped by auto: %s", name, exc)
        return False
    check = getattr(factory, "is_available", None)
    if check is not None and not check(device):
        logger.info("attention backend %s skipped by auto: not available on %s here", name, device)
        return False
    missing = getattr(factory, "missing_features", None)
    if attention is not None and missing is not None and missing(attention.features):
        logger.info("attention backend %s skipped by auto: the model needs %s", name,
                    ", ".join(missing(attention.features)))
        return False
    return True


def resolve_attention_backends(requested: str, prefill: str | None, decode: str | None,
                               device: str, attention: AttentionConfig | None = None) -> tuple[str, str]:
    """(extend backend, decode backend). --prefill-attention-backend / --decode-attention-backend
    override --attention-backend for their mode; two different names make a hybrid."""
    base = None if prefill and decode else resolve_attention_backend(requested, device, attention)
    prefill_name = resolve_attention_backend(prefill, device, attention) if prefill else base
    decode_name = resolve_attention_backend(decode, device, attention) if decode else base
    if prefill_name != decode_name:
        logger.info("attention backend: hybrid, extend steps on %s, decode steps on %s",
                    prefill_name, decode_name)
    return prefill_name, decode_name


def checkpoint_quantization(hf_config) -> dict | None:
    """config.json's quantization_config as a plain dict (None for a float checkpoint)."""
    qc = getattr(hf_config, "quantization_config", None) if hf_config is not None else None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    return qc


def resolve_quantization(requested: str | None, load_format: str, hf_config=None) -> str | None:
    """The quantization method for a model, chosen in one place:

    - a checkpoint that declares ``quantization_config.quant_method`` is served by the method
      registered under that name; a --quantization naming another method (or none) is an error
      that names the declaration;
    - GGUF files keep their weights quantized unless --quantization none or --dtype float32
      asks for the exact dequantized path (the caller passes requested='none' then);
    - otherwise --quantization NAME quantizes the float weights online (the method must say
      it can: ``online``)."""
    methods = registry("quantization_methods")
    declared = checkpoint_quantization(hf_config)
    if declared is not None:
        quant_method = str(declared.get("quant_method", "")).lower()
        if requested not in (None, quant_method):
            raise ValueError(f"quantization: the checkpoint declares quantization_config.quant_method="
                             f"{quant_method!r}; --quantization {requested} conflicts with it")
        if quant_method not in methods:
            raise ValueError(f"quantization_config.quant_method: {quant_method!r} has no registered "
                             f"quantization method (installed: {', '.join(methods.names())})")
        methods.get(quant_method).check_checkpoint(declared)
        logger.info("quantization: %s (declared by the checkpoint's quantization_config)", quant_method)
        return quant_method
    if requested == "none":
        return None
    if requested:
        cls = methods.get(requested)
        if requested != "gguf" and not getattr(cls, "online", False):
            raise ValueError(f"quantization: {requested} serves checkpoints that declare it; "
                             f"this checkpoint is not quantized and {requested} cannot quantize online")
        return requested
    if load_format == "gguf" and "gguf" in methods:
        logger.info("quantization: gguf (auto: the model is a GGUF file; weights stay quantized)")
        return "gguf"
    return None


# Overlap scheduling by device when --disable-overlap-schedule is not given. CUDA: the host
# work of a step hides behind the GPU's. CPU, measured on 2 cores (SmolLM2 GGUF, float32):
# `kvyard bench offline --num-prompts 32 --input-len 128 --output-len 64` gave 72.7 and 72.8
# output tok/s with overlap against 88.9 and 100.6 without, and `bench one-batch` decode was
# slower at batch 1, 8 and 32 alike: the host work of a CPU step is ~1% of it, so there is
# little to hide, while the forward on the worker thread ran up to 2x slower than on the main
# thread (ATen's OpenMP pool of a second thread) and each finished batch costs one extra step.
_OVERLAP_DEFAULT = {"cuda": (True, "the host prepares the next batch while the GPU computes"),
                    "cpu": (False, "measured slower on the CPU, where a step's host work is ~1% of it")}


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


# The generic plugin "auto" falls back to when no native pipeline plugin claims the class.
GENERIC_DIFFUSION_BACKEND = "diffusers"


def resolve_diffusion_backend(requested: str, pipeline_class: str) -> str:
    """A diffusion_pipelines plugin name. "auto": the first native plugin (any but diffusers)
    whose ``claims(pipeline_class)`` is true, else diffusers."""
    reg = registry("diffusion_pipelines")
    if requested != "auto":
        reg.entry(requested)
        return requested
    for name in reg.names():
        if name == GENERIC_DIFFUSION_BACKEND:
            continue
        try:
            claims = reg.get(name).claims(pipeline_class)
        except PluginError as exc:
            logger.warning("diffusion pipeline %s skipped by auto: %s", name, exc)
            continue
        if claims:
            logger.info("diffusion backend: %s (auto: a native plugin that claims %s)", name, pipeline_class)
            return name
    if GENERIC_DIFFUSION_BACKEND not in reg:
        raise ValueError(f"backend: no diffusion pipeline plugin runs {pipeline_class}; "
                         f"valid: {', '.join(reg.names()) or '(none installed)'}")
    logger.info("diffusion backend: diffusers (auto: no native plugin claims %s)", pipeline_class)
    return GENERIC_DIFFUSION_BACKEND
