"""The router's own Prometheus metrics (``kvyard_router:*``) on a private registry, so two routers
in one process (tests) do not collide."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class RouterMetrics:
    def __init__(self, policy) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvyard_router:requests", "requests sent to each worker", ["worker", "route"], registry=r)
        self.failures = Counter("kvyard_router:worker_failures", "failed attempts per worker", ["worker"], registry=r)
        self.retries = Counter("kvyard_router:retries", "requests retried on another worker", registry=r)
        self.decisions = Counter("kvyard_router:routing_decisions", "routing decisions",
                                 ["policy", "decision"], registry=r)
        self.no_worker = Counter("kvyard_router:no_healthy_worker", "requests answered 503: no healthy worker",
                                 registry=r)
        self.in_flight = Gauge("kvyard_router:in_flight", "requests in flight per worker", ["worker"], registry=r)
        self.healthy = Gauge("kvyard_router:worker_healthy", "1 when the worker is routable", ["worker"], registry=r)
        self.prefix_hit = Gauge("kvyard_router:prefix_hit_estimate",
                                "share of routed request text the cache-aware tree predicted cached", registry=r)
        self._policy = policy

    def render(self, workers) -> bytes:
        for w in workers:
            self.in_flight.labels(w.url).set(w.load)
            self.healthy.labels(w.url).set(1 if w.healthy else 0)
        routed = getattr(self._policy, "routed_chars", 0)
        if routed:
            self.prefix_hit.set(self._policy.matched_chars / routed)
        return generate_latest(self.registry)
