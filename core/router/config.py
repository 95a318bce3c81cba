"""The router's flags (SGLang router names) and its frozen config."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


@dataclass(frozen=True)
class CacheAwareConfig:
    """cache_aware: route to the worker with the longest prefix match when the match covers more
    than ``cache_threshold`` of the request text, else to the worker with the smallest tree; unless
    the load is imbalanced (max - min > abs AND max > rel * min in-flight requests): then the least
    loaded worker."""
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.0001
    eviction_interval_secs: float = 60.0
    max_tree_size: int = 2 ** 24  # characters per worker


@dataclass(frozen=True)
class RouterConfig:
    worker_urls: tuple[str, ...] = ()
    policy: str = "cache_aware"
    cache_aware: CacheAwareConfig = CacheAwareConfig()
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    health_check_interval_secs: float = 10.0
    health_check_timeout_secs: float = 5.0
    request_timeout_secs: float = 1800.0
    max_retries: int = 3


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker-urls", nargs="*", default=[], metavar="URL",
                   help="workers to route to (more can be added at runtime: POST /add_worker?url=)")
    p.add_argument("--policy", choices=POLICIES, default="cache_aware", help="routing policy")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None,
                   help="clients must send it (Bearer); it is also sent to the workers")
    g = p.add_argument_group("cache_aware")
    d = CacheAwareConfig()
    g.add_argument("--cache-threshold", type=float, default=d.cache_threshold,
                   help="minimum prefix-match share of the request text for a cache-directed route")
    g.add_argument("--balance-abs-threshold", type=int, default=d.balance_abs_threshold,
                   help="imbalanced when max - min in-flight requests exceeds this ...")
    g.add_argument("--balance-rel-threshold", type=float, default=d.balance_rel_threshold,
                   help="... and max exceeds min times this")
    g.add_argument("--eviction-interval-secs", type=float, default=d.eviction_interval_secs,
                   help="how often the tree forgets least recently used prompts")
    g.add_argument("--max-tree-size", type=int, default=d.max_tree_size, help="characters kept per worker")
    h = p.add_argument_group("workers")
    r = RouterConfig()
    h.add_argument("--health-check-interval-secs", type=float, default=r.health_check_interval_secs)
    h.add_argument("--health-check-timeout-secs", type=float, default=r.health_check_timeout_secs)
    h.add_argument("--request-timeout-secs", type=float, default=r.request_timeout_secs)
    h.add_argument("--max-retries", type=int, default=r.max_retries,
                   help="other workers tried when one fails before a response started")


def config_from(ns: argparse.Namespace) -> RouterConfig:
    checks = {"cache_threshold": 0 <= ns.cache_threshold <= 1, "balance_abs_threshold": ns.balance_abs_threshold >= 0,
              "balance_rel_threshold": ns.balance_rel_threshold >= 1, "eviction_interval_secs": ns.eviction_interval_secs > 0,
              "max_tree_size": ns.max_tree_size > 0, "port": 0 < ns.port < 65536, "max_retries": ns.max_retries >= 0,
              "health_check_interval_secs": ns.health_check_interval_secs > 0}
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{name}: out of range ({getattr(ns, name)!r})")
    for url in ns.worker_urls:
        check_url(url)
    ca = CacheAwareConfig(ns.cache_threshold, ns.balance_abs_threshold, ns.balance_rel_threshold,
                          ns.eviction_interval_secs, ns.max_tree_size)
    return RouterConfig(tuple(u.rstrip("/") for u in ns.worker_urls), ns.policy, ca, ns.host, ns.port, ns.api_key,
                        ns.health_check_interval_secs, ns.health_check_timeout_secs, ns.request_timeout_secs,
                        ns.max_retries)


def check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise ValueError(f"worker url: expected http(s)://HOST:PORT, got {url!r}")
    return url.rstrip("/")
