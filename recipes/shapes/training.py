"""Trains the tiny "shapes" Stable Diffusion model on a CPU, from nothing, in well under an hour.

The model is a real SD 1.x-family checkpoint at toy size: a CLIP text encoder with its
tokenizer, a `UNet2DConditionModel`, an `AutoencoderKL` and a `DDIMScheduler`, written in
diffusers' standard layout (`model_index.json` names `StableDiffusionPipeline`), so blockserve's
SD blocks and diffusers' own pipeline load it alike. It draws what `recipes.shapes.dataset`
draws: "a red circle on a blue background" at 64x64.

The recipe, in two stages:

1. the VAE (3 levels, so 64x64 images <-> 16x16x4 latents) learns to reconstruct dataset
   images (L1 + MSE + a small KL term); it is then frozen, its latent scaling factor is set
   from the data (1 / std of the latents), and a fixed pool of training images is encoded once;
2. the UNet and the text encoder learn jointly to denoise those latents: v-prediction on a
   zero-terminal-SNR schedule (so sampling starts from pure noise, as it does at inference,
   and the flat background colour is not guessed from leftover signal), uniform timesteps,
   10% empty captions for classifier-free guidance, AdamW with warm-up and cosine decay, and
   an exponential moving average of both models' weights, which is what gets saved.

Everything is seeded and runs a fixed number of steps (not a time budget), with
deterministic algorithms and a fixed thread count, so the same arguments on the same software
give the same weights whatever the machine's speed. One progress bar covers both stages, with
the time left. The checkpoint is written into a staging folder beside `out_dir` and moved into
place at the end, so an interrupted run leaves no half-written `out_dir` (a rerun starts over;
`overwrite=True` replaces an existing checkpoint). It deliberately does not handle GPUs,
resuming mid-run, or other image sizes: it exists to make the default offline model
reproducible.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from recipes.shapes.dataset import (
    IMAGE_SIZE,
    caption,
    sample_batch,
    training_combinations,
)

# ---------------------------------------------------------------------------------------------
# Architecture (fixed: the checkpoint's configs record it, and the tests rely on its speed).
# ---------------------------------------------------------------------------------------------
TEXT_HIDDEN_SIZE = 64
TEXT_LAYERS = 3
TEXT_HEADS = 4
TEXT_INTERMEDIATE_SIZE = 128

VAE_BLOCK_OUT_CHANNELS = (16, 32, 32)  # 3 levels: f = 4, 64x64 -> 16x16
VAE_LATENT_CHANNELS = 4
VAE_NORM_GROUPS = 8
LATENT_SIZE = IMAGE_SIZE // 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)

UNET_BLOCK_OUT_CHANNELS = (32, 64, 128)  # cheap width at 4x4, where the layout is decided
# Cross-attention at 8x8 and 4x4 (and the mid block); the 16x16 level is convolutions only:
# cross-attention there too made a training step 1.8x slower.
UNET_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
UNET_HEADS = 4  # passed as diffusers' `attention_head_dim`, which SD 1.x uses as the head count
UNET_NORM_GROUPS = 16

# The inference defaults the checkpoint is trained and evaluated for.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 5.0


@dataclass(frozen=True)
class ShapesTrainingConfig:
    """Step counts and optimiser settings; the defaults are the committed checkpoint's."""

    seed: int = 0
    # Fixed, because float reductions can differ with the thread count. One thread, because on
    # a shared 2-core machine a second OpenMP thread mostly waits for a busy core (measured:
    # 8x slower per step than one thread under load).
    threads: int = 1
    vae_steps: int = 1200
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6  # on the KL summed over latent elements
    pool_size: int = 16384  # training images drawn and encoded once for stage 2
    unet_steps: int = 4500
    unet_batch_size: int = 32
    unet_lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    # Min-SNR-style weighting (Hang et al. 2023) written for v-prediction: the v-loss equals
    # the x0-loss times (snr + 1); capping that factor at gamma stops the easy low-noise
    # timesteps from dominating, while the high-noise ones, where the shape is decided (and
    # the t=999 step sampling starts from), keep full weight.
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    log_every: int = 100


