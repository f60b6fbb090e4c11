"""The proxy's node table: registration, health checks, and the routing strategies.

A node is an api_server URL (any machine). The proxy counts its own in-flight requests per node and
keeps two latency estimates: a running mean (for min_expected_latency) and an EWMA (min_observed_latency).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger("lmkit.serve.proxy")


class Strategy(str, enum.Enum):
    RANDOM = "random"
    MIN_EXPECTED_LATENCY = "min_expected_latency"
    MIN_OBSERVED_LATENCY = "min_observed_latency"


class NodeError(Exception):
    """A node could not be added (unreachable, or not an api_server)."""


@dataclass
class Node:
    url: str
    api_key: str | None = None
    models: list[str] = field(default_factory=list)
    in_flight: int = 0
    num_requests: int = 0
    num_failures: int = 0
    mean_latency_s: float = 0.0
    ewma_latency_s: float = 0.0
    added_at: float = field(default_factory=time.time)

    def headers(self, client_auth: str | None) -> dict[str, str]:
        if self.api_key:
            return {"Authorization": f"Bearer {self.api_key}"}
        return {"Authorization": client_auth} if client_auth else {}

    def record(self, latency_s: float, alpha: float = 0.3) -> None:
        self.num_requests += 1
        self.mean_latency_s += (latency_s - self.mean_latency_s) / self.num_requests
        first = self.num_requests == 1
        self.ewma_latency_s = latency_s if first else alpha * latency_s + (1 - alpha) * self.ewma_latency_s

    def status(self) -> dict:
        return {
            "models": self.models,
            "in_flight": self.in_flight,
            "num_requests": self.num_requests,
            "num_failures": self.num_failures,
            "mean_latency_s": round(self.mean_latency_s, 4),
            "ewma_latency_s": round(self.ewma_latency_s, 4),
        }


class NodeManager:
    def __init__(
        self,
        strategy: Strategy = Strategy.MIN_EXPECTED_LATENCY,
        health_interval_s: float = 5.0,
        health_timeout_s: float = 5.0,
    ) -> None:
        self.strategy = Strategy(strategy)
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.nodes: dict[str, Node] = {}
        self._task: asyncio.Task | None = None

    # -- membership --------------------------------------------------------------------------------

    async def add(self, url: str, api_key: str | None = None) -> Node:
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise NodeError(f"node url must start with http:// or https://, got {url!r}")
        node = Node(url, api_key)
        try:
            async with httpx.AsyncClient(timeout=self.health_timeout_s) as client:
                r = await client.get(f"{url}/v1/models", headers=node.headers(None))
            r.raise_for_status()
            node.models = [m["id"] for m in r.json()["data"]]
        except Exception as exc:
            raise NodeError(f"node {url} does not answer /v1/models: {exc}") from None
        old = self.nodes.get(url)
        if old is not None:  # re-registration (e.g. after a restart) keeps the statistics
            old.models, old.api_key = node.models, api_key
            return old
        self.nodes[url] = node
        logger.warning("node added: %s serving %s", url, node.models)
        return node

    def remove(self, url: str) -> bool:
        node = self.nodes.pop(url.rstrip("/"), None)
        if node is not None:
            logger.warning("node removed: %s", url)
        return node is not None

    def model_names(self) -> list[str]:
        return sorted({m for n in self.nodes.values() for m in n.models})

    # -- health ------------------------------------------------------------------------------------

    async def check(self, node: Node) -> bool:
        try:
            async with httpx.AsyncClient(timeout=self.health_timeout_s) as client:
                r = await client.get(f"{node.url}/health")
            return r.status_code == 200
        except Exception:
            return False

    async def check_or_remove(self, node: Node) -> None:
        if not await self.check(node) and self.nodes.get(node.url) is node:
            self.remove(node.url)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check_or_remove(n) for n in list(self.nodes.values())))

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(self.health_interval_s)
                try:
                    await self.check_all()
                except Exception:
                    logger.exception("health check failed")

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # -- routing -----------------------------------------------------------------------------------

    def pick(self, model: str | None, exclude: set[str]) -> Node | None:
        cands = [n for n in self.nodes.values() if n.url not in exclude and (model is None or model in n.models)]
        if not cands:
            return None
        if self.strategy is Strategy.RANDOM:
            return random.choice(cands)
        if self.strategy is Strategy.MIN_EXPECTED_LATENCY:
            # Expected wait of a new request: everything queued ahead of it, at the node's mean latency
            # (1 s until it has served one, so fresh nodes are neither starved nor flooded).
            def cost(n: Node) -> float:
                return (n.in_flight + 1) * (n.mean_latency_s if n.num_requests else 1.0)
        else:
            # Observed latency, scaled by the node's current queue so a burst does not all land on the
            # node that was fastest a moment ago.
            def cost(n: Node) -> float:
                return (n.ewma_latency_s if n.num_requests else 1.0) * (n.in_flight + 1)

        best = min(cost(n) for n in cands)
        return random.choice([n for n in cands if cost(n) <= best * 1.0001])
