"""Trains the "ring" LoRA: an adapter that teaches the shapes model a shape it never saw.

The base model (`assets/tiny-shapes-sd`) draws circles, squares, triangles and stars. This
adapter teaches it rings ("a red ring on a blue background": a disc with a hole of the
background colour, `recipes.shapes.dataset`), which the scorer tells apart by the hole
(`recipes.shapes.scoring`). It is a plain LoRA, trained with blockserve's own LoRA layers
(`blocks.lora`) on the frozen base model and written in diffusers' layout, so diffusers'
`load_lora_weights` reads it too:

- rank 8 on the UNet's transformer blocks (attention, feed-forward, proj_in/proj_out) and on
  the text encoder's attention and MLP (the word "ring" is new to it);
- each batch half rings (10% of the colour pairs held out for evaluation) and half the base
  dataset's shapes, so the adapter adds rings without unlearning the rest;
- the base recipe's objective (v-prediction, min-SNR weighting, 10% empty captions so the
  unconditional pass of classifier-free guidance learns too), AdamW with warm-up and cosine
  decay, a fixed number of steps, one thread, deterministic algorithms, everything seeded.

The file is written into a staging folder and moved into place at the end (an interrupted run
leaves nothing). Not handled here: other adapters, GPUs, resuming.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from blocks.lora import ModuleLora, lora_target_modules, model_loras, write_lora_file
from blocks.lora.files import DEFAULT_WEIGHT_NAME
from recipes.shapes.dataset import ring_combinations, sample_batch, sample_shape
from recipes.shapes.training import build_scheduler, noised_batch, warmup_cosine

ADAPTER_NAME = "ring"
# The transformer blocks' projections: the ResNet convolutions would double a step's cost.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class RingLoraConfig:
    """The committed adapter's settings (the defaults)."""

    seed: int = 0
    threads: int = 1  # the result depends on it (float reductions)
    steps: int = 1600
    batch_size: int = 16
    ring_share: float = 0.5  # of each batch; the rest are the base dataset's shapes
    rank: int = 8
    alpha: float = 8.0  # scaling alpha / rank = 1
    unet_lr: float = 4e-3
    text_lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    pool_size: int = 256  # images drawn and encoded once (half rings)
    log_every: int = 25


def train_ring_lora(
    base_checkpoint: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    config: RingLoraConfig | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> pathlib.Path:
    """Train the ring adapter on `base_checkpoint` and write `out_dir/
    pytorch_lora_weights.safetensors` and `out_dir/training.json`; returns `out_dir`."""
    from blocks.pipeline import ModularPipeline

    config = config or RingLoraConfig()
    out = pathlib.Path(out_dir)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} is not empty")
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        pipe = ModularPipeline.from_pretrained(str(base_checkpoint))
        pipe.load_components(dtype=torch.float32)
        pool = _encode_pool(pipe, config)
        log(f"encoded {config.pool_size} images in {time.perf_counter() - start:.0f} s")
        adapters = _train(pipe, pool, config, log, progress)
        timings = {"total_s": time.perf_counter() - start,
                   "cpu_s": time.process_time() - cpu_start}
        tensors, metadata = {}, {}
        for component, modules in adapters.items():
            for path, lora in modules.items():
                tensors[f"{component}.{path}.lora_A.weight"] = lora.down.detach()
                tensors[f"{component}.{path}.lora_B.weight"] = lora.up.detach()
            metadata.update({f"{component}.r": config.rank,
                             f"{component}.lora_alpha": config.alpha,
                             f"{component}.target_modules": sorted(modules)})
        write_lora_file(staging / DEFAULT_WEIGHT_NAME, tensors, metadata)
        (staging / "training.json").write_text(json.dumps(
            {"base": pathlib.Path(base_checkpoint).name, "config": asdict(config),
             "torch": torch.__version__,
             "timings_s": {k: round(v, 1) for k, v in timings.items()}},
            indent=2, sort_keys=True) + "\n", encoding="utf-8")
        log(f"trained in {timings['total_s'] / 60:.1f} min "
            f"({timings['cpu_s'] / 60:.1f} min of CPU time)")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
    return out


@dataclass
class _Pool:
    latents: torch.Tensor  # (N, 4, 16, 16), scaled
    captions: list[str]
    is_ring: torch.Tensor  # (N,) bool


