"""Benchmark: what the block framework costs per call, against diffusers on the same checkpoint.

Times blockserve's pipeline, diffusers' classic pipeline and (for FLUX.2, where diffusers has
one) diffusers' modular pipeline on the same tiny checkpoint, interleaved (A, B, C, A, B, C,
... with the order rotated every round so no runner always goes first), after warm-up. Prints
median seconds per call, the ratios to diffusers-classic, and the max abs difference of the
images so the comparison is known to be like for like. Goal: blockserve / classic <= 1.03.

    python bench/overhead.py --family flux2-klein|sd [--runs 20] [--steps 4] [--size 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

PROMPT = "a serene landscape at sunset"


def build_runners(family: str, checkpoint: Path, steps: int, size: int) -> dict[str, Callable]:
    """name -> a function producing the images (np) for one seeded call."""
    from blocks import ModularPipeline

    ours = ModularPipeline.from_pretrained(str(checkpoint))
    ours.load_components(dtype=torch.float32, strict=True)
    ours.set_progress_bar_config(disable=True)
    common = dict(prompt=PROMPT, num_inference_steps=steps, height=size, width=size,
                  output_type="np")

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    runners: dict[str, Callable] = {
        "blockserve": lambda: ours(**common, generator=seeded(), output="images"),
    }
    if family == "flux2-klein":
        from diffusers import Flux2KleinPipeline
        from diffusers.modular_pipelines import Flux2KleinAutoBlocks as DiffusersKleinBlocks

        classic = Flux2KleinPipeline.from_pretrained(str(checkpoint), torch_dtype=torch.float32)
        modular = DiffusersKleinBlocks().init_pipeline(str(checkpoint))
        modular.load_components(torch_dtype=torch.float32)
        modular.set_progress_bar_config(disable=True)
        runners["diffusers-modular"] = lambda: modular(
            **common, generator=seeded(), output="images"
        )
    else:
        from diffusers import StableDiffusionPipeline

        classic = StableDiffusionPipeline.from_pretrained(str(checkpoint),
                                                          torch_dtype=torch.float32)
    classic.set_progress_bar_config(disable=True)
    runners["diffusers-classic"] = lambda: classic(**common, generator=seeded()).images
    return runners


def write_checkpoint(family: str, folder: Path) -> Path:
    if family == "flux2-klein":
        from blocks.flux2.tiny_model import write_tiny_flux2_klein

        return write_tiny_flux2_klein(folder / "flux2-klein")
    from blocks.stable_diffusion.tiny_model import write_tiny_sd

    return write_tiny_sd(folder / "sd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["flux2-klein", "sd"], required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    import diffusers
    import transformers

    # Keep the output to the table: no load bars, no "guidance is ignored" notices.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(args.family, Path(tmp))
        runners = build_runners(args.family, checkpoint, args.steps, args.size)
        names = list(runners)
        outputs = {name: np.asarray(runners[name]()) for name in names}
        for _ in range(args.warmup):
            for name in names:
                runners[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.runs):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                runners[name]()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["diffusers-classic"])
    print(f"family {args.family}: {args.runs} interleaved runs each after {args.warmup} warm-up, "
          f"{args.steps} steps, {args.size}x{args.size}, torch threads {torch.get_num_threads()}")
    print(f"{'runner':20}{'median s':>10}{'ratio':>8}{'max |img - classic|':>22}")
    for name in names:
        median = statistics.median(times[name])
        diff = float(np.abs(outputs[name] - outputs["diffusers-classic"]).max())
        print(f"{name:20}{median:>10.4f}{median / base:>8.3f}{diff:>22.2e}")


if __name__ == "__main__":
    main()
