"""A deterministic, random-weight, toy-sized Stable Diffusion 1.x checkpoint factory.

``write_tiny_sd`` writes a checkpoint in diffusers' standard folder layout (``model_index.json``
plus one subfolder per component) so that diffusers' own pipelines and blockserve's blocks load
the very same files and can be compared for exact numerical parity. Every model is a real class
(``CLIPTextModel``, ``UNet2DConditionModel``, ``AutoencoderKL``, ``ControlNetModel``,
``DepthAnythingForDepthEstimation``) at a size where a 2-step 64x64 generation costs a few tens
of milliseconds on a CPU.

Optional extras:

- ``controlnet=True`` adds a ``controlnet`` subfolder with a ``ControlNetModel`` that fits the
  UNet. It is not listed in ``model_index.json`` (diffusers' SD pipelines ignore unlisted
  folders); load it with ``ControlNetModel.from_pretrained(out_dir / "controlnet")``.
- ``depth=True`` adds a ``depth_processor`` subfolder with a ``DepthAnythingForDepthEstimation``
  (tiny Dinov2 backbone) and its ``DPTImageProcessor`` config; transformers resolves that name
  to ``DPTImageProcessorPil`` when torchvision is absent.
- ``inpaint=True`` makes the UNet take 9 input channels (latents, mask, masked-image latents)
  and names ``StableDiffusionInpaintPipeline`` in ``model_index.json``.
- ``size="real"`` writes SD 1.5's architecture instead (CLIP ViT-L/14 text tower, the 860M
  UNet, the 84M VAE, ControlNet at UNet size) with random weights, in bfloat16 by default, for
  GPU checks; the tokenizer stays the toy one (its ids index the full 49408-row embedding).
  ``device="cuda"`` builds the models there, which takes seconds instead of a CPU's minutes.

Same arguments, same bytes: every model is built under its own seed, and the tokenizer is
trained offline by the deterministic BPE trainer of ``blocks.tiny_unet_parts``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from blocks.tiny_checkpoint import build_seeded, check_size, default_weight_dtype, write_json
from blocks.tiny_unet_parts import (
    build_clip_vocab,
    clip_text_config,
    kl_vae_model,
    rename_clip_text_weights,
    write_clip_tokenizer,
    write_sd_scheduler,
)

# ---------------------------------------------------------------------------------------------
# Sizes. The VAE has 3 levels, so diffusers derives vae_scale_factor = 2 ** (3 - 1) = 4: a 32x32
# image has 8x8 latents and a 64x64 image 16x16 latents. The UNet's sample_size of 8 therefore
# makes the pipelines' default resolution 32x32.
# ---------------------------------------------------------------------------------------------
TEXT_HIDDEN_SIZE = 32
TEXT_LAYERS = 3  # >= 3 so that clip_skip=1 and clip_skip=2 pick distinct, non-final layers
TEXT_HEADS = 4
TEXT_INTERMEDIATE_SIZE = 37  # deliberately not a multiple of anything, to catch shape slips

UNET_BLOCK_OUT_CHANNELS = (32, 64)
UNET_SAMPLE_SIZE = 8
NORM_NUM_GROUPS = 8
ATTENTION_HEAD_DIM = 2  # diffusers' SD1.x quirk: this is the number of heads (16 and 32 dims)

VAE_BLOCK_OUT_CHANNELS = (16, 32, 32)
VAE_SCALE_FACTOR = 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)
VAE_SCALING_FACTOR = 0.18215  # SD 1.x's value; kept so latents are scaled as in the real model

# Two stride-2 convs, matching VAE_SCALE_FACTOR, bring the control image to latent resolution.
CONTROLNET_CONDITIONING_CHANNELS = (8, 16, 16)

DEPTH_PATCH_SIZE = 4
DEPTH_IMAGE_SIZE = 32
DEPTH_HIDDEN_SIZE = 16
# Linear/conv init std for the depth model (transformers' default is 0.02). The DPT neck and
# fusion stages shrink a 0.02-initialised signal to ~1e-4 by the head; 0.1 keeps it ~1e-2.
DEPTH_INIT_RANGE = 0.1

@dataclass(frozen=True)
class SDArchitecture:
    """The widths and depths that differ between the tiny checkpoint and SD 1.5; every other
    switch (activations, norms, attention layout, noise schedule) is SD 1.x's in both."""

    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_intermediate_size: int
    text_vocab_size: int | None  # None: the tokenizer's own vocabulary size
    # One entry per UNet level; every level but the lowest has cross-attention, as in SD 1.x.
    unet_block_out_channels: tuple[int, ...]
    unet_layers_per_block: int
    attention_head_dim: int  # diffusers' SD 1.x quirk: the number of heads
    unet_sample_size: int  # latent side of the default resolution
    norm_num_groups: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    controlnet_conditioning_channels: tuple[int, ...]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)


