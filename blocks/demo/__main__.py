"""`python -m blocks.demo "a red circle" -o demo.png`: one image from the demo pipeline.

Not handled here: anything a real model needs (checkpoints, devices); see `blockserve generate`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from blocks.demo.modular_blocks import DemoAutoBlocks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blocks.demo",
                                     description="Run the weight-free demo pipeline.")
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", type=Path, default=Path("demo.png"))
    parser.add_argument("--steps", type=int, default=4, choices=range(1, 1001), metavar="1..1000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="64x64", help="WxH, e.g. 64x64")
    args = parser.parse_args(argv)
    try:
        width, height = (int(side) for side in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must look like 64x64, got {args.size!r}")
    if not (8 <= width <= 4096 and 8 <= height <= 4096):
        parser.error(f"--size sides must be in 8..4096, got {args.size!r}")
    pipe = DemoAutoBlocks().init_pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=args.prompt, num_inference_steps=args.steps, height=height, width=width,
                 generator=torch.Generator().manual_seed(args.seed), output="images")[0]
    image.save(args.output)
    print(f"wrote {args.output} ({width}x{height}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
