"""Benchmark: serving several LoRA adapters at once, at the denoiser forward.

`--concurrency` requests (default 16) are in flight, each using one of `--adapters` adapters
(default 4, rank `--rank` 8 on the attention projections) or none, round robin. One denoising
step of all of them is made four ways, interleaved (the order rotates every round), on the
same model:

- `base`: one forward of every row, no adapters (the floor);
- `mixed`: one forward of every row, each row with its own adapter's low-rank delta
  (`blocks.lora.adapters_per_sample`: what step-level batching of mixed requests runs);
- `per adapter`: one forward per adapter set, its rows only, the delta for the whole call
  (`adapters_for_call`: a server that batches only requests with the same adapters);
- `merge+swap`: per adapter set, the adapter fused into the weights, a forward of its rows,
  unfused (how a server without per-sample deltas switches adapters).

Prints the median seconds per step of all requests and, per round, the ratios: throughput of
`mixed` over `per adapter` and `merge+swap` (goal >= 1.5x over per adapter), and the cost of
the per-sample deltas over `base` (goal <= 15% at rank 8). Computed under the batch-invariant
kernels the CPU server uses (`--default-kernels` to drop them), with one torch thread by
default; it also checks that each row of `mixed` has the bits of the same row in `per adapter`.

    python bench/lora_batching.py [--model shapes-sd|mid-unet|flux2-klein] [--rounds 7] [--rank 8]
        [--adapters 4] [--concurrency 16] [--threads 1] [--default-kernels]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blocks.batch_invariance import batch_invariant  # noqa: E402
from blocks.lora import LoraFile, adapters_for_call, adapters_per_sample, model_loras, parse_lora  # noqa: E402
from blocks.lora.tiny_lora import random_lora  # noqa: E402

Forward = Callable[[list[int]], torch.Tensor]  # rows -> the model's output for those rows


def shapes_unet(rows: int, folder: Path) -> tuple[torch.nn.Module, str, Forward]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(ROOT / "assets" / "tiny-shapes-sd",
                                                subfolder="unet")
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    size = config.sample_size
    sample = torch.randn(rows, config.in_channels, size, size, generator=generator)
    hidden = torch.randn(rows, 16, config.cross_attention_dim, generator=generator)
    timestep = torch.full((rows,), 500)

    def forward(chosen: list[int]) -> torch.Tensor:
        return unet(sample[chosen], timestep[chosen], hidden[chosen], return_dict=False)[0]

    return unet, "unet", forward


def mid_unet(rows: int, folder: Path) -> tuple[torch.nn.Module, str, Forward]:
    """A random-weight SD-style UNet between the tiny ones and SD 1.5 (128-256 channels,
    32x32 latents), where GEMMs, not per-op overhead, dominate a forward."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(128, 256), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=256,
        attention_head_dim=8, norm_num_groups=32)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, 4, 32, 32, generator=generator)
    hidden = torch.randn(rows, 16, 256, generator=generator)
    timestep = torch.full((rows,), 500)

    def forward(chosen: list[int]) -> torch.Tensor:
        return unet(sample[chosen], timestep[chosen], hidden[chosen], return_dict=False)[0]

    return unet, "unet", forward


def flux2_transformer(rows: int, folder: Path) -> tuple[torch.nn.Module, str, Forward]:
    from diffusers import Flux2Transformer2DModel

    from blocks.flux2.tiny_model import write_tiny_flux2_klein

    path = write_tiny_flux2_klein(folder / "klein")
    transformer = Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer")
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    side = 8  # an 8x8 grid of latent tokens
    latents = torch.randn(rows, side * side, config.in_channels, generator=generator)
    text = torch.randn(rows, 16, config.joint_attention_dim, generator=generator)
    image_ids = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(side),
                                           torch.arange(side), torch.arange(1), indexing="ij"),
                            -1).reshape(side * side, 4)
    text_ids = torch.zeros(16, 4)
    text_ids[:, 3] = torch.arange(16)

    def forward(chosen: list[int]) -> torch.Tensor:
        return transformer(hidden_states=latents[chosen], encoder_hidden_states=text[chosen],
                           timestep=torch.full((len(chosen),), 0.5), img_ids=image_ids,
                           txt_ids=text_ids, guidance=None, return_dict=False)[0]

    return transformer, "transformer", forward


