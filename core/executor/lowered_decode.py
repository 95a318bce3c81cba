"""Decode steps of small CPU batches through the C++ decode loop (kvyard.kernels.decode_loop).

A model that returns a ``LoweredDecoder`` (kvyard.layers.lowering) from ``lowered_decoder()``, whose
linear layers' quantization method can ``lower`` them and whose decode attention backend can
``lower_decode`` every layer, gets one plan at start-up: the norms, linear calls, attention calls
and KV buffers of every layer, given to C++ once. A decode step of at most ``max_batch`` rows
then runs as: embedding and rotary lookup in Python, all layers in one C++ call, logits in Python.
It has the interface of the decode graph runners (``can_run`` / ``replay``) and the results of the
Python step (the same kernels in the same order).

Where every linear layer's method can ``lower_native`` it and the attention backend can
``lower_decode_native`` every layer, a second plan runs batches of at most NATIVE_MAX_ROWS rows as
the native step (native_step.cpp: the whole step in one OpenMP region, no dispatcher); its
results are bitwise the loop's. Larger batches, and everything when a piece has no native form,
take the dispatcher loop.

Off switches: ``--disable-cpu-decode-loop`` (ServerArgs) or KVYARD_CPU_DECODE_LOOP=0 (both plans);
KVYARD_CPU_NATIVE_STEP=0 (only the native step).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from kvyard.forward_batch import ForwardBatch
from kvyard.kernels import CPU_KERNEL_MAX_ROWS, decode_loop
from kvyard.layers.lowering import LoweredDecoder
from kvyard.layers.norm import RMSNorm

logger = logging.getLogger(__name__)

# Batches up to this many rows take the native step (docs/performance.md, "the decode step in one
# OpenMP region": it wins at every size the int kernels serve; larger batches are dense GEMMs).
NATIVE_MAX_ROWS = 47


class LoweredDecodeRunner:
    def __init__(self, model: torch.nn.Module, lowered: LoweredDecoder, plan: decode_loop.DecodePlan,
                 max_batch: int, native: Optional[decode_loop.NativePlan] = None, native_max: int = 0):
        self.model, self.lowered, self.plan, self.max_batch = model, lowered, plan, max_batch
        self.native, self.native_max = native, native_max if native is not None else 0
        self.lm_head = _lowered_lm_head(lowered)

    @classmethod
    def build(cls, model: torch.nn.Module, attn_backend, kv_pool, device: str) -> Optional["LoweredDecodeRunner"]:
        """The runner, or None (with the reason logged) where any part cannot be lowered."""
        reason = _unavailable(model, device)
        lowered = None if reason else model.lowered_decoder()
        if not reason and lowered is None:
            reason = f"{type(model).__name__} does not declare a lowerable decode step"
        if reason:
            logger.info("C++ decode loop off: %s", reason)
            return None
        try:
            plan, max_batch = _build_plan(lowered, attn_backend, kv_pool)
        except _NotLowerable as exc:
            logger.info("C++ decode loop off: %s", exc)
            return None
        native, native_max = _build_native(lowered, attn_backend, kv_pool, min(max_batch, NATIVE_MAX_ROWS))
        logger.info("C++ decode loop on for decode batches of at most %d rows%s", max_batch,
                    f", in one native step up to {native_max}" if native is not None else "")
        return cls(model, lowered, plan, max_batch, native, native_max)

    def capture(self) -> None:
        """Nothing to capture: the plan was built with the runner."""

    def can_run(self, fb: ForwardBatch) -> bool:
        if fb.mode.is_decode():
            return 0 < fb.batch_size <= self.max_batch
        # a verify step runs in groups of whole requests of at most max_batch rows each
        return fb.spec_verify and fb.num_tokens > 0 and max(fb.extend_seq_lens_cpu) <= self.max_batch

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits [len(fb.logits_indices), vocab] of the decode batch ``fb``, or of a speculative
        verify step run as decode rows: each draft token one row over its request's prefix and
        its chain (or tree ancestors) in order, so its logits are the ones a decode step of that
        token on that sequence computes, bit for bit (the int kernels' rows do not depend on their
        batch). Verify rows share sequences, so every row's K/V must be in the pool before any
        row's attention: the dispatcher loop does that per layer, the native step with
        ``shared_rows`` (one stage of writes, then one of attention)."""
        low = self.lowered
        h = low.embed(fb.input_ids)
        cos, sin = low.rotary.lookup(fb.positions)
        if fb.spec_verify:
            table, rows = _verify_rows(fb)
            lens, loc, parts = fb.positions + 1, fb.out_cache_loc, []
            for a, b in _request_groups(fb.extend_seq_lens_cpu, self.max_batch):
                if b - a <= self.native_max:
                    parts.append(self.native.step(h[a:b], cos[a:b], sin[a:b], loc[a:b], table, rows[a:b], lens[a:b],
                                                  shared_rows=True))
                else:
                    parts.append(self.plan.step(h[a:b], cos[a:b], sin[a:b], loc[a:b], table, rows[a:b], lens[a:b]))
            hidden = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            plan = self.native if fb.batch_size <= self.native_max else self.plan
            hidden = plan.step(h, cos, sin, fb.out_cache_loc, fb.req_to_token, fb.req_pool_indices, fb.seq_lens)
        hidden = hidden[fb.logits_indices]
        if self.lm_head is None:
            return self.model.compute_logits(hidden)
        return low.logits_head(hidden, project=self._project)

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm_head's lowered call over ``hidden`` in pieces of at most its ``max_rows`` rows
        (a verify step's rows may exceed it; the GGUF int kernel computes each row on its own, so
        the pieces give what one call of all rows would)."""
        limit = self.lm_head.max_rows or hidden.shape[0]
        if hidden.shape[0] <= limit:
            return self.lm_head(hidden)
        return torch.cat([self.lm_head(part) for part in hidden.split(limit)])


class _NotLowerable(Exception):
    pass


def _switched_off(env: str) -> bool:
    return os.environ.get(env, "1").strip().lower() in ("0", "false", "none")


def _linears(layer) -> tuple:
    """A lowered layer's four linear slots, in the plans' order (decode_loop.QKV, O, GATE_UP, DOWN)."""
    return (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)


def _verify_rows(fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(req_to_token table, [T] row of each new token) for a verify step's tokens as decode rows.
    Chains read their request's own row (token t sees slots [0, positions[t]]); a tree's node gets
    a row of its own in a scratch table: the prefix's slots, then its ancestors' and its own, in
    depth order (the order a decode of that path would have written them)."""
    counts = fb.extend_seq_lens_cpu
    if fb.spec_tree is None:
        return fb.req_to_token, torch.repeat_interleave(fb.req_pool_indices, torch.tensor(counts))
    prefix = fb.extend_prefix_lens_cpu
    table = fb.req_to_token.new_zeros((fb.num_tokens, max(p + n for p, n in zip(prefix, counts))))
    start = 0
    for i, (p, n) in enumerate(zip(prefix, counts)):
        nodes = fb.out_cache_loc[start:start + n].to(table.dtype)
        mask = fb.spec_tree.mask(i)
        table[start:start + n, :p] = fb.req_to_token[int(fb.req_pool_indices[i]), :p]
        for r in range(n):
            seen = nodes[mask[r]]
            table[start + r, p:p + seen.numel()] = seen
        start += n
    return table, torch.arange(fb.num_tokens)


