"""Prompt adherence of a shapes checkpoint: generate, read back, count what matches.

`evaluate_shapes` generates one image per prompt through blockserve's `ModularPipeline` (a
fixed seed per prompt, the checkpoint's default step count and guidance) and reads each with
`recipes.shapes.scoring`: is the background the asked-for colour, is the shape the asked-for
colour, is it the asked-for shape. Prompts are split into combinations seen in training and
held-out ones (`recipes.shapes.dataset.HELD_OUT_COMBINATIONS`); `format_report` prints the
table. It scores prompts of the dataset's form only.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from blocks.step_cache import cache_methods, cacheable_component, step_cache_config, step_caching
from recipes.shapes.dataset import (
    HELD_OUT_COMBINATIONS,
    Combination,
    caption,
    is_held_out,
    ring_combinations,
    training_combinations,
)
from recipes.shapes.scoring import ShapeReading, read_shape
from recipes.shapes.training import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS

DEFAULT_PROMPT_COUNT = 50
# What the committed checkpoint must reach (issue 11), per metric, over all prompts.
THRESHOLDS = {"colour": 0.9, "background": 0.9, "shape": 0.7}


def evaluation_combinations(count: int = DEFAULT_PROMPT_COUNT, seed: int = 0) -> list[Combination]:
    """`count` distinct combinations alternating held-out and seen (held-out first), so any
    prefix is balanced. Fixed by `seed`."""
    return _alternate(sorted(HELD_OUT_COMBINATIONS), training_combinations(), count, seed)


def ring_evaluation_combinations(count: int = 24, seed: int = 0) -> list[Combination]:
    """`count` ring prompts (the ring adapter's shape), alternating its 9 held-out and its
    trained colour pairs (held-out first), then trained ones. Fixed by `seed`."""
    return _alternate(ring_combinations(held_out=True), ring_combinations(held_out=False),
                      count, seed)


def _alternate(held_out: list[Combination], seen: list[Combination], count: int,
               seed: int) -> list[Combination]:
    rng = random.Random(seed)
    held_out, seen = list(held_out), list(seen)
    rng.shuffle(held_out)
    rng.shuffle(seen)
    mixed = [c for pair in zip(held_out, seen[: len(held_out)], strict=True) for c in pair]
    mixed += seen[len(held_out):]
    if count > len(mixed):
        raise ValueError(f"evaluation_combinations: count must be <= {len(mixed)}, got {count}")
    return mixed[:count]


@dataclass(frozen=True)
class PromptResult:
    combination: Combination
    held_out: bool
    reading: ShapeReading
    seconds: float  # the pipeline call, end to end
    image: Image.Image = field(repr=False, compare=False)

    @property
    def prompt(self) -> str:
        return caption(*self.combination)

    @property
    def correct(self) -> dict[str, bool]:
        shape, colour, background = self.combination
        return {
            "colour": self.reading.colour == colour,
            "background": self.reading.background == background,
            "shape": self.reading.shape == shape,
        }


@dataclass(frozen=True)
class ShapesReport:
    checkpoint: str
    steps: int
    guidance_scale: float
    results: list[PromptResult]
    step_cache: str = "off"  # the step caching the images were made with

    def accuracy(self, split: str = "all") -> dict[str, float]:
        """Share of correct readings per metric for "seen", "held_out" or "all" prompts."""
        rows = [r for r in self.results if split == "all" or r.held_out == (split == "held_out")]
        if not rows:
            return {metric: float("nan") for metric in THRESHOLDS}
        return {metric: sum(r.correct[metric] for r in rows) / len(rows) for metric in THRESHOLDS}

    def count(self, split: str = "all") -> int:
        return sum(1 for r in self.results if split == "all" or r.held_out == (split == "held_out"))

    @property
    def seconds_per_image(self) -> float:
        """Median pipeline time per image (the first call, which warms caches, included)."""
        times = sorted(r.seconds for r in self.results)
        return times[len(times) // 2]

    @property
    def passed(self) -> bool:
        overall = self.accuracy()
        return all(overall[metric] >= bound for metric, bound in THRESHOLDS.items())


def load_shapes_pipeline(checkpoint: str | Path) -> Any:
    """The checkpoint as a blockserve `ModularPipeline`, components loaded, on the CPU."""
    from blocks.pipeline import ModularPipeline

    pipe = ModularPipeline.from_pretrained(str(checkpoint))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate_shapes(
    checkpoint: str | Path,
    prompts: int | list[Combination] = DEFAULT_PROMPT_COUNT,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = 0,
    pipeline: Any = None,
    progress: bool = False,
    step_cache: Any = None,
) -> ShapesReport:
    """Generate and score one image per prompt.

    `prompts` is a count (see `evaluation_combinations`) or explicit (shape, colour,
    background) combinations. Prompt i uses `torch.Generator().manual_seed(seed + i)`.
    `pipeline` reuses an already loaded pipeline for `checkpoint`. `progress` draws a
    progress bar with the time left on stderr. `step_cache`: a step-cache method or
    `{method, ...params}` for the UNet (`blocks.step_cache`; None or "off": none).
    """
    from tqdm.auto import tqdm

    combos = evaluation_combinations(prompts) if isinstance(prompts, int) else list(prompts)
    pipe = pipeline if pipeline is not None else load_shapes_pipeline(checkpoint)
    results = []
    bar = tqdm(combos, desc="eval-shapes", unit="prompt", disable=not progress,
               dynamic_ncols=True)
    denoiser = cacheable_component(pipe.components)
    config = step_cache_config(step_cache, "step_cache", cache_methods(denoiser))
    for i, combo in enumerate(bar):
        generator = torch.Generator().manual_seed(seed + i)
        start = time.perf_counter()
        with step_caching(denoiser, config, total=steps):
            image = pipe(
                prompt=caption(*combo),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output="images",
            )[0]
        seconds = time.perf_counter() - start
        results.append(
            PromptResult(combo, is_held_out(combo), read_shape(image), seconds, image)
        )
    return ShapesReport(str(checkpoint), steps, guidance_scale, results,
                        "off" if config is None else str(config))


def format_report(report: ShapesReport, per_prompt: bool = False) -> str:
    """A plain-text table: accuracy per metric for seen, held-out and all prompts."""
    lines = [
        f"checkpoint {report.checkpoint}: {len(report.results)} prompts, "
        f"{report.steps} steps, guidance {report.guidance_scale:g}, "
        f"step cache {report.step_cache}, "
        f"{report.seconds_per_image * 1000:.0f} ms/image (median)",
        f"{'split':<10}{'prompts':>8}{'colour':>9}{'background':>12}{'shape':>8}",
    ]
    for split in ("seen", "held_out", "all"):
        acc = report.accuracy(split)
        lines.append(
            f"{split:<10}{report.count(split):>8}{acc['colour']:>9.0%}"
            f"{acc['background']:>12.0%}{acc['shape']:>8.0%}"
        )
    bounds = ", ".join(f"{m} >= {b:.0%}" for m, b in THRESHOLDS.items())
    lines.append(f"targets (all prompts): {bounds} -> {'PASS' if report.passed else 'FAIL'}")
    if per_prompt:
        lines.append("")
        for r in report.results:
            got = f"{r.reading.colour} {r.reading.shape} on {r.reading.background}"
            mark = "held-out" if r.held_out else "seen"
            lines.append(f"{mark:<9} {r.prompt:<45} -> {got}")
    return "\n".join(lines)


def render_grid(results: list[PromptResult], columns: int = 8, scale: int = 2) -> Image.Image:
    """Generated images in a grid, each labelled with its prompt (held-out ones marked *)
    and, in red, what the scorer read where that differs."""
    from PIL import ImageDraw, ImageFont

    tile = 64 * scale
    label_height = 48
    rows = -(-len(results) // columns)
    grid = Image.new("RGB", (columns * tile, rows * (tile + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=13)
    for i, result in enumerate(results):
        x, y = (i % columns) * tile, (i // columns) * (tile + label_height)
        grid.paste(result.image.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        shape, colour, background = result.combination
        marker = "*" if result.held_out else ""
        draw.text((x + 3, y + tile + 2), f"{colour} {shape}{marker}", fill="black", font=font)
        draw.text((x + 3, y + tile + 16), f"on {background}", fill="black", font=font)
        reading = result.reading
        if not all(result.correct.values()):
            read = f"read: {reading.colour} {reading.shape}"
            draw.text((x + 3, y + tile + 30), read, fill=(200, 0, 0), font=font)
    return grid
