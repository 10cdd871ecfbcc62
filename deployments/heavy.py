"""The heavy-block deployments: `TextEncoder`, `Denoiser` and `VAE` (encode and decode).

Each replica hosts, for every model it is given, only the components its role's blocks need
(`deployments.block_host.BlockHost`) — a Denoiser replica loads the UNet (or transformer),
never the VAE — and runs the blocks the router's calls carry.

- `TextEncoder` and `VAE`: `run(call)` runs one whole block call (the router's engine has
  already merged the requests that could share it); the VAE also fits a model's preview map
  (`latent_rgb`), since the router holds no VAE.
- LoRA adapters a request names load in the TextEncoder and Denoiser replicas on first use
  (`BlockHost`: each replica's own LRU of `max_loaded_loras`, the files' tensors shared
  through the weight pool).
- `Denoiser`: `stream(call, options)` hands the denoise block to the replica's step scheduler
  (`deployments.step_scheduler`), which steps every router's requests together, one model
  forward per step for up to `cap` images, joining and leaving between steps; the call is a
  Serve streaming response that yields a `StepReport` after each of its steps and the block's
  result last. Cancelling the stream (DELETE, a timeout, a client gone) drops the request at
  its next step. `max_ongoing_requests` must cover the requests it is to step together.

Options (replicas, CPUs/GPUs, autoscaling, max_ongoing_requests, max_queued_requests) come
from `deployments/serve_config.yaml`, not from here; the defaults below only keep a bare
`serve.run` small. The application's arguments (`deployments.app_config.ServeAppConfig`) give
the weight pool's options and the request scheduling window.

Weights come from the shared pool (`deployments.weight_pool`) unless `weight_pool.enabled` is
false: a replica builds its modules from the node's single object-store copy, offloads them
after `idle_offload_s` unused or when `memory_budget_bytes` needs the room, and reports what it
holds to the registry (`info()` shows it too).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from blocks import PipelineState
from blocks.families import DENOISER, TEXT_ENCODER, HeavyRole
from blocks.families import VAE as VAE_ROLE
from blocks.latent_rgb import LatentRGB
from deployments.app_config import WeightPoolConfig
from deployments.block_host import BlockHost
from deployments.remote_block import ROLE_DEPLOYMENTS, BlockCall, BlockResult, ReceivedCall
from deployments.step_scheduler import StepReport, StepScheduler, TaskOptions
from deployments.weight_pool import PooledWeights, get_registry


class _RoleDeployment:
    role: HeavyRole

    def __init__(self, models: dict[str, dict[str, Any]],
                 weight_pool: WeightPoolConfig | None = None) -> None:
        torch.set_num_threads(1)  # replicas share a node's cores; one intra-op thread each
        self.pool = _pool_client(weight_pool or WeightPoolConfig())
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
        """Echo: readiness probes and the hop benchmark."""
        return payload


def _pool_client(options: WeightPoolConfig) -> PooledWeights | None:
    """The replica's `PooledWeights` (None: the pool is disabled)."""
    if not options.enabled:
        return None
    replica = serve.get_replica_context().replica_id.unique_id
    return PooledWeights(get_registry(options.heartbeat_s), replica,
                         idle_offload_s=options.idle_offload_s,
                         memory_budget_bytes=options.memory_budget_bytes,
                         heartbeat_s=options.heartbeat_s)


@serve.deployment(name=ROLE_DEPLOYMENTS[TEXT_ENCODER], ray_actor_options={"num_cpus": 0.25})
class TextEncoder(_RoleDeployment):
    role = TEXT_ENCODER


@serve.deployment(name=ROLE_DEPLOYMENTS[VAE_ROLE], ray_actor_options={"num_cpus": 0.25})
class VAE(_RoleDeployment):
    role = VAE_ROLE

    async def latent_rgb(self, model: str) -> LatentRGB | None:
        """`model`'s preview map, fitted on the VAE here (the router holds none)."""
        return await asyncio.to_thread(self._latent_rgb_locked, model)

    def _latent_rgb_locked(self, model: str) -> LatentRGB | None:
        with self._lock:
            return self.host.latent_rgb(model)


class _Stream:
    """A streamed task's listener: what the scheduler's thread reports goes to the stream's
    event loop; closing the stream asks the scheduler to drop the task."""

    def __init__(self, received: ReceivedCall | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.received = received
        self.closed = False

    def _put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def step(self, report: StepReport) -> None:
        self._put(report)

    def finished(self, state: PipelineState) -> None:
        assert self.received is not None
        self._put(self.received.result(state))

    def failed(self, error: BaseException) -> None:
        self._put(error)

    def stopped(self) -> bool:
        return self.closed


@serve.deployment(name=ROLE_DEPLOYMENTS[DENOISER], max_ongoing_requests=32,
                  ray_actor_options={"num_cpus": 0.5})
class Denoiser(_RoleDeployment):
    role = DENOISER

    def __init__(self, models: dict[str, dict[str, Any]], weight_pool: WeightPoolConfig,
                 batch_window_s: float) -> None:
        super().__init__(models, weight_pool)
        self.scheduler = StepScheduler(workers=1, batch_window_s=batch_window_s,
                                       name="blockserve-denoiser")
        self.scheduler.start()

    async def stream(self, call: BlockCall, options: TaskOptions
                     ) -> AsyncIterator[StepReport | BlockResult]:
        listener = _Stream()
        # On the scheduler's thread, between steps: a first use of a LoRA adapter loads it
        # into the models that thread runs forwards on.
        task, listener.received = await asyncio.wrap_future(
            self.scheduler.call_soon(lambda: self.host.task(call, options, listener)))
        self.scheduler.submit(task)
        try:
            while True:
                item = await listener.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, BlockResult):
                    return
        finally:
            listener.closed = True  # cancelled or done: the scheduler drops it, if running

    def _run_locked(self, call: BlockCall) -> BlockResult:
        # A whole block call (not streamed) still computes on the scheduler's thread.
        return self.scheduler.call_soon(lambda: self.host.run(call)).result()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "waiting": self.scheduler.waiting,
                "active": self.scheduler.active}