ARCHITECTURES: dict[str, SDArchitecture] = {
    "tiny": SDArchitecture(
        text_hidden_size=TEXT_HIDDEN_SIZE,
        text_layers=TEXT_LAYERS,
        text_heads=TEXT_HEADS,
        text_intermediate_size=TEXT_INTERMEDIATE_SIZE,
        text_vocab_size=None,
        unet_block_out_channels=UNET_BLOCK_OUT_CHANNELS,
        unet_layers_per_block=1,
        attention_head_dim=ATTENTION_HEAD_DIM,
        unet_sample_size=UNET_SAMPLE_SIZE,
        norm_num_groups=NORM_NUM_GROUPS,
        vae_block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        vae_layers_per_block=1,
        controlnet_conditioning_channels=CONTROLNET_CONDITIONING_CHANNELS,
    ),
    # runwayml/stable-diffusion-v1-5: text_encoder, unet and vae config.json.
    "real": SDArchitecture(
        text_hidden_size=768,
        text_layers=12,
        text_heads=12,
        text_intermediate_size=3072,
        text_vocab_size=49408,
        unet_block_out_channels=(320, 640, 1280, 1280),
        unet_layers_per_block=2,
        attention_head_dim=8,
        unet_sample_size=64,
        norm_num_groups=32,
        vae_block_out_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        controlnet_conditioning_channels=(16, 32, 96, 256),
    ),
}

# Seed offsets per component: each model gets ``torch.manual_seed(seed + offset)``.
_SEED_TEXT_ENCODER = 0
_SEED_UNET = 1
_SEED_VAE = 2
_SEED_CONTROLNET = 3
_SEED_DEPTH = 4


def write_tiny_sd(
    out_dir: str | pathlib.Path,
    *,
    controlnet: bool = False,
    depth: bool = False,
    inpaint: bool = False,
    seed: int = 0,
    size: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> pathlib.Path:
    """Write a random-weight SD 1.x checkpoint to ``out_dir`` and return its path.

    ``size``: "tiny" (toy widths) or "real" (SD 1.5's architecture); ``device``: where the
    models are built; ``dtype``: how the weights are saved (default float32 for tiny, bfloat16
    for real). ``out_dir`` must be missing or empty, so a stale component can never survive a
    rewrite. The same arguments always produce byte-identical files.
    """
    check_size(size)
    if depth and size != "tiny":
        raise ValueError("depth: the depth estimator exists at size 'tiny' only")
    arch = ARCHITECTURES[size]
    dtype = dtype or default_weight_dtype(size)
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)

    vocab, merges = build_clip_vocab()
    write_clip_tokenizer(out / "tokenizer", vocab, merges)

    def save(folder: str, seed: int, make: Callable[[], torch.nn.Module]) -> None:
        # One model at a time, on the CPU in `dtype` before the next is built.
        build_seeded(seed, make, device).to("cpu", dtype).save_pretrained(
            out / folder, safe_serialization=True)

    save("text_encoder", seed + _SEED_TEXT_ENCODER, text_encoder_model(arch, vocab))
    rename_clip_text_weights(out / "text_encoder")
    save("unet", seed + _SEED_UNET, unet_model(arch, in_channels=9 if inpaint else 4))
    save("vae", seed + _SEED_VAE, vae_model(arch))
    write_sd_scheduler(out / "scheduler")
    if controlnet:
        # build_seeded's re-draw also wakes up the zero-initialised convs (controlnet_down_blocks,
        # controlnet_mid_block, controlnet_cond_embedding.conv_out): the residuals are non-zero.
        save("controlnet", seed + _SEED_CONTROLNET, controlnet_model(arch))
    if depth:
        _write_depth(out / "depth_processor", seed + _SEED_DEPTH)
    write_sd_model_index(
        out,
        pipeline_class="StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
    )
    return out


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


# Each returns the constructor call `build_seeded` runs (on any device, "meta" included).


def text_encoder_model(arch: SDArchitecture, vocab: dict[str, int]) -> Callable[[], Any]:
    from transformers import CLIPTextModel

    config = clip_text_config(
        vocab,
        vocab_size=arch.text_vocab_size,
        hidden_size=arch.text_hidden_size,
        intermediate_size=arch.text_intermediate_size,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        hidden_act="quick_gelu",  # CLIP ViT-L/14's text tower, as in SD 1.x
        projection_dim=arch.text_hidden_size,
    )
    return lambda: CLIPTextModel(config)


