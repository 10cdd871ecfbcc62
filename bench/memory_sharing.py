"""Benchmark: three pipelines on one checkpoint, sharing weights vs. loading them independently.

Builds the text-to-image, image-to-image and inpaint pipelines of one Stable Diffusion
checkpoint (each from its workflow's blocks) twice, each time in a fresh process:

- shared: one `ComponentsManager`, so each model is loaded once and handed to all three;
- independent: no manager, so every pipeline loads its own copy, as diffusers does.

Prints bytes held by distinct model tensors, the peak RSS growth over the import baseline and
the time `load_components` took (the shared pipelines after the first take the first one's
objects without reading anything) for both, and the shared/independent ratios. Goal: bytes
ratio <= 0.4.

    python bench/memory_sharing.py [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKFLOWS = ("text2image", "image2image", "inpaint")


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(mode: str, checkpoint: str) -> dict[str, int]:
    """Run in a fresh process: load the three pipelines and report memory."""
    import torch

    from blocks import ComponentsManager, ModularPipeline
    from blocks.stable_diffusion import StableDiffusionAutoBlocks

    baseline = _rss_peak_bytes()
    manager = ComponentsManager() if mode == "shared" else None
    pipes = []
    load_seconds = 0.0
    for workflow in WORKFLOWS:
        blocks = StableDiffusionAutoBlocks().get_workflow(workflow)
        pipe = ModularPipeline(
            blocks, checkpoint, components_manager=manager, collection=workflow
        )
        start = time.perf_counter()
        pipe.load_components(dtype=torch.float32, strict=True)
        load_seconds += time.perf_counter() - start
        pipes.append(pipe)
    tensors = {}
    for pipe in pipes:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in component.state_dict().values():
                    tensors[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return {"bytes_held": sum(tensors.values()), "rss_growth": _rss_peak_bytes() - baseline,
            "load_seconds": load_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="SD checkpoint folder (default: a tiny one)")
    parser.add_argument("--measure", choices=["shared", "independent"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    if args.measure:
        print(json.dumps(measure(args.measure, args.checkpoint)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from blocks.stable_diffusion.tiny_model import write_tiny_sd

            checkpoint = str(write_tiny_sd(Path(tmp) / "sd"))
        results = {}
        for mode in ("independent", "shared"):
            out = subprocess.run(
                [sys.executable, __file__, "--measure", mode, "--checkpoint", checkpoint],
                check=True, capture_output=True, text=True,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1024 * 1024
    print(f"three pipelines ({', '.join(WORKFLOWS)}) on {checkpoint}")
    print(f"{'':14}{'bytes held':>14}{'peak RSS growth':>18}{'load time':>12}")
    for mode, row in results.items():
        print(f"{mode:14}{row['bytes_held'] / mib:>11.2f} MiB{row['rss_growth'] / mib:>15.2f} MiB"
              f"{row['load_seconds']:>10.3f} s")
    shared, alone = results["shared"], results["independent"]
    print(f"{'ratio':14}{shared['bytes_held'] / alone['bytes_held']:>14.3f}"
          f"{shared['rss_growth'] / max(alone['rss_growth'], 1):>18.3f}"
          f"{shared['load_seconds'] / alone['load_seconds']:>12.3f}   (goal: bytes <= 0.4)")


if __name__ == "__main__":
    main()
