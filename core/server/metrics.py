"""Prometheus metrics (--enable-metrics), named ``kvyard:*`` and labelled with the model name;
with --enable-sglang-metrics every series is served under ``sglang:*`` as well, so SGLang's
dashboards and PromQL work unchanged.

Counters and histograms are fed by the TokenizerManager's on_finish hook (one call per finished
request, on the event loop) and, for ``func_latency_seconds``, by the HTTP middleware (one
observation per handled request, labelled with the route's handler name). Gauges describe the
scheduler and are refreshed from its get_info control op when /metrics is scraped;
``gen_throughput`` is the generated tokens per second since the previous scrape (counted when
requests finish).
"""
from __future__ import annotations

import re
import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
# scheduler get_info key -> gauge name and help
GAUGES = {
    "num_running_reqs": ("kvyard:num_running_reqs", "requests running in the scheduler"),
    "num_queue_reqs": ("kvyard:num_queue_reqs", "requests waiting in the scheduler queue"),
    "token_usage": ("kvyard:token_usage", "fraction of KV slots held by requests"),
    "cache_hit_rate": ("kvyard:cache_hit_rate", "prompt tokens served from the prefix cache / all prompt tokens"),
    "spec_accept_rate": ("kvyard:spec_accept_rate", "speculative decoding: accepted / proposed draft tokens"),
    "spec_accept_length": ("kvyard:spec_accept_length", "speculative decoding: mean tokens gained per verify step"),
}


class ServerMetrics:
    def __init__(self, model_name: str, sglang_names: bool = False, ttft_buckets=None, tpot_buckets=None,
                 e2e_buckets=None):
        """``*_buckets``: histogram bucket bounds (SGLang's --bucket-time-to-first-token,
        --bucket-inter-token-latency, --bucket-e2e-request-latency); None: the defaults above."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("kvyard:prompt_tokens", "prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("kvyard:generation_tokens", "tokens generated", labels, registry=r)
        self.cached_tokens = Counter("kvyard:cached_tokens", "prompt tokens served from the prefix cache",
                                     labels, registry=r)
        self.requests = Counter("kvyard:num_requests", "requests that finished (client disconnects excluded)", labels, registry=r)
        self.lora_requests = Counter("kvyard:lora_requests", "requests that finished, by LoRA adapter",
                                     labels + ["lora_name"], registry=r)
        self.ttft = Histogram("kvyard:time_to_first_token_seconds", "time to first token", labels,
                              buckets=sorted(ttft_buckets or LATENCY_BUCKETS), registry=r)
        self.tpot = Histogram("kvyard:time_per_output_token_seconds", "time per output token after the first",
                              labels, buckets=sorted(tpot_buckets or TOKEN_TIME_BUCKETS), registry=r)
        self.e2e = Histogram("kvyard:e2e_request_latency_seconds", "end-to-end request latency", labels,
                             buckets=sorted(e2e_buckets or LATENCY_BUCKETS), registry=r)
        self.gauges = {key: Gauge(name, doc, labels, registry=r) for key, (name, doc) in GAUGES.items()}
        self.num_used_tokens = Gauge("kvyard:num_used_tokens", "KV slots held by requests (tokens)", labels, registry=r)
        self.gen_throughput = Gauge("kvyard:gen_throughput", "generated tokens per second since the previous scrape",
                                    labels, registry=r)
        self.func_latency = Histogram("kvyard:func_latency_seconds", "latency of the HTTP handlers, by handler name",
                                      ["name"], buckets=LATENCY_BUCKETS, registry=r)
        self.sglang_names = sglang_names
        self._last_scrape = (time.monotonic(), 0.0)   # (when, generation tokens counted then)

    def on_finish(self, state) -> None:
        """TokenizerManager hook: one finished (or aborted) request."""
        name = self.model_name
        meta = state.meta
        self.requests.labels(name).inc()
        if getattr(state, "lora_name", None) is not None:
            self.lora_requests.labels(name, state.lora_name).inc()
        self.prompt_tokens.labels(name).inc(meta.get("prompt_tokens", len(state.prompt_ids)))
        completion = meta.get("completion_tokens", len(state.output_ids))
        self.generation_tokens.labels(name).inc(completion)
        self.cached_tokens.labels(name).inc(meta.get("cached_tokens", 0))
        e2e: Optional[float] = meta.get("e2e_latency")
        if e2e is not None:
            self.e2e.labels(name).observe(e2e)
        if state.first_token is not None:
            ttft = state.first_token - state.created
            self.ttft.labels(name).observe(ttft)
            if e2e is not None and completion > 1:
                self.tpot.labels(name).observe((e2e - ttft) / (completion - 1))

    def observe_func(self, name: str, seconds: float) -> None:
        self.func_latency.labels(name).observe(seconds)

    def set_scheduler_load(self, info: dict) -> None:
        name = self.model_name
        for key, gauge in self.gauges.items():
            if key in info:
                gauge.labels(name).set(float(info[key]))
        if "token_usage" in info and info.get("max_total_num_tokens"):
            self.num_used_tokens.labels(name).set(round(info["token_usage"] * info["max_total_num_tokens"]))
        now, generated = time.monotonic(), self.generation_tokens.labels(name)._value.get()
        then, before = self._last_scrape
        if now > then:
            self.gen_throughput.labels(name).set((generated - before) / (now - then))
        self._last_scrape = (now, generated)

    def render(self) -> bytes:
        text = generate_latest(self.registry)
        if self.sglang_names:
            text += with_prefix(text, b"sglang:")
        return text


_NAME = re.compile(rb"^(# (?:HELP|TYPE) )?kvyard:", re.M)


def with_prefix(text: bytes, prefix: bytes) -> bytes:
    """The same exposition with every ``kvyard:`` metric name under ``prefix`` instead."""
    return _NAME.sub(lambda m: (m.group(1) or b"") + prefix, text)


class FuncLatencyMiddleware:
    """Observes ``func_latency_seconds`` for every HTTP request, labelled with the name of the
    handler that served it (Starlette records it in the scope while routing); a request no
    route matched is not observed."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            endpoint = scope.get("endpoint")
            if endpoint is not None:
                self.metrics.observe_func(getattr(endpoint, "__name__", str(endpoint)), time.perf_counter() - start)


