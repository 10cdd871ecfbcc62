"""The heavy-block deployments: `TextEncoder`, `Denoiser` and `VAE` (encode and decode).

Each replica hosts, for every model it is given, only the components its blocks need, loaded
with `ModularPipeline.from_pretrained(<checkpoint>)` — a Denoiser replica loads the UNet (or
transformer), never the VAE. A call runs one WHOLE block (`RemoteBlock` sends it): the full
denoising loop is one Denoiser call per request, never one remote call per step.

The Denoiser batches with `@serve.batch`: calls that arrive together are grouped by
`block_host.batch_key` (compatible: same model, steps, guidance, size, scheduler, ...) and
each group runs as one block call (`BlockHost.run_many`); its histogram of merged-call sizes
is in `info()`. Options (replicas, CPUs/GPUs, autoscaling, max_ongoing_requests,
max_queued_requests) come from `deployments/serve_config.yaml`, not from here; the defaults
below only keep a bare `serve.run` small.

Weights come from the shared pool (`deployments.weight_pool`) unless `weight_pool` says
`enabled: false`: a replica builds its modules from the node's single object-store copy,
offloads them after `idle_offload_s` unused or when `memory_budget_bytes` needs the room, and
reports what it holds to the registry (`info()` shows it too). The `weight_pool` options come
from the Serve config's `args`, like the batching ones.

Not handled here: per-step progress from inside a remote denoise loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

import torch
from ray import serve

from deployments.block_host import BlockHost, batch_key
from deployments.remote_block import BlockCall, BlockResult
from deployments.weight_pool import PooledWeights, get_registry

POOL_OPTIONS = frozenset({"enabled", "idle_offload_s", "memory_budget_bytes", "heartbeat_s"})


class _RoleDeployment:
    role = ""

    def __init__(self, models: dict[str, dict[str, Any]],
                 weight_pool: dict[str, Any] | None = None) -> None:
        torch.set_num_threads(1)  # replicas share a node's cores; one intra-op thread each
        self.pool = _pool_client(weight_pool or {})
        self.host = BlockHost(self.role, models, pool=self.pool)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.close()

    async def run(self, call: BlockCall) -> BlockResult:
        return await asyncio.to_thread(self._run_locked, call)

    def _run_locked(self, call: BlockCall) -> BlockResult:
        with self._lock:  # one block at a time per replica, like one accelerator
            return self.host.run(call)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"role": self.role, "models": self.host.loaded()}
        if self.pool is not None:
            info["replica"] = self.pool.replica
            info["weights"] = self.pool.describe()
        return info

    async def ping(self, payload: Any = None) -> Any:
        """Echo: measures the cost of one hop (used by the benchmark)."""
        return payload


def _pool_client(options: dict[str, Any]) -> PooledWeights | None:
    """The replica's `PooledWeights` from the `weight_pool` options (None: disabled)."""
    unknown = set(options) - POOL_OPTIONS
    if unknown:
        raise ValueError(f"weight_pool: unknown option(s) {sorted(unknown)}; "
                         f"valid: {sorted(POOL_OPTIONS)}")
    if not options.get("enabled", True):
        return None
    heartbeat_s = float(options.get("heartbeat_s", 2.0))
    idle = options.get("idle_offload_s")
    budget = options.get("memory_budget_bytes")
    replica = serve.get_replica_context().replica_id.unique_id
    return PooledWeights(get_registry(heartbeat_s), replica,
                         idle_offload_s=None if idle is None else float(idle),
                         memory_budget_bytes=None if budget is None else int(budget),
                         heartbeat_s=heartbeat_s)


@serve.deployment(name="TextEncoder", ray_actor_options={"num_cpus": 0.25})
class TextEncoder(_RoleDeployment):
    role = "TextEncoder"


@serve.deployment(name="VAE", ray_actor_options={"num_cpus": 0.25})
class VAE(_RoleDeployment):
    role = "VAE"


@serve.deployment(name="Denoiser", max_ongoing_requests=16,
                  ray_actor_options={"num_cpus": 0.5})
class Denoiser(_RoleDeployment):
    role = "Denoiser"

    def __init__(self, models: dict[str, dict[str, Any]], max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.02,
                 weight_pool: dict[str, Any] | None = None) -> None:
        super().__init__(models, weight_pool)
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def run(self, call: BlockCall) -> BlockResult:
        result = await self._batched(call)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, calls: list[BlockCall]) -> list[BlockResult | Exception]:
        return await asyncio.to_thread(self._run_batch, calls)

    def _run_batch(self, calls: list[BlockCall]) -> list[BlockResult | Exception]:
        with self._lock:
            results = self.host.run_many(calls)
        # Histogram of merged-call sizes: how many requests each UNet loop served.
        groups = collections.Counter(batch_key(call, i) for i, call in enumerate(calls))
        for size in groups.values():
            self.batch_sizes[size] += 1
        return results

    def info(self) -> dict[str, Any]:
        return {**super().info(), "batch_sizes": dict(self.batch_sizes)}
