"""Benchmark: what step caching saves, and what it costs in image quality.

For the trained shapes model (SD, `deepcache`) and the random-weight tiny FLUX.2 [klein]
(`fbcache`, `teacache`), every image is made uncached and with each cache setting, interleaved
per prompt (the order rotates from prompt to prompt), with one torch thread. Per setting it
prints:

- denoiser ms/image: time inside the denoiser's calls (probes and sub-forwards included);
- denoise x / e2e x: the uncached time over the cached one, the median of the per-prompt
  ratios (a burst of load from elsewhere hits one prompt's pair, not a setting);
- cached: the share of denoiser forwards whose deep part was skipped;
- quality against each image's uncached twin: PSNR (dB) and SSIM (7x7 window, RGB mean);
  for the shapes model also the evaluation's colour / background / shape accuracy
  (`blocks.shapes.evaluation`, targets colour >= 90%, background >= 90%, shape >= 70%).

`--fit-teacache` first fits teacache's rescaling polynomial for the FLUX.2 transformer, from
uncached runs on their own seeds: x = relative L1 change of the first block's modulated input
between consecutive steps, y = that of the transformer's output; a degree-4 least-squares fit
(numpy.polyfit), printed, then used by the teacache settings. Deterministic: the same seeds and
software give the same coefficients.

    python bench/step_cache.py [--prompts 50] [--flux-prompts 8] [--steps 20] [--fit-teacache]
        [--only shapes|flux]

Not measured here: the service (its step scheduler runs the same hooks per request), GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blocks import ModularPipeline  # noqa: E402
from blocks.step_cache import cacheable_component, step_caching  # noqa: E402

SHAPES_SETTINGS: list[dict[str, Any]] = [
    {"method": "deepcache", "interval": 2, "branch": 1},
    {"method": "deepcache", "interval": 3, "branch": 1},
    {"method": "deepcache", "interval": 5, "branch": 1},
    {"method": "deepcache", "interval": 3, "branch": 2},
]
FLUX_SETTINGS: list[dict[str, Any]] = [
    {"method": "fbcache", "threshold": 0.1},
    {"method": "fbcache", "threshold": 0.3},
    {"method": "fbcache", "threshold": 0.6},
    {"method": "teacache", "threshold": 0.1},
    {"method": "teacache", "threshold": 0.3},
    {"method": "teacache", "threshold": 0.6},
]
FLUX_PROMPTS = ["a red circle", "a blue square on white", "a green triangle", "a cat",
                "a mountain lake at dawn", "two yellow stars", "a black dog", "an old car"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean SSIM of two (H, W, 3) uint8 images: uniform window, per channel, then averaged."""
    x = torch.from_numpy(a).double().permute(2, 0, 1)[:, None]  # (3, 1, H, W)
    y = torch.from_numpy(b).double().permute(2, 0, 1)[:, None]

    def mean(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(t, window, stride=1)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = mean(x), mean(y)
    # Sample (co)variances, as skimage computes them.
    n = window * window / (window * window - 1)
    vx, vy = n * (mean(x * x) - mx * mx), n * (mean(y * y) - my * my)
    cov = n * (mean(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


@dataclass
class Tally:
    """One setting's measurements over the prompts."""

    denoise: list[float] = field(default_factory=list)  # seconds per image
    total: list[float] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    full: int = 0
    cached: int = 0


class DenoiserClock:
    """Seconds spent inside `model`'s calls (hooks around its `__call__`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._start = 0.0
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._leave)

    def _enter(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._start


def load(path: Path) -> ModularPipeline:
    pipe = ModularPipeline.from_pretrained(str(path))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(pipe: ModularPipeline, settings: list[dict[str, Any] | None], prompts: list[str],
            steps: int, make: Callable[[str, int], np.ndarray]) -> list[Tally]:
    """Every prompt with every setting (None: uncached), interleaved with a rotating order."""
    denoiser = cacheable_component(pipe.components)
    clock = DenoiserClock(denoiser)
    tallies = [Tally() for _ in settings]
    make(prompts[0], 0)  # warm-up
    for i, prompt in enumerate(prompts):
        order = list(range(len(settings)))
        order = order[i % len(order):] + order[:i % len(order)]
        for k in order:
            clock.seconds = 0.0
            start = time.perf_counter()
            with step_caching(denoiser, settings[k], total=steps) as cache:
                image = make(prompt, i)
            tallies[k].total.append(time.perf_counter() - start)
            tallies[k].denoise.append(clock.seconds)
            tallies[k].images.append(image)
            if cache is not None:
                tallies[k].full += cache.full
                tallies[k].cached += cache.cached
        print(f"  prompt {i + 1}/{len(prompts)}", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return tallies


def ratio(base: list[float], other: list[float]) -> float:
    return statistics.median(b / o for b, o in zip(base, other, strict=True))


def describe(setting: dict[str, Any] | None) -> str:
    if setting is None:
        return "off"
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in setting.items() if k not in ("method", "coefficients"))
    return f"{setting['method']}({params})"


def report(settings: list[dict[str, Any] | None], tallies: list[Tally],
           extra: Callable[[int], str] | None = None, extra_header: str = "") -> None:
    base = tallies[0]
    print(f"{'setting':<34}{'denoiser ms':>12}{'denoise x':>10}{'e2e x':>7}{'cached':>8}"
          f"{'PSNR dB':>9}{'SSIM':>7}{extra_header}")
    for k, (setting, tally) in enumerate(zip(settings, tallies, strict=True)):
        forwards = tally.full + tally.cached
        cached = f"{tally.cached / forwards:.0%}" if forwards else "-"
        if k == 0:
            quality = f"{'-':>9}{'-':>7}"
        else:
            p = statistics.mean(min(psnr(a, b), 99.0)
                                for a, b in zip(tally.images, base.images, strict=True))
            s = statistics.mean(ssim(a, b) for a, b in zip(tally.images, base.images,
                                                           strict=True))
            quality = f"{p:>9.1f}{s:>7.3f}"
        print(f"{describe(setting):<34}{statistics.median(tally.denoise) * 1000:>12.0f}"
              f"{ratio(base.denoise, tally.denoise):>10.2f}"
              f"{ratio(base.total, tally.total):>7.2f}{cached:>8}{quality}"
              f"{extra(k) if extra else ''}")


def bench_shapes(args: argparse.Namespace) -> None:
    from blocks.shapes.dataset import HELD_OUT_COMBINATIONS, caption
    from blocks.shapes.evaluation import (
        DEFAULT_GUIDANCE_SCALE,
        THRESHOLDS,
        PromptResult,
        ShapesReport,
        evaluation_combinations,
    )
    from blocks.shapes.scoring import read_shape

    combos = evaluation_combinations(args.prompts)
    pipe = load(ROOT / "assets" / "tiny-shapes-sd")
    settings: list[dict[str, Any] | None] = [None, *SHAPES_SETTINGS]

    def make(prompt: str, i: int) -> np.ndarray:
        image = pipe(prompt=prompt, num_inference_steps=args.steps,
                     guidance_scale=DEFAULT_GUIDANCE_SCALE,
                     generator=torch.Generator().manual_seed(i), output="images")[0]
        return np.array(image)

    print(f"\nshapes SD (assets/tiny-shapes-sd), {len(combos)} evaluation prompts, "
          f"{args.steps} steps, guidance {DEFAULT_GUIDANCE_SCALE:g}, 64x64")
    tallies = measure(pipe, settings, [caption(*c) for c in combos], args.steps, make)
    from PIL import Image

    reports = [ShapesReport("", args.steps, DEFAULT_GUIDANCE_SCALE, [
        PromptResult(c, c in HELD_OUT_COMBINATIONS, read_shape(Image.fromarray(img)), 0.0,
                     Image.fromarray(img))
        for c, img in zip(combos, tally.images, strict=True)]) for tally in tallies]

    def accuracy(k: int) -> str:
        acc = reports[k].accuracy("all")
        return (f"{acc['colour']:>8.0%}{acc['background']:>6.0%}{acc['shape']:>7.0%}"
                f"{'  PASS' if reports[k].passed else '  FAIL'}")

    report(settings, tallies, accuracy, f"{'colour':>8}{'bg':>6}{'shape':>7}")
    print("targets: " + ", ".join(f"{m} >= {b:.0%}" for m, b in THRESHOLDS.items()))


def fit_teacache(pipe: ModularPipeline, steps: int, prompts: list[str]) -> list[float]:
    """Degree-4 fit of the output's relative L1 change on the modulated input's (module
    docstring), from uncached runs with seeds 1000 + i."""
    from blocks.flux2.step_cache import modulated_input
    from blocks.step_cache.state import relative_l1

    transformer = pipe.transformer
    first = transformer.transformer_blocks[0]
    seen: dict[str, list[torch.Tensor]] = {"x": [], "y": []}

    def on_first(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen["x"].append(modulated_input(first, kwargs["hidden_states"],
                                         kwargs["temb_mod_img"]).detach())

    def on_output(_module: Any, _args: Any, output: Any) -> None:
        seen["y"].append(output[0].detach())

    handles = [first.register_forward_pre_hook(on_first, with_kwargs=True),
               transformer.register_forward_hook(on_output)]
    xs, ys = [], []
    try:
        for i, prompt in enumerate(prompts):
            seen["x"].clear()
            seen["y"].clear()
            pipe(prompt=prompt, num_inference_steps=steps, height=64, width=64,
                 generator=torch.Generator().manual_seed(1000 + i), output="images")
            for t in range(1, len(seen["x"])):
                xs.append(relative_l1(seen["x"][t], seen["x"][t - 1]))
                ys.append(relative_l1(seen["y"][t], seen["y"][t - 1]))
    finally:
        for handle in handles:
            handle.remove()
    coefficients = np.polyfit(np.array(xs), np.array(ys), 4)
    return [float(c) for c in coefficients]


def bench_flux(args: argparse.Namespace) -> None:
    from blocks.flux2.tiny_model import write_tiny_flux2_klein

    prompts = (FLUX_PROMPTS * ((args.flux_prompts + len(FLUX_PROMPTS) - 1)
                               // len(FLUX_PROMPTS)))[:args.flux_prompts]
    with tempfile.TemporaryDirectory() as folder:
        pipe = load(write_tiny_flux2_klein(Path(folder) / "klein"))
        run_flux(args, pipe, prompts)


def run_flux(args: argparse.Namespace, pipe: ModularPipeline, prompts: list[str]) -> None:
    settings: list[dict[str, Any] | None] = [None, *FLUX_SETTINGS]
    if args.fit_teacache:
        coefficients = fit_teacache(pipe, args.steps, prompts)
        print(f"\nteacache rescaling fit (FLUX.2 klein tiny, {len(prompts)} prompts, seeds "
              f"1000+, {args.steps} steps): coefficients "
              f"[{', '.join(f'{c:.6g}' for c in coefficients)}]")
        settings = [s if s is None or s["method"] != "teacache"
                    else {**s, "coefficients": coefficients} for s in settings]

    def make(prompt: str, i: int) -> np.ndarray:
        image = pipe(prompt=prompt, num_inference_steps=args.steps, height=64, width=64,
                     generator=torch.Generator().manual_seed(i), output="images")[0]
        return np.array(image)

    fitted = " (teacache: fitted coefficients)" if args.fit_teacache else \
        " (teacache: identity rescaling)"
    print(f"\nFLUX.2 klein (random-weight tiny), {len(prompts)} prompts, {args.steps} steps, "
          f"64x64{fitted}")
    report(settings, measure(pipe, settings, prompts, args.steps, make))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=50, help="shapes evaluation prompts")
    parser.add_argument("--flux-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fit-teacache", action="store_true")
    parser.add_argument("--only", choices=["shapes", "flux"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    with torch.no_grad():
        if args.only in (None, "shapes"):
            bench_shapes(args)
        if args.only in (None, "flux"):
            bench_flux(args)


if __name__ == "__main__":
    main()
