"""A generation job as the engine sees it, and its result.

Routes and the CLI turn requests into a `GenerationJob` (already validated against the model:
every value here is one the model accepts); an engine runs it with `run_job`. A job carries its
own cancellation flag and an optional per-step progress callback. Nothing here knows HTTP.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from blocks import GenerationCancelled
from service.registry import LoadedModel

ProgressCallback = Callable[[int, int], None]  # (steps done, steps in total)


@dataclass
class GenerationJob:
    """One validated request: which model and workflow, and every pipeline input."""

    model: str
    workflow: str  # text2image | image2image | inpaint | image_conditioned
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    seed: int  # image i uses seed + i, with its own generator
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None  # None: the checkpoint's
    strength: float | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None  # white = repaint
    on_step: ProgressCallback | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys may run in one batch without changing any image."""
        return (self.model, self.workflow, self.width, self.height, self.steps,
                self.guidance_scale, self.scheduler, self.strength)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    seconds: float


def pipeline_inputs(job: GenerationJob) -> dict[str, Any]:
    """The pipeline call's keyword arguments for `job` (None values left out)."""
    inputs: dict[str, Any] = {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "num_images_per_prompt": job.n,
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance_scale,
        "height": job.height,
        "width": job.width,
        "strength": job.strength,
        "image": job.image,
        "mask_image": job.mask,
        # One CPU generator per image: image i is the same alone or in any batch, on any device.
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds],
        "output_type": "pil",
    }
    return {name: value for name, value in inputs.items() if value is not None}


def run_job(model: LoadedModel, job: GenerationJob) -> GenerationResult:
    """Run `job` on `model` in this thread; `GenerationCancelled` if it was cancelled."""
    if job.cancelled.is_set():
        raise GenerationCancelled(-1)
    pipe = model.pipeline(job.scheduler)
    inputs = {k: v for k, v in pipeline_inputs(job).items() if model.accepts(k)}

    def on_step_end(step: int, timestep: Any, block_state: Any) -> bool:
        if job.on_step is not None:
            timesteps = block_state.get("timesteps") if hasattr(block_state, "get") else None
            total = len(timesteps) if timesteps is not None else job.steps
            job.on_step(step + 1, total)
        return job.cancelled.is_set()

    start = time.perf_counter()
    images = pipe(**inputs, output="images", callback_on_step_end=on_step_end)
    if len(images) != job.n:
        raise RuntimeError(f"model {job.model!r} returned {len(images)} images, expected {job.n}")
    return GenerationResult(list(images), job.seeds, time.perf_counter() - start)
