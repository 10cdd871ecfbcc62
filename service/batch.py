"""Running compatible jobs as one pipeline call, so that no job can tell it had company.

`run_batch(model, jobs)` calls the pipeline once with lists: one prompt (and negative prompt)
per job, or per image when the jobs ask for different `n`, and one CPU generator per image
seeded `seed + i` — so every image draws the same noise batched or alone. The images come back
in job order and are split per job.

Per-job stopping happens in the step callback: a member that is cancelled or past its deadline
stops receiving progress and gets its stop error, while its batch-mates run on (its rows are
still computed, then dropped); when every member has stopped, the callback stops the call.
A pipeline error fails the whole call: the engine, not this module, decides what to retry.

The same noise is not enough for the same pixels: CPU kernels pick code paths by batch size
(oneDNN convolutions, MKL's small GEMMs, the scalar remainder of SIMD loops), which moves
values by ~1e-6 and flips about one 8-bit pixel value in 10^4. So a CPU model's call runs
under `blocks.batch_invariance.batch_invariant()`, alone or batched, and every image is
bit-identical either way. The price: a little time per op, and pixels that can differ from
diffusers' default kernels by one level in rare places (the library itself, outside the
service, keeps diffusers' kernels and pixels exactly). CUDA kernels are not covered: on a GPU
a model that must be bit-exact sets `max_batch_size: 1`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blocks import GenerationCancelled
from blocks.batch_invariance import batch_invariant
from blocks.lora import adapters_for_call
from blocks.step_cache import cacheable_component, step_caching
from service.jobs import GenerationJob, GenerationResult
from service.latent_rgb import factors_for
from service.registry import LoadedModel

# (the jobs of the batch, the 0-based step just finished); may raise to fail the call.
StepHook = Callable[[Sequence[GenerationJob], int], None]


@dataclass
class _Member:
    job: GenerationJob
    offset: int  # its first image's row in the batch
    error: Exception | None = None  # set when it stopped early
    last_step: int = 0


def batch_inputs(model: LoadedModel, jobs: Sequence[GenerationJob]) -> dict[str, Any]:
    """The pipeline call's keyword arguments for `jobs` (equal `batch_key`s), None left out."""
    first = jobs[0]
    same_n = all(job.n == first.n for job in jobs)
    # Equal n: one prompt per job, n images each; else one prompt per image, one image each.
    repeats = [1 if same_n else job.n for job in jobs]
    prompts = [job.prompt for job, r in zip(jobs, repeats, strict=True) for _ in range(r)]
    negatives = None
    if first.negative_prompt is not None:
        negatives = [job.negative_prompt for job, r in zip(jobs, repeats, strict=True)
                     for _ in range(r)]
    inputs: dict[str, Any] = {
        "prompt": prompts,
        "negative_prompt": negatives,
        "num_images_per_prompt": first.n if same_n else 1,
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance_scale,
        "height": first.height,
        "width": first.width,
        "strength": first.strength,
        "image": first.image,  # edits run alone (see GenerationJob.batch_key)
        "mask_image": first.mask,
        # One CPU generator per image: image i is the same alone or in any batch, on any device.
        "generator": [torch.Generator("cpu").manual_seed(seed)
                      for job in jobs for seed in job.seeds],
        "output_type": "pil",
    }
    return {name: value for name, value in inputs.items()
            if value is not None and model.accepts(name)}


def run_batch(
    model: LoadedModel,
    jobs: Sequence[GenerationJob],
    step_hook: StepHook | None = None,
    worker: int = 0,
) -> list[GenerationResult | Exception]:
    """Run `jobs` (equal `batch_key`s) in one pipeline call, in this thread, on engine
    worker `worker`'s pipeline.

    Returns each job's result, or the error it stopped with (cancelled, timed out). Raises
    what the pipeline raised when the call itself failed."""
    members, offset = [], 0
    for job in jobs:
        members.append(_Member(job, offset))
        offset += job.n
    total_images = offset
    preview_map = None  # fitted on the model's VAE on the first preview (then cached)

    def on_step_end(step: int, _timestep: Any, block_state: Any) -> bool:
        nonlocal preview_map
        timesteps = block_state.get("timesteps")
        total = len(timesteps) if timesteps is not None else jobs[0].steps
        if step_hook is not None:
            step_hook(jobs, step)
        now = time.monotonic()
        latents = None
        running = False
        for member in members:
            if member.error is not None:
                continue
            job = member.job
            if job.check_deadline(now):
                member.error = job.stop_error(member.last_step)
                continue
            running = True
            member.last_step = step + 1
            if job.listener is None:
                continue
            previews = None
            if job.wants_preview is not None and job.wants_preview(step + 1, total):
                if latents is None:
                    # The scheduler's estimate of the clean latents where it gives one: the
                    # noisy latents still look like noise until late in the run.
                    latents = block_state.get("denoised")
                    if latents is None:
                        latents = block_state.get("latents")
                    preview_map = factors_for(model)
                if (preview_map is not None and isinstance(latents, torch.Tensor)
                        and latents.shape[0] == total_images):
                    previews = preview_map.images(
                        latents[member.offset : member.offset + job.n])
            job.listener.progress(step + 1, total, previews)
        return not running  # True stops the call: every member has stopped

    pipe = model.pipeline(jobs[0].scheduler, worker)
    step_cache = jobs[0].step_cache  # one job: see GenerationJob.batch_key
    caching = (contextlib.nullcontext() if step_cache is None else
               step_caching(cacheable_component(pipe.components), step_cache,
                            None if jobs[0].strength is not None else jobs[0].steps))
    loras = dict(jobs[0].loras)  # equal for the batch (`batch_key`)
    start = time.perf_counter()
    try:
        with model.using_loras(list(loras)), adapters_for_call(loras), \
                batch_invariant(pipe.device), caching:
            images = pipe(**batch_inputs(model, jobs), output="images",
                          callback_on_step_end=on_step_end)
    except GenerationCancelled:
        if all(member.error is not None for member in members):
            return [member.error for member in members]  # type: ignore[misc]
        raise
    seconds = time.perf_counter() - start
    if len(images) != total_images:
        raise RuntimeError(f"model {model.name!r} returned {len(images)} images for a batch "
                           f"of {total_images}")
    outcomes: list[GenerationResult | Exception] = []
    for member in members:
        job = member.job
        # A job stopped after its last step (while decoding) is done: it keeps its images.
        if member.error is not None:
            outcomes.append(member.error)
        else:
            own = list(images[member.offset : member.offset + job.n])
            outcomes.append(GenerationResult(own, job.seeds, seconds, total_images))
    return outcomes


def run_job(model: LoadedModel, job: GenerationJob) -> GenerationResult:
    """Run one job alone in this thread; raises its error (e.g. `GenerationCancelled`)."""
    if job.cancelled.is_set():
        raise job.stop_error()
    outcome = run_batch(model, [job])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
