"""A deterministic, random-weight, toy-sized Stable Diffusion XL checkpoint factory.

``write_tiny_sdxl`` writes a checkpoint in diffusers' standard folder layout (``model_index.json``
plus one subfolder per component) that diffusers' ``StableDiffusionXLPipeline`` (and its
image-to-image and inpainting siblings) and blockserve's blocks load alike, so the two can be
compared for exact numerical parity. Every model is a real class at a size where a 2-step 32x32
generation costs a few tens of milliseconds on a CPU:

- ``text_encoder``: ``CLIPTextModel`` (CLIP ViT-L's role: quick_gelu), ``text_encoder_2``:
  ``CLIPTextModelWithProjection`` (OpenCLIP bigG's role: gelu, a projection narrower than its
  width), each with its ``CLIPTokenizer`` (the second pads with "!", as SDXL's does);
- ``unet``: ``UNet2DConditionModel`` with SDXL's "text_time" added conditioning (pooled
  embeddings and six micro-conditioning numbers), linear attention projections and two
  transformer layers at its lower level;
- ``vae``: ``AutoencoderKL`` with SDXL's latent scale 0.13025; ``scheduler``: SDXL's
  ``EulerDiscreteScheduler`` schedule.

Every width differs from every other one (text encoders 32 and 40, projection 28, so the UNet's
cross-attention takes 72 and its added embedding 6 * 8 + 28 = 76), so that swapping the
encoders, their order, or the pooled and per-token outputs fails loudly.

Options: ``inpaint=True`` makes the UNet take 9 input channels (latents, mask, masked-image
latents) and names ``StableDiffusionXLInpaintPipeline`` in ``model_index.json``;
``controlnet=True`` adds a ``controlnet`` subfolder with a ``ControlNetModel`` that fits the
UNet (not listed in ``model_index.json``: load it with
``ControlNetModel.from_pretrained(out_dir / "controlnet")``).

Same arguments, same bytes: every model is built under its own seed, and the tokenizers are
trained offline by the deterministic BPE trainer of ``blocks.tiny_unet_parts``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import torch

from blocks.tiny_checkpoint import build_seeded, write_json
from blocks.tiny_unet_parts import (
    build_clip_vocab,
    clip_text_config,
    kl_vae_model,
    rename_clip_text_weights,
    write_clip_tokenizer,
    write_sd_scheduler,
)

# The VAE has 3 levels (vae_scale_factor 4) and the UNet's sample_size is 8: the pipelines'
# default resolution is 32x32.
TEXT_HIDDEN_SIZE = 32
TEXT_INTERMEDIATE_SIZE = 37  # deliberately not a multiple of anything, to catch shape slips
TEXT_2_HIDDEN_SIZE = 40
TEXT_2_INTERMEDIATE_SIZE = 53
TEXT_2_PROJECTION_DIM = 28
TEXT_LAYERS = 3  # SDXL takes the penultimate layer; clip_skip=1 then takes the one before
TEXT_HEADS = 4

UNET_BLOCK_OUT_CHANNELS = (32, 64)
UNET_SAMPLE_SIZE = 8
NORM_NUM_GROUPS = 8
ADDITION_TIME_EMBED_DIM = 8
# original size (2) + crop coordinates (2) + target size (2)
NUM_TIME_IDS = 6

VAE_BLOCK_OUT_CHANNELS = (16, 32, 32)
VAE_SCALE_FACTOR = 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)
VAE_SCALING_FACTOR = 0.13025  # SDXL's value

CONTROLNET_CONDITIONING_CHANNELS = (8, 16, 16)  # two stride-2 convs, as VAE_SCALE_FACTOR

# Each model gets ``seed + offset``.
_SEED_TEXT_ENCODER = 0
_SEED_TEXT_ENCODER_2 = 1
_SEED_UNET = 2
_SEED_VAE = 3
_SEED_CONTROLNET = 4


def write_tiny_sdxl(
    out_dir: str | pathlib.Path,
    *,
    inpaint: bool = False,
    controlnet: bool = False,
    seed: int = 0,
    size: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> pathlib.Path:
    """Write a tiny random-weight SDXL checkpoint to ``out_dir`` and return its path.

    ``size`` must be "tiny" (SDXL's real architecture is not written); ``device``: where the
    models are built; ``dtype``: how the weights are saved (default float32). ``out_dir`` must
    be missing or empty, so a stale component can never survive a rewrite. The same arguments
    always produce byte-identical files.
    """
    if size != "tiny":
        raise ValueError(f"size {size!r}: only size 'tiny' exists for SDXL")
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)

    vocab, merges = build_clip_vocab()
    write_clip_tokenizer(out / "tokenizer", vocab, merges)
    write_clip_tokenizer(out / "tokenizer_2", vocab, merges, pad_token="!")

    def save(folder: str, seed: int, make: Callable[[], torch.nn.Module]) -> None:
        build_seeded(seed, make, device).to("cpu", dtype or torch.float32).save_pretrained(
            out / folder, safe_serialization=True)

    first, second = _text_encoder_models(vocab)
    save("text_encoder", seed + _SEED_TEXT_ENCODER, first)
    rename_clip_text_weights(out / "text_encoder")
    save("text_encoder_2", seed + _SEED_TEXT_ENCODER_2, second)
    save("unet", seed + _SEED_UNET, _unet_model(in_channels=9 if inpaint else 4))
    save("vae", seed + _SEED_VAE, kl_vae_model(
        block_out_channels=VAE_BLOCK_OUT_CHANNELS, layers_per_block=1,
        norm_num_groups=NORM_NUM_GROUPS, sample_size=UNET_SAMPLE_SIZE * VAE_SCALE_FACTOR,
        scaling_factor=VAE_SCALING_FACTOR,
    ))
    write_sd_scheduler(out / "scheduler")
    if controlnet:
        # build_seeded's re-draw also wakes up the zero-initialised convs: the residuals are
        # not zero.
        save("controlnet", seed + _SEED_CONTROLNET, _controlnet_model())
    _write_model_index(out, inpaint=inpaint)
    return out


def _text_encoder_models(vocab: dict[str, int]) -> tuple[Callable[[], Any], Callable[[], Any]]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip_text_config(
        vocab, hidden_size=TEXT_HIDDEN_SIZE, intermediate_size=TEXT_INTERMEDIATE_SIZE,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS, hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN_SIZE,
    )
    config_2 = clip_text_config(
        vocab, hidden_size=TEXT_2_HIDDEN_SIZE, intermediate_size=TEXT_2_INTERMEDIATE_SIZE,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS, hidden_act="gelu",
        projection_dim=TEXT_2_PROJECTION_DIM,
    )
    return lambda: CLIPTextModel(config), lambda: CLIPTextModelWithProjection(config_2)


def _unet_like_kwargs() -> dict[str, Any]:
    """Architecture arguments the UNet and its ControlNet must share."""
    return {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "block_out_channels": UNET_BLOCK_OUT_CHANNELS,
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2),
        "cross_attention_dim": TEXT_HIDDEN_SIZE + TEXT_2_HIDDEN_SIZE,
        # diffusers' quirk, as in SDXL's config: this is the number of heads per level.
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": (
            NUM_TIME_IDS * ADDITION_TIME_EMBED_DIM + TEXT_2_PROJECTION_DIM
        ),
        "norm_num_groups": NORM_NUM_GROUPS,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def _unet_model(in_channels: int) -> Callable[[], Any]:
    from diffusers import UNet2DConditionModel

    return lambda: UNet2DConditionModel(
        sample_size=UNET_SAMPLE_SIZE,
        in_channels=in_channels,
        out_channels=4,
        # Mirrors SDXL: no attention at the highest resolution.
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **_unet_like_kwargs(),
    )


def _controlnet_model() -> Callable[[], Any]:
    from diffusers import ControlNetModel

    return lambda: ControlNetModel(
        in_channels=4,
        conditioning_channels=3,
        conditioning_embedding_out_channels=CONTROLNET_CONDITIONING_CHANNELS,
        **_unet_like_kwargs(),
    )


def _write_model_index(out: pathlib.Path, *, inpaint: bool) -> None:
    """model_index.json as diffusers' ``save_pretrained`` writes SDXL's (sorted, indent 2)."""
    import diffusers

    index: dict[str, Any] = {
        "_class_name": (
            "StableDiffusionXLInpaintPipeline" if inpaint else "StableDiffusionXLPipeline"
        ),
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if inpaint:
        index["requires_aesthetics_score"] = False
    write_json(out / "model_index.json", index)