@torch.no_grad()
def _encode_pool(pipe, config: RingLoraConfig) -> _Pool:
    """Half rings over the training pairs, half the base dataset, drawn once and encoded with
    the base VAE (posterior means, times its scaling factor)."""
    rng = random.Random(config.seed)
    pairs = ring_combinations(held_out=False)
    vae = pipe.vae
    latents, captions, is_ring = [], [], []
    for first in range(0, config.pool_size, 256):
        count = min(256, config.pool_size - first)
        rings = [sample_shape(rng, pairs) for _ in range(count // 2)]
        ring_pixels = np.stack([np.asarray(s.image, dtype=np.float32) for s in rings])
        ring_pixels = ring_pixels.transpose(0, 3, 1, 2) / 127.5 - 1.0
        base_pixels, base = sample_batch(rng, count - count // 2)
        pixels = torch.from_numpy(np.concatenate([ring_pixels, base_pixels]))
        latents.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
        captions += [s.caption for s in rings] + [s.caption for s in base]
        is_ring += [True] * len(rings) + [False] * len(base)
    return _Pool(torch.cat(latents), captions, torch.tensor(is_ring))


def _new_adapter(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float,
                 generator: torch.Generator) -> dict[str, ModuleLora]:
    """Trainable LoRA weights for `model`'s modules ending in `targets`: down initialised as
    peft does (Kaiming-uniform), up zero, so training starts from the base model."""
    modules = {}
    for path, module in lora_target_modules(model).items():
        if not path.endswith(targets):
            continue
        if isinstance(module, nn.Conv2d):
            down = torch.empty(rank, module.in_channels, *module.kernel_size)
            up = torch.zeros(module.out_channels, rank, 1, 1)
        else:
            down = torch.empty(rank, module.in_features)
            up = torch.zeros(module.out_features, rank)
        bound = 1.0 / math.sqrt(down[0].numel())  # kaiming_uniform_(a=sqrt(5))'s bound
        down.uniform_(-bound, bound, generator=generator)
        modules[path] = ModuleLora(nn.Parameter(down), nn.Parameter(up), alpha / rank)
    return modules


def _train(pipe, pool: _Pool, config: RingLoraConfig, log, progress: bool):
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    for model in (unet, text_encoder):
        model.requires_grad_(False).train()
    generator = torch.Generator().manual_seed(config.seed + 1)
    adapters = {
        "unet": _new_adapter(unet, UNET_TARGETS, config.rank, config.alpha, generator),
        "text_encoder": _new_adapter(text_encoder, TEXT_TARGETS, config.rank, config.alpha,
                                     generator),
    }
    for component, modules in adapters.items():
        loras = model_loras(getattr(pipe, component), component, create=True)
        loras.add(ADAPTER_NAME, modules)
        loras.active = {ADAPTER_NAME: 1.0}

    def parameters(component: str) -> list[torch.Tensor]:
        return [t for lora in adapters[component].values() for t in (lora.down, lora.up)]

    optimizer = torch.optim.AdamW(
        [{"params": parameters("unet"), "lr": config.unet_lr},
         {"params": parameters("text_encoder"), "lr": config.text_lr}],
        weight_decay=config.weight_decay)
    schedule = warmup_cosine(optimizer, config.steps, warmup=config.warmup_steps)
    alphas_cumprod = build_scheduler().alphas_cumprod.float()
    tokens = tokenizer([*pool.captions, ""], padding="max_length", truncation=True,
                       max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    empty_id = len(pool.captions)
    ring_ids = torch.nonzero(pool.is_ring).flatten()
    base_ids = torch.nonzero(~pool.is_ring).flatten()
    rings_per_batch = round(config.batch_size * config.ring_share)
    bar = tqdm(total=config.steps, desc="train-lora-shapes", unit="step", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    start, running = time.perf_counter(), 0.0
    try:
        for step in range(1, config.steps + 1):
            batch = torch.cat([
                ring_ids[torch.randint(0, len(ring_ids), (rings_per_batch,),
                                       generator=generator)],
                base_ids[torch.randint(0, len(base_ids),
                                       (config.batch_size - rings_per_batch,),
                                       generator=generator)]])
            x0 = pool.latents[batch]  # (B, 4, 16, 16)
            caption_ids = batch.clone()
            drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
            caption_ids[drop] = empty_id
            timesteps, noisy, target, a = noised_batch(x0, alphas_cumprod, generator)
            hidden = text_encoder(tokens[caption_ids]).last_hidden_state  # (B, 77, 64)
            prediction = unet(noisy, timesteps, hidden).sample
            weight = (config.min_snr_gamma / (a / (1 - a) + 1)).clamp(max=1.0)
            loss = (weight * (prediction - target) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*parameters("unet"), *parameters("text_encoder")],
                                           1.0)
            optimizer.step()
            schedule.step()
            running += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
            if step % config.log_every == 0 or step == config.steps:
                log(f"lora step {step}/{config.steps} loss {running / config.log_every:.4f} "
                    f"({(time.perf_counter() - start) / step:.2f} s/step)")
                running = 0.0
    finally:
        bar.close()
        for component in adapters:
            model_loras(getattr(pipe, component)).remove_all()  # type: ignore[union-attr]
    return adapters