def train_shapes(
    out_dir: str | pathlib.Path,
    seed: int = 0,
    vae_steps: int | None = None,
    unet_steps: int | None = None,
    threads: int = 1,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **overrides: object,
) -> pathlib.Path:
    """Train the shapes model and write its checkpoint to `out_dir` (missing or empty, or
    anything when `overwrite`: it is replaced once the new checkpoint is complete).

    `vae_steps` / `unet_steps` default to the committed checkpoint's counts; lower them for a
    quick, worse model. Further `ShapesTrainingConfig` fields may be passed as keywords.
    `progress` draws a progress bar with the time left on stderr. Returns the checkpoint folder.
    """
    fields = {"seed": seed, "threads": threads, **overrides}
    if vae_steps is not None:
        fields["vae_steps"] = vae_steps
    if unet_steps is not None:
        fields["unet_steps"] = unet_steps
    config = ShapesTrainingConfig(**fields)  # type: ignore[arg-type]
    return ShapesTrainer(config, log=log, progress=progress).run(pathlib.Path(out_dir),
                                                                 overwrite=overwrite)


def _print_err(message: str) -> None:
    tqdm.write(message, file=sys.stderr)  # above a progress bar, not through it


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_tokenizer(folder: pathlib.Path):
    """The tiny checkpoints' offline CLIP tokenizer (its corpus holds the shapes words)."""
    from transformers import CLIPTokenizer

    from blocks.tiny_unet_parts import build_clip_vocab, write_clip_tokenizer

    vocab, merges = build_clip_vocab()
    write_clip_tokenizer(folder, vocab, merges)
    return CLIPTokenizer.from_pretrained(folder)


def build_text_encoder(tokenizer) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=TEXT_INTERMEDIATE_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=TEXT_HIDDEN_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae(scaling_factor: float = 1.0) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    levels = len(VAE_BLOCK_OUT_CHANNELS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=VAE_LATENT_CHANNELS,
        norm_num_groups=VAE_NORM_GROUPS,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def build_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=VAE_LATENT_CHANNELS,
        out_channels=VAE_LATENT_CHANNELS,
        down_block_types=UNET_DOWN_BLOCKS,
        up_block_types=UNET_UP_BLOCKS,
        block_out_channels=UNET_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=UNET_HEADS,
        norm_num_groups=UNET_NORM_GROUPS,
        flip_sin_to_cos=True,
        freq_shift=0,
        # A pooled text embedding added to the timestep embedding (DeepFloyd IF's "text"
        # addition), with scale-and-shift time conditioning in every ResNet: a global path
        # for "which shape, which colours" next to cross-attention's spatial one. It reads
        # encoder_hidden_states only, so SD pipelines need no extra inputs.
        addition_embed_type="text",
        addition_embed_type_num_heads=UNET_HEADS,
        resnet_time_scale_shift="scale_shift",
    )


