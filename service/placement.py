"""Where blocks run: the one thing that differs between embedded and Ray mode.

The app, routes, registry and engine are the same in both modes; a `Placement` says where the
heavy blocks run and brings the `Runner` the engine runs its stages on:

- `EmbeddedPlacement` (the default): every block in this process. Its `LocalRunner` owns the
  step scheduler (`deployments.step_scheduler`): the denoise loops step there, and the engine's
  other stages (text encoding, decoding) run on the same worker threads between steps, so the
  process never computes on more threads than it has cores for.
- `service.ray_placement.RayPlacement`: heavy blocks are `RemoteBlock`s on their deployments;
  the denoise block streams its steps from a `Denoiser` replica (whose own step scheduler
  batches every router's requests), and the other stages are remote calls made from a pool of
  router threads.

Not handled here: what the engine does with jobs (`service.engine`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from blocks import ModularPipelineBlocks, PipelineState
from blocks.latent_rgb import LatentRGB
from deployments.lora_cache import LoraLoader, PipelineLoraLoader
from deployments.step_scheduler import DenoiseTask, StepScheduler, TaskListener, TaskOptions
from service.latent_rgb import factors_for
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class DenoiseRequest:
    """One request's denoise block, as the engine hands it to a runner."""

    model: str
    block: ModularPipelineBlocks
    name: str
    components: Any
    state: PipelineState
    listener: TaskListener
    options: TaskOptions
    device: str


class Runner(Protocol):
    """Where the engine's stages run (see the module docstring)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def capacity(self, cap: int) -> int:
        """How many images of one pool (model and size) the engine may have running at once,
        given the model's cap on images per forward."""

    def worker(self) -> int:
        """The index of the worker thread calling this (which pipeline copy it may use)."""

    def run(self, fn: Callable[[], None]) -> None:
        """Run a stage (`fn` handles its own errors) soon, off the caller's thread."""

    def preview_map(self, model: Any) -> LatentRGB | None:
        """The latent -> RGB map of a loaded model's previews (fitted on its VAE, wherever
        that runs); None: no previews."""

    def denoise(self, request: DenoiseRequest) -> Callable[[], None]:
        """Start `request`'s denoise block; its listener hears steps and the outcome. Returns
        a function that stops it now (the listener's `stopped()` stops it at the next step
        anyway)."""


class Placement(Protocol):
    def transform_blocks(self, config: Any, blocks: ModularPipelineBlocks
                         ) -> ModularPipelineBlocks:
        """`blocks` as this placement runs them (heavy blocks remote)."""

    def make_runner(self, settings: Any) -> Runner:
        """The runner the engine's stages run on."""

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether whatever runs the blocks can serve now, and what the readiness probe shows
        about it."""

    def describe(self, model: str) -> dict[str, Any] | None:
        """Which deployment runs each heavy block of `model`, and its replicas."""

    def lora_loader(self, pipeline: Any) -> LoraLoader:
        """Where a model's LoRA adapters load, given its (router-side) pipeline."""

    def metric_collectors(self) -> list[Any]:
        """Prometheus collectors this placement adds to the app's /metrics."""


def share_cores(workers: int) -> None:
    """Give each of `workers` concurrent model calls its share of the cores: more intra-op
    threads than cores in all makes OpenMP threads wait on each other (many times slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = min(torch.get_num_threads(), max(1, (cores or 1) // workers))
    if threads != torch.get_num_threads():
        logger.info("engine: %d workers, %d torch threads each", workers, threads)
        torch.set_num_threads(threads)


class LocalRunner:
    """Embedded mode: a step scheduler's workers run the denoise loops and every other stage."""

    def __init__(self, workers: int = 1,
                 batch_window_s: float = Settings.model_fields["batch_window_ms"].default / 1000
                 ) -> None:
        self.scheduler = StepScheduler(workers=workers, batch_window_s=batch_window_s)

    def start(self) -> None:
        if self.scheduler.workers > 1:
            share_cores(self.scheduler.workers)
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def capacity(self, cap: int) -> int:
        return cap * self.scheduler.workers

    def worker(self) -> int:
        return self.scheduler.current_worker()

    def run(self, fn: Callable[[], None]) -> None:
        self.scheduler.call_soon(fn)

    def preview_map(self, model: Any) -> LatentRGB | None:
        return factors_for(model)

    def denoise(self, request: DenoiseRequest) -> Callable[[], None]:
        self.scheduler.submit(DenoiseTask(
            block=request.block, name=request.name, components=request.components,
            state=request.state, listener=request.listener, options=request.options,
            device=request.device))
        return lambda: None  # the scheduler polls the listener's stopped() every step


class EmbeddedPlacement:
    """Every block in this process."""

    def transform_blocks(self, config: Any, blocks: ModularPipelineBlocks
                         ) -> ModularPipelineBlocks:
        return blocks

    def make_runner(self, settings: Settings) -> LocalRunner:
        return LocalRunner(workers=settings.workers,
                           batch_window_s=settings.batch_window_ms / 1000)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return True, {}

    def describe(self, model: str) -> dict[str, Any] | None:
        return None

    def lora_loader(self, pipeline: Any) -> LoraLoader:
        return PipelineLoraLoader(pipeline)

    def metric_collectors(self) -> list[Any]:
        return []