def _unet_like_kwargs(arch: SDArchitecture) -> dict[str, Any]:
    """Architecture arguments the UNet and its ControlNet must share."""
    levels = len(arch.unet_block_out_channels)
    return {
        # Mirrors SD 1.x: attention at the high-resolution levels, none at the lowest.
        "down_block_types": ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        "block_out_channels": arch.unet_block_out_channels,
        "layers_per_block": arch.unet_layers_per_block,
        "cross_attention_dim": arch.text_hidden_size,
        "attention_head_dim": arch.attention_head_dim,
        "norm_num_groups": arch.norm_num_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": False,  # SD 1.x: 1x1 conv proj_in/proj_out (SD 2.x: linear)
    }


def unet_model(arch: SDArchitecture, in_channels: int = 4) -> Callable[[], Any]:
    from diffusers import UNet2DConditionModel

    levels = len(arch.unet_block_out_channels)
    return lambda: UNet2DConditionModel(
        sample_size=arch.unet_sample_size,
        in_channels=in_channels,
        out_channels=4,
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        **_unet_like_kwargs(arch),
    )


def vae_model(arch: SDArchitecture) -> Callable[[], Any]:
    return kl_vae_model(
        block_out_channels=arch.vae_block_out_channels,
        layers_per_block=arch.vae_layers_per_block,
        norm_num_groups=arch.norm_num_groups,
        sample_size=arch.unet_sample_size * arch.vae_scale_factor,
        scaling_factor=VAE_SCALING_FACTOR,
    )


def controlnet_model(arch: SDArchitecture) -> Callable[[], Any]:
    from diffusers import ControlNetModel

    return lambda: ControlNetModel(
        in_channels=4,
        conditioning_channels=3,
        conditioning_embedding_out_channels=arch.controlnet_conditioning_channels,
        **_unet_like_kwargs(arch),
    )


def _write_depth(folder: pathlib.Path, seed: int) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        image_size=DEPTH_IMAGE_SIZE,
        patch_size=DEPTH_PATCH_SIZE,
        hidden_size=DEPTH_HIDDEN_SIZE,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
        initializer_range=DEPTH_INIT_RANGE,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=DEPTH_PATCH_SIZE,
        reassemble_hidden_size=DEPTH_HIDDEN_SIZE,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[8, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
        initializer_range=DEPTH_INIT_RANGE,
    )
    model = build_seeded(seed, lambda: DepthAnythingForDepthEstimation(config))
    _calibrate_depth_head(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    # Depth Anything's own preprocessing, scaled down: keep the aspect ratio, snap to a
    # multiple of the patch size, bicubic resize, ImageNet normalisation.
    processor = {
        "do_normalize": True,
        "do_pad": False,
        "do_rescale": True,
        "do_resize": True,
        "ensure_multiple_of": DEPTH_PATCH_SIZE,
        "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "DPTImageProcessor",
        "image_std": [0.229, 0.224, 0.225],
        "keep_aspect_ratio": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": DEPTH_IMAGE_SIZE, "width": DEPTH_IMAGE_SIZE},
    }
    write_json(folder / "preprocessor_config.json", processor)


@torch.no_grad()
def _calibrate_depth_head(model: torch.nn.Module, seed: int) -> None:
    """Rescale the head's last conv so its pre-ReLU output has unit spread and is mostly > 0.

    A random relative-depth head often lands below zero almost everywhere, and the final ReLU
    then outputs a blank map. Like LSUV initialisation, one forward pass on a seeded input sets
    ``conv3`` so that its output is ``(p - q10(p)) / std(p)``: about 90% of pixels clear the
    ReLU and the map varies with the input.
    """
    conv = model.head.conv3
    captured: list[torch.Tensor] = []
    hook = conv.register_forward_hook(lambda _m, _i, output: captured.append(output))
    generator = torch.Generator().manual_seed(seed)
    size = (1, 3, DEPTH_IMAGE_SIZE, DEPTH_IMAGE_SIZE)
    model(pixel_values=torch.randn(size, generator=generator))
    hook.remove()
    pre_activation = captured[0].flatten()
    # Rounded to 3 significant digits: the forward pass's last bits may depend on the CPU's
    # kernels and thread count, and the written bytes must not.
    scale = float(f"{float(pre_activation.std()):.3g}")
    shift = float(f"{float(torch.quantile(pre_activation, 0.1)):.3g}")
    conv.weight.div_(scale)
    conv.bias.sub_(shift).div_(scale)


def write_sd_model_index(
    out: pathlib.Path,
    *,
    pipeline_class: str = "StableDiffusionPipeline",
    scheduler_class: str = "EulerDiscreteScheduler",
) -> None:
    """Write an SD checkpoint's model_index.json as diffusers' ``save_pretrained`` would
    (sorted keys, indent 2): CLIP text encoder and tokenizer, UNet, VAE, no safety checker."""
    import diffusers

    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    write_json(out / "model_index.json", index)
