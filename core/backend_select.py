"""The one place where "auto" choices are resolved (plugins and automatic defaults), each logged
with its reason."""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Mapping, Sequence

from kvyard.attention import AttentionConfig
from kvyard.attention_timing import AttentionTiming
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
        candidates = tuple(n for n in preference if n in reg and _can_run(reg, n, device))
        if len(candidates) > 1:
            name, why = pick_by_timing(candidates, _timings(candidates, attention))
            logger.info("attention backend: %s (auto on cpu, timed on the model's head shapes: %s)", name, why)
            return name
    for name in preference:
        if name in reg and _can_run(reg, name, device):
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
    from kvyard.attention_timing import time_backend

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


def _serves(reg, name: str, kind: str) -> bool:
    """Whether backend ``name`` declares the KV layout ``kind`` (AttentionBackend.kv_layouts)."""
    try:
        return kind in getattr(reg.get(name), "kv_layouts", ("mha",))
    except PluginError:
        return False


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
                               device: str, attention: AttentionConfig | None = None) -> tuple[str, str]:
    """(extend backend, decode backend). --prefill-attention-backend / --decode-attention-backend
    override --attention-backend for their mode; two different names make a hybrid."""
    base = None if prefill and decode else resolve_attention_backend(requested, device, attention)
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