def _request_groups(counts: list[int], limit: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) of consecutive whole requests (counts: each one's tokens, each <= limit),
    at most ``limit`` tokens per range: a request's rows stay in one step, which writes their K/V
    before reading it."""
    groups, a, b = [], 0, 0
    for n in counts:
        if b + n - a > limit:
            groups.append((a, b))
            a = b
        b += n
    groups.append((a, b))
    return groups


def _lowered_lm_head(lowered: LoweredDecoder):
    """The lm_head's lowered call for the logits of decode rows (the int kernel up to its decode
    range for a kept-quantized head), or None: compute_logits projects as in the Python step."""
    if lowered.logits_head is None:
        return None
    lm_head = lowered.logits_head.lm_head
    return lm_head.method.lower(lm_head)


def _unavailable(model: torch.nn.Module, device: str) -> Optional[str]:
    if _switched_off("KVYARD_CPU_DECODE_LOOP"):
        return "KVYARD_CPU_DECODE_LOOP=0"
    if torch.device(device).type != "cpu":
        return f"device {device}"
    if not callable(getattr(model, "lowered_decoder", None)):
        return f"{type(model).__name__} does not declare a lowerable decode step"
    if not decode_loop.available():
        return "the C++ library could not be built here"
    return None


def _build_plan(lowered: LoweredDecoder, attn_backend, kv_pool) -> tuple[decode_loop.DecodePlan, int]:
    norms = [lowered.norm] + [n for layer in lowered.layers for n in (layer.input_norm, layer.post_norm)]
    if any(type(n) is not RMSNorm for n in norms) or len({n.eps for n in norms}) != 1:
        raise _NotLowerable("the model's norms are not one plain RMSNorm variant")
    plan = decode_loop.DecodePlan(lowered.norm.eps, lowered.norm.weight)
    max_batch = CPU_KERNEL_MAX_ROWS
    for layer in lowered.layers:
        attn = layer.attention
        call = attn_backend.lower_decode(attn, kv_pool)
        if call is None:
            raise _NotLowerable(f"the attention backend cannot lower layer {attn.layer_id}")
        index = plan.add_layer(layer.input_norm.weight, layer.post_norm.weight, kv_pool.k_buffer(attn.layer_id),
                               kv_pool.v_buffer(attn.layer_id), attn.num_heads, attn.num_kv_heads, attn.head_dim,
                               call)
        for which, linear in enumerate(_linears(layer)):
            low = linear.method.lower(linear)
            if low is None:
                raise _NotLowerable(f"{linear.prefix}: its quantization method cannot lower it")
            plan.add_linear(index, which, low.calls, low.bias)
            if low.max_rows is not None:
                max_batch = min(max_batch, low.max_rows)
    return plan, max_batch


def _build_native(lowered: LoweredDecoder, attn_backend, kv_pool,
                  max_rows: int) -> tuple[Optional[decode_loop.NativePlan], int]:
    """The native plan and the rows it takes, or (None, 0) with the reason logged."""
    if _switched_off("KVYARD_CPU_NATIVE_STEP"):
        logger.info("native decode step off: KVYARD_CPU_NATIVE_STEP=0")
        return None, 0
    pieces = []
    for layer in lowered.layers:
        attn = attn_backend.lower_decode_native(layer.attention, kv_pool)
        linears = [linear.method.lower_native(linear) for linear in _linears(layer)]
        missing = [f"layer {layer.attention.layer_id} attention"] if attn is None else []
        missing += [linear.prefix for linear, low in zip(_linears(layer), linears) if low is None]
        if missing:
            logger.info("native decode step off: no native form for %s", ", ".join(missing))
            return None, 0
        pieces.append((layer, attn, linears))
    plan = decode_loop.NativePlan(lowered.norm.eps, lowered.norm.weight, max_rows)
    try:
        for layer, attn, linears in pieces:
            attention = layer.attention
            index = plan.add_layer(layer.input_norm.weight, layer.post_norm.weight, kv_pool.k_buffer(attention.layer_id),
                                   kv_pool.v_buffer(attention.layer_id), attn)
            for which, low in enumerate(linears):
                plan.add_linear(index, which, low)
        rows = plan.check()
    except RuntimeError as exc:   # a descriptor the plan refuses (ABI, dtype, shapes): say so, keep the loop
        logger.info("native decode step off: %s", str(exc).splitlines()[0])
        return None, 0
    return plan, rows