STEP_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ImageMetrics:
    """The diffusion server's metrics: requests, images, seconds per denoising step (per
    pipeline call), request latency and queue length. Fed from the queue's worker thread and the
    handlers (prometheus_client is thread-safe)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels, r = ["model_name"], self.registry
        self.requests = Counter("kvyard:num_requests", "image requests that finished", labels, registry=r)
        self.images = Counter("kvyard:images_generated", "images (or videos) generated", labels, registry=r)
        self.batches = Counter("kvyard:pipeline_calls", "pipeline calls (batches)", labels, registry=r)
        self.step_time = Histogram("kvyard:seconds_per_step", "seconds per denoising step of a pipeline call",
                                   labels, buckets=STEP_TIME_BUCKETS, registry=r)
        self.e2e = Histogram("kvyard:e2e_request_latency_seconds", "end-to-end request latency", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("kvyard:num_queue_reqs", "requests waiting for the pipeline", labels, registry=r)

    def on_batch(self, jobs, seconds: float) -> None:
        name = self.model_name
        self.batches.labels(name).inc()
        self.images.labels(name).inc(sum(j.n for j in jobs))
        self.step_time.labels(name).observe(seconds / max(1, jobs[0].num_inference_steps))

    def on_request(self, seconds: float) -> None:
        self.requests.labels(self.model_name).inc()
        self.e2e.labels(self.model_name).observe(seconds)

    def render(self, queue_length: int) -> bytes:
        self.queue.labels(self.model_name).set(queue_length)
        return generate_latest(self.registry)