MODELS = {"shapes-sd": shapes_unet, "mid-unet": mid_unet, "flux2-klein": flux2_transformer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="shapes-sd")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--default-kernels", action="store_true",
                        help="diffusers' default CPU kernels instead of the batch-invariant ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        model, component, forward = MODELS[args.model](args.concurrency, Path(folder))
    model.eval()
    loras = model_loras(model, component, create=True)
    names = [f"lora{k}" for k in range(args.adapters)]
    for seed, name in enumerate(names):
        tensors, metadata = random_lora({component: model}, rank=args.rank, seed=seed)
        loras.add(name, parse_lora(LoraFile(tensors, metadata, name), {component: model})
                  [component])
    choices = [None, *names]
    per_row = [choices[i % len(choices)] for i in range(args.concurrency)]  # None: no adapter
    sets = [{name: 1.0} if name else {} for name in per_row]
    groups = {choice: [i for i, c in enumerate(per_row) if c == choice] for choice in choices}
    every = list(range(args.concurrency))

    def base() -> torch.Tensor:
        with adapters_for_call({}):
            return forward(every)

    def mixed() -> torch.Tensor:
        with adapters_per_sample(sets):
            return forward(every)

    def per_adapter() -> torch.Tensor:
        out = torch.empty_like(base_out)
        for choice, rows in groups.items():
            with adapters_for_call({choice: 1.0} if choice else {}):
                out[rows] = forward(rows)
        return out

    def merge_swap() -> torch.Tensor:
        out = torch.empty_like(base_out)
        for choice, rows in groups.items():
            if choice:
                loras.fuse({choice: 1.0})
            try:
                with adapters_for_call({}):
                    out[rows] = forward(rows)
            finally:
                loras.unfuse()
        return out

    ways = {"base": base, "mixed": mixed, "per adapter": per_adapter, "merge+swap": merge_swap}
    kernels = contextlib.nullcontext() if args.default_kernels else batch_invariant()
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    with torch.inference_mode(), kernels:
        base_out = base()
        outputs = {way: run() for way, run in ways.items()}  # warm-up, and the bits
        for round_ in range(args.rounds):
            order = list(ways)[round_ % len(ways):] + list(ways)[:round_ % len(ways)]
            for way in order:
                start = time.perf_counter()
                ways[way]()
                seconds[way].append(time.perf_counter() - start)

    sizes = ", ".join(str(len(rows)) for rows in groups.values())
    print(f"{args.model}: {args.concurrency} requests, {args.adapters} adapters of rank "
          f"{args.rank} or none, round robin (rows per set: {sizes}); {args.threads} torch "
          "thread(s), "
          f"{'default' if args.default_kernels else 'batch-invariant'} kernels, "
          f"{args.rounds} interleaved rounds")
    for way in ways:
        print(f"  {way:12s} {statistics.median(seconds[way]) * 1000:8.1f} ms per step of all "
              "requests (median)")

    def ratio(numerator: str, denominator: str) -> float:
        return statistics.median(n / d for n, d in zip(seconds[numerator], seconds[denominator],
                                                       strict=True))

    print(f"  mixed throughput / per adapter   {ratio('per adapter', 'mixed'):.2f}x "
          "(goal >= 1.5x; median of per-round ratios)")
    print(f"  mixed throughput / merge+swap    {ratio('merge+swap', 'mixed'):.2f}x")
    print(f"  per-sample deltas over base      {(ratio('mixed', 'base') - 1) * 100:+.1f}% "
          "(goal <= +15%)")
    same = all(torch.equal(outputs["mixed"][i], outputs["per adapter"][i]) for i in every)
    print(f"  mixed rows bit-identical to per-adapter rows: {same}")


if __name__ == "__main__":
    main()
