"""A generation job as the engine sees it, its result, and how it reports progress.

Routes and the CLI turn requests into a `GenerationJob` (already validated against the model:
every value here is one the model accepts); the engine (`service.engine`) runs it with the
pipeline inputs `pipeline_inputs` gives. A job carries its own stop flag (cancelled by a
client, or past its deadline), an optional `JobListener` told when it is queued, starts and
finishes each denoising step (with preview images when `wants_preview` says so). Nothing here
knows HTTP.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from blocks import GenerationCancelled
from blocks.step_cache import StepCacheConfig

CANCELLED, TIMEOUT = "cancelled", "timeout"  # why a job was stopped


class GenerationTimedOut(Exception):
    """The job was not done by its deadline (queue time included) and was stopped."""

    def __init__(self, seconds: float | None, step: int | None = None) -> None:
        self.seconds, self.step = seconds, step
        after = f" after {seconds:g}s" if seconds is not None else ""
        at = f" at step {step}" if step else " before it started"
        super().__init__(f"generation timed out{after}{at}")


class JobListener(Protocol):
    """Told what happens to a job. Called on the engine's thread: return quickly."""

    def queued(self, position: int) -> None:
        """Queued with `position` jobs ahead of it."""

    def started(self) -> None:
        """It left the queue: its text encoding runs, then its denoising steps."""

    def progress(self, step: int, total: int, previews: list[Image.Image] | None) -> None:
        """`step` of `total` denoising steps done; `previews`: one per image, when asked."""


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
    # One input image, or several reference images (image_conditioned workflows).
    image: Image.Image | list[Image.Image] | None = None
    mask: Image.Image | None = None  # white = repaint
    step_cache: StepCacheConfig | None = None  # None: every step runs the whole denoiser
    # LoRA adapters (name, scale), names among the model's allowed ones; () for none.
    loras: tuple[tuple[str, float], ...] = ()
    listener: JobListener | None = None
    # (step, total) -> whether this step's progress should carry preview images.
    wants_preview: Callable[[int, int], bool] | None = None
    timeout_seconds: float | None = None  # from submission; None: no deadline
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None  # CANCELLED or TIMEOUT, once stopped

    @property
    def input_images(self) -> int:
        """How many input images the job has (0 for text-to-image)."""
        if self.image is None:
            return 0
        return len(self.image) if isinstance(self.image, list) else 1

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Request-level batching (`BLOCKSERVE_SCHEDULING=request`): jobs with equal keys may
        run as one batch from first step to last: equal steps, guidance, scheduler, size,
        strength, negative prompt given or not. Edits carry their own image, so each runs
        alone (its key includes its id). LoRA adapters and step caching are per sample inside a
        batch, so they don't split batches."""
        alone = self.id if self.image is not None or self.mask is not None else None
        return (self.model, self.workflow, self.width, self.height, self.steps,
                self.guidance_scale, self.scheduler, self.strength,
                self.negative_prompt is not None, alone)

    def pipeline_inputs(self, accepts: Callable[[str], bool]) -> dict[str, Any]:
        """The pipeline inputs of this job, those the model `accepts`, None left out.

        One prompt (and negative prompt) per image and one CPU generator per image seeded
        `seed + i`: image i draws the same noise alone or with any other requests, on any
        device, and every per-image value has one row per image (`service.merged_calls`)."""
        n = self.n
        inputs: dict[str, Any] = {
            "prompt": [self.prompt] * n,
            "negative_prompt": None if self.negative_prompt is None
            else [self.negative_prompt] * n,
            "num_images_per_prompt": 1,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "strength": self.strength,
            "image": self.image,
            "mask_image": self.mask,
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in self.seeds],
            "output_type": "pil",
        }
        return {name: value for name, value in inputs.items()
                if value is not None and accepts(name)}

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_seconds is None else self.submitted + self.timeout_seconds

    def cancel(self, reason: str = CANCELLED) -> bool:
        """Ask the job to stop (at its next step if running). True if this call stopped it."""
        if self.cancelled.is_set():
            return False
        self.stop_reason = reason
        self.cancelled.set()
        return True

    def check_deadline(self, now: float | None = None) -> bool:
        """Stop the job if its deadline has passed; True when it is (now) stopped."""
        deadline = self.deadline
        if deadline is not None and (time.monotonic() if now is None else now) > deadline:
            self.cancel(TIMEOUT)
        return self.cancelled.is_set()

    def stop_error(self, step: int | None = None) -> Exception:
        """The error a stopped job ends with; `step`: the last step it completed."""
        if self.stop_reason == TIMEOUT:
            return GenerationTimedOut(self.timeout_seconds, step)
        return GenerationCancelled(-1 if step is None else step - 1)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    seconds: float
    batch_size: int = 1  # the most requests that shared one of its denoising steps
