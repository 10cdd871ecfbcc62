"""The `blockserve` command line.

    blockserve demo "a red circle" -o out.png      run the built-in demo pipeline
    blockserve tiny-model sd OUT_DIR [--controlnet] [--depth] [--inpaint]
    blockserve tiny-model flux2-klein OUT_DIR [--base]

Argument errors exit with status 2 and a message naming the argument, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 64x64, got {text!r}") from None
    if not (8 <= width <= 4096 and 8 <= height <= 4096):
        raise argparse.ArgumentTypeError(f"size sides must be in 8..4096, got {text!r}")
    return width, height


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockserve", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the built-in pure-tensor demo pipeline")
    demo.add_argument("prompt")
    demo.add_argument("-o", "--output", type=Path, default=Path("demo.png"))
    demo.add_argument("--steps", type=_positive, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=_size, default=(64, 64), help="WxH, e.g. 64x64")

    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight checkpoint")
    tiny.add_argument("family", choices=["sd", "flux2-klein"])
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--base", action="store_true", help="flux2-klein: non-distilled variant")
    tiny.add_argument("--controlnet", action="store_true", help="sd: add a ControlNet")
    tiny.add_argument("--depth", action="store_true", help="sd: add a depth estimator")
    tiny.add_argument("--inpaint", action="store_true", help="sd: 9-channel inpainting UNet")
    return parser


def run_demo(args: argparse.Namespace) -> None:
    import torch

    from blocks.demo import DemoAutoBlocks

    pipe = DemoAutoBlocks().init_pipeline()
    width, height = args.size
    image = pipe(
        prompt=args.prompt,
        num_inference_steps=args.steps,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(args.seed),
        output="images",
    )[0]
    image.save(args.output)
    print(f"wrote {args.output} ({width}x{height}, seed {args.seed})")


def run_tiny_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.family == "flux2-klein":
        if args.controlnet or args.depth or args.inpaint:
            parser.error("--controlnet, --depth and --inpaint apply to the sd family only")
        from blocks.flux2.tiny_model import write_tiny_flux2_klein

        path = write_tiny_flux2_klein(args.out_dir, base=args.base, seed=args.seed)
    else:
        if args.base:
            parser.error("--base applies to the flux2-klein family only")
        from blocks.stable_diffusion.tiny_model import write_tiny_sd

        path = write_tiny_sd(
            args.out_dir,
            controlnet=args.controlnet,
            depth=args.depth,
            inpaint=args.inpaint,
            seed=args.seed,
        )
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args)
    elif args.command == "tiny-model":
        run_tiny_model(args, parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
