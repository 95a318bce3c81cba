"""The router's worker set: URL, health and in-flight count per worker, and the health-check loop.

Invariants: a URL is in the set at most once; ``load`` counts the requests this router has sent to
the worker and not yet finished (streams until their last byte); a worker is routable only while
``healthy``. A failed request marks its worker unhealthy at once; the health loop (GET /health
every interval) marks it healthy again when it answers 200.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import httpx

logger = logging.getLogger("kvyard.router")


@dataclass(eq=False)
class Worker:
    url: str
    healthy: bool = True
    load: int = 0
    failures: int = 0  # consecutive failed requests or health checks


class WorkerPool:
    def __init__(self, urls, client: httpx.AsyncClient, headers: dict, interval: float, timeout: float,
                 on_removed: Callable[[str], None] = lambda url: None) -> None:
        self.workers: dict[str, Worker] = {u: Worker(u) for u in urls}
        self._client, self._headers = client, headers
        self._interval, self._timeout = interval, timeout
        self._on_removed = on_removed

    def healthy(self, exclude: frozenset[str] = frozenset()) -> list[Worker]:
        return [w for w in self.workers.values() if w.healthy and w.url not in exclude]

    def add(self, url: str) -> Worker:
        return self.workers.setdefault(url, Worker(url))

    def remove(self, url: str) -> Optional[Worker]:
        worker = self.workers.pop(url, None)
        if worker is not None:
            self._on_removed(url)
        return worker

    def mark_failed(self, worker: Worker, reason: str) -> None:
        worker.failures += 1
        if worker.healthy:
            logger.warning("worker %s marked unhealthy: %s", worker.url, reason)
        worker.healthy = False

    async def check(self, worker: Worker) -> bool:
        try:
            r = await self._client.get(worker.url + "/health", headers=self._headers, timeout=self._timeout)
            ok = r.status_code == 200
            reason = f"/health answered {r.status_code}"
        except httpx.HTTPError as exc:
            ok, reason = False, f"/health failed: {type(exc).__name__}"
        if ok:
            if not worker.healthy:
                logger.info("worker %s is healthy", worker.url)
            worker.healthy, worker.failures = True, 0
        else:
            self.mark_failed(worker, reason)
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in list(self.workers.values())))

    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_all()