def build_scheduler():
    """DDIM on SD's beta schedule rescaled to zero terminal SNR, v-prediction, "trailing"
    timesteps (the first step is t=999, pure noise): the setup of Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed"."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=0,
    )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class ShapesTrainer:
    """Runs both stages for one config; `run(out_dir)` writes the checkpoint."""

    def __init__(
        self,
        config: ShapesTrainingConfig,
        log: Callable[[str], None] | None = None,
        on_unet_step: Callable[[int, torch.nn.Module, torch.nn.Module], None] | None = None,
        progress: bool = False,
    ):
        self.config = config
        self.log = log or _print_err
        self.progress = progress
        # Called as on_unet_step(step, ema_text_encoder, ema_unet) after every stage-2 step,
        # e.g. to snapshot or evaluate a run as it goes.
        self.on_unet_step = on_unet_step
        self.timings: dict[str, float] = {}

    def run(self, out: pathlib.Path, overwrite: bool = False) -> pathlib.Path:
        if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
            raise FileExistsError(f"{out} is not empty")
        # Written here and moved to `out` at the end: an interrupted run leaves no checkpoint
        # that looks complete, and nothing that blocks the next run.
        staging = out.parent / f".{out.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        cfg = self.config
        previous_threads = torch.get_num_threads()
        previous_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(True)
        # Stage 1 steps, the pool's encoding (counted as one step per 256 images), stage 2.
        total = cfg.vae_steps + math.ceil(cfg.pool_size / 256) + cfg.unet_steps
        self.bar = tqdm(total=total, desc="train-shapes", unit="step", file=sys.stderr,
                        disable=not self.progress, dynamic_ncols=True)
        try:
            start, cpu_start = time.perf_counter(), time.process_time()
            tokenizer = build_tokenizer(staging / "tokenizer")
            torch.manual_seed(cfg.seed)
            vae = self._train_vae(random.Random(cfg.seed))
            latents, pool_ids, captions = self._encode_pool(vae, random.Random(cfg.seed + 1))
            # Scaled latents get unit variance, like SD's 0.18215 does for its VAE; rounded so
            # the written config does not depend on the last bits of a float sum.
            scale = float(f"{1.0 / float(latents.std()):.4g}")
            vae.register_to_config(scaling_factor=scale)
            self.log(f"vae scaling_factor {scale}")
            text_encoder, unet = self._train_denoiser(
                tokenizer, latents * scale, pool_ids, captions
            )
            self.timings["total_s"] = time.perf_counter() - start
            self.timings["cpu_s"] = time.process_time() - cpu_start
            self.bar.close()
            self.log(f"trained in {self.timings['total_s'] / 60:.1f} min "
                     f"({self.timings['cpu_s'] / 60:.1f} min of CPU time)")
            self._save(staging, tokenizer, text_encoder, unet, vae)
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            self.bar.close()
            shutil.rmtree(staging, ignore_errors=True)
            torch.set_num_threads(previous_threads)
            torch.use_deterministic_algorithms(previous_deterministic)
        return out

    # -- stage 1: the autoencoder -----------------------------------------------------------

    def _train_vae(self, rng: random.Random) -> torch.nn.Module:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        vae = build_vae().train()
        optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        schedule = warmup_cosine(optimizer, cfg.vae_steps, warmup=min(100, cfg.vae_steps // 10))
        generator = torch.Generator().manual_seed(cfg.seed)
        start, running = time.perf_counter(), 0.0
        for step in range(1, cfg.vae_steps + 1):
            pixels, _ = sample_batch(rng, cfg.vae_batch_size)
            images = torch.from_numpy(pixels)  # (B, 3, 64, 64) in [-1, 1]
            posterior = vae.encode(images).latent_dist
            latents = posterior.sample(generator=generator)  # (B, 4, 16, 16)
            recon = vae.decode(latents).sample
            loss = (
                F.l1_loss(recon, images)
                + F.mse_loss(recon, images)
                + cfg.vae_kl_weight * posterior.kl().mean()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            running += loss.item()
            self.bar.set_description("train-shapes: vae", refresh=False)
            self.bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            self.bar.update()
            if step % cfg.log_every == 0 or step == cfg.vae_steps:
                elapsed = time.perf_counter() - start
                self.log(
                    f"vae step {step}/{cfg.vae_steps} loss {running / cfg.log_every:.4f} "
                    f"({elapsed / step:.2f} s/step)"
                )
                running = 0.0
        self.timings["vae_s"] = time.perf_counter() - start
        return vae.eval().requires_grad_(False)

    @torch.no_grad()
    def _encode_pool(self, vae: torch.nn.Module, rng: random.Random):
        """Draw `pool_size` training images once and keep their latents (posterior means:
        the diffusion model learns the VAE's clean latents, not its sampling noise)."""
        cfg = self.config
        start = time.perf_counter()
        combos = training_combinations()
        captions = [caption(*c) for c in combos]
        index = {c: i for i, c in enumerate(combos)}
        latents, ids = [], []
        for first in range(0, cfg.pool_size, 256):
            pixels, samples = sample_batch(rng, min(256, cfg.pool_size - first))
            latents.append(vae.encode(torch.from_numpy(pixels)).latent_dist.mean)
            ids.extend(index[s.combination] for s in samples)
            self.bar.set_description("train-shapes: encode pool", refresh=False)
            self.bar.update()
        self.timings["pool_s"] = time.perf_counter() - start
        self.log(f"encoded {cfg.pool_size} images in {self.timings['pool_s']:.0f} s")
        return torch.cat(latents), torch.tensor(ids), captions

    # -- stage 2: UNet and text encoder -----------------------------------------------------

    def _train_denoiser(self, tokenizer, latents, pool_ids, captions):
        cfg = self.config
        torch.manual_seed(cfg.seed + 2)
        text_encoder = build_text_encoder(tokenizer).train()
        unet = build_unet().train()
        scheduler = build_scheduler()
        alphas_cumprod = scheduler.alphas_cumprod.float()  # (1000,)

        # Token ids of every training caption, and of the empty prompt last (for CFG).
        tokens = tokenizer(
            [*captions, ""], padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # (C + 1, 77)
        empty_id = len(captions)

        optimizer = torch.optim.AdamW(
            [
                {"params": list(unet.parameters()), "lr": cfg.unet_lr},
                {"params": list(text_encoder.parameters()), "lr": cfg.text_lr},
            ],
            weight_decay=cfg.weight_decay,
        )
        schedule = warmup_cosine(optimizer, cfg.unet_steps, warmup=cfg.warmup_steps)
        ema_unet = copy.deepcopy(unet).requires_grad_(False)
        ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
        generator = torch.Generator().manual_seed(cfg.seed + 3)

        start, running = time.perf_counter(), 0.0
        pool = latents.shape[0]
        for step in range(1, cfg.unet_steps + 1):
            batch = torch.randint(0, pool, (cfg.unet_batch_size,), generator=generator)
            x0 = latents[batch]  # (B, 4, 16, 16)
            caption_ids = pool_ids[batch].clone()
            drop = torch.rand(cfg.unet_batch_size, generator=generator) < cfg.caption_dropout
            caption_ids[drop] = empty_id
            timesteps, noisy, target, a = noised_batch(x0, alphas_cumprod, generator)

            hidden = text_encoder(tokens[caption_ids]).last_hidden_state  # (B, 77, 64)
            prediction = unet(noisy, timesteps, hidden).sample
            snr = a / (1 - a)
            weight = (cfg.min_snr_gamma / (snr + 1)).clamp(max=1.0)  # (B, 1, 1, 1)
            loss = (weight * (prediction - target) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [*unet.parameters(), *text_encoder.parameters()], 1.0
            )
            optimizer.step()
            schedule.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            _ema_update(ema_unet, unet, decay)
            _ema_update(ema_text, text_encoder, decay)
            if self.on_unet_step is not None:
                self.on_unet_step(step, ema_text, ema_unet)

            running += loss.item()
            self.bar.set_description("train-shapes: unet", refresh=False)
            self.bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            self.bar.update()
            if step % cfg.log_every == 0 or step == cfg.unet_steps:
                elapsed = time.perf_counter() - start
                self.log(
                    f"unet step {step}/{cfg.unet_steps} loss {running / cfg.log_every:.4f} "
                    f"({elapsed / step:.2f} s/step)"
                )
                running = 0.0
        self.timings["unet_s"] = time.perf_counter() - start
        return ema_text.eval(), ema_unet.eval()

    # -- saving -----------------------------------------------------------------------------

    def _save(self, out: pathlib.Path, tokenizer, text_encoder, unet, vae) -> None:
        from blocks.stable_diffusion.tiny_model import write_sd_model_index

        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        # Real SD checkpoints prefix the text encoder's weights with "text_model." (as
        # transformers < 5 saved them); write that layout, as the tiny SD factory does.
        state = {f"text_model.{k}": v.contiguous() for k, v in text_encoder.state_dict().items()}
        save_file(state, out / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
        unet.save_pretrained(out / "unet", safe_serialization=True)
        vae.save_pretrained(out / "vae", safe_serialization=True)
        build_scheduler().save_pretrained(out / "scheduler")
        write_sd_model_index(out, scheduler_class="DDIMScheduler")
        # How this checkpoint was made, for the record; loaders ignore the file.
        _write_json(
            out / "training.json",
            {"config": asdict(self.config), "torch": torch.__version__,
             "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
             "default_steps": DEFAULT_STEPS, "default_guidance_scale": DEFAULT_GUIDANCE_SCALE},
        )


def noised_batch(x0: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For clean latents `x0` (B, 4, H, W): random timesteps, the noised latents, their
    v-prediction targets and alpha-bar per sample (B, 1, 1, 1); draws timesteps, then noise."""
    timesteps = torch.randint(0, 1000, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
    return timesteps, noisy, target, a


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param, 1 - decay)


def _write_json(path: pathlib.Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

