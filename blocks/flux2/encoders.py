"""FLUX.2 [klein] encoder stages: prompts to text embeddings, reference images to latents.

Text: each prompt is wrapped in Qwen3's chat template (thinking disabled), padded to
`max_sequence_length`, run through the Qwen3 text encoder once, and the hidden states of
`text_encoder_out_layers` are concatenated per token into (B, L, 3 * D) embeddings. Every
position is kept (padding included) and no attention mask goes to the transformer, as in the
reference pipeline. The undistilled base model also gets the embeddings of an empty negative
prompt, for classifier-free guidance.

Images: each reference image is checked, shrunk to at most 1024^2 pixels, centre-cropped to
multiples of 16 px, and encoded by the VAE to normalised, patchified latents. Packing them
into tokens for the transformer happens in `before_denoise`. Only PIL images are accepted,
as by the reference pipeline.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2
from PIL import Image
from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

from blocks.block import ModularPipelineBlocks
from blocks.errors import InvalidInput
from blocks.flux2 import latent_layout
from blocks.image_processing import to_pixels
from blocks.prompts import check_images_per_prompt, prompt_list, repeat_per_prompt
from blocks.specs import ComponentSpec, ConfigSpec, InputParam, OutputParam

DEFAULT_TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
DEFAULT_MAX_SEQUENCE_LENGTH = 512
DEFAULT_GUIDANCE_SCALE = 4.0

# Reference images: limits the reference pipeline enforces (and the area it shrinks to).
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT_RATIO = 8
REFERENCE_MAX_AREA = 1024 * 1024


def uses_guidance(components: Any, guidance_scale: float) -> bool:
    """Classifier-free guidance runs for the undistilled base model with a scale above 1;
    step-distilled checkpoints ignore `guidance_scale`."""
    return guidance_scale > 1 and not components.is_distilled


def encode_prompts(
    text_encoder: Qwen3ForCausalLM,
    tokenizer: Qwen2TokenizerFast,
    prompts: list[str],
    max_sequence_length: int,
    layers: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    """(P, L, len(layers) * D) embeddings of P prompts, in the text encoder's dtype."""
    input_ids, attention_masks = [], []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        tokens = tokenizer(
            text,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=max_sequence_length,
        )
        input_ids.append(tokens["input_ids"])
        attention_masks.append(tokens["attention_mask"])
    output = text_encoder(
        input_ids=torch.cat(input_ids).to(text_encoder.device),
        attention_mask=torch.cat(attention_masks).to(text_encoder.device),
        output_hidden_states=True,
        use_cache=False,
    )
    hidden = torch.stack([output.hidden_states[k] for k in layers], dim=1)  # (P, K, L, D)
    hidden = hidden.to(dtype=text_encoder.dtype, device=device)
    num_prompts, num_layers, seq_len, dim = hidden.shape
    return hidden.permute(0, 2, 1, 3).reshape(num_prompts, seq_len, num_layers * dim)


class Flux2KleinTextEncoderStep(ModularPipelineBlocks):
    model_name = "flux2-klein"
    description = (
        "Encodes prompts with Qwen3 (hidden states of several layers, concatenated), and an "
        "empty negative prompt when the base model uses guidance."
    )
    expected_components = [
        ComponentSpec("text_encoder", Qwen3ForCausalLM, "Qwen3 language model, run once."),
        ComponentSpec("tokenizer", Qwen2TokenizerFast, "Qwen3's tokenizer and chat template."),
    ]
    expected_configs = [
        ConfigSpec("is_distilled", True, "Step-distilled checkpoint: no classifier-free guidance."),
    ]
    inputs = [
        InputParam("prompt", str | list[str], required=True, description="What to draw."),
        InputParam("num_images_per_prompt", int, default=1),
        InputParam("guidance_scale", float, default=DEFAULT_GUIDANCE_SCALE,
                   description="Classifier-free guidance scale (base model only; > 1 enables)."),
        InputParam("max_sequence_length", int, default=DEFAULT_MAX_SEQUENCE_LENGTH,
                   description="Prompts are padded or truncated to this many tokens."),
        InputParam("text_encoder_out_layers", tuple, default=DEFAULT_TEXT_ENCODER_OUT_LAYERS,
                   description="Hidden-state indices whose outputs are concatenated."),
    ]
    intermediate_outputs = [
        OutputParam("prompt_embeds", torch.Tensor, "(B, L, 3 * D) text embeddings."),
        OutputParam("text_ids", torch.Tensor, "(B, L, 4) position ids of the text tokens."),
        OutputParam("negative_prompt_embeds", torch.Tensor,
                    "Embeddings of the empty prompt, (B, L, 3 * D); None without guidance."),
        OutputParam("negative_text_ids", torch.Tensor, "None without guidance."),
        OutputParam("batch_size", int, "Number of images: prompts x num_images_per_prompt."),
    ]

    def _check(self, components: Any, block_state: Any) -> list[str]:
        prompts = prompt_list(block_state.prompt, self.path)
        check_images_per_prompt(block_state.num_images_per_prompt, self.path)
        if block_state.max_sequence_length < 1:
            raise InvalidInput(f"{self.path}: max_sequence_length must be >= 1, "
                               f"got {block_state.max_sequence_length}", "max_sequence_length")
        num_hidden_states = components.text_encoder.config.num_hidden_layers + 1
        layers = block_state.text_encoder_out_layers
        bad = [k for k in layers if not -num_hidden_states <= k < num_hidden_states]
        if bad:
            raise InvalidInput(f"{self.path}: text_encoder_out_layers {bad} out of range; the "
                               f"text encoder has hidden states 0..{num_hidden_states - 1}",
                               "text_encoder_out_layers")
        return prompts

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        prompts = self._check(components, block_state)
        device = components._execution_device
        n = block_state.num_images_per_prompt

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            embeds = encode_prompts(
                components.text_encoder, components.tokenizer, texts,
                block_state.max_sequence_length, tuple(block_state.text_encoder_out_layers),
                device,
            )
            embeds = repeat_per_prompt(embeds, n)
            return embeds, latent_layout.text_ids(embeds.shape[0], embeds.shape[1], device)

        block_state.prompt_embeds, block_state.text_ids = encode(prompts)
        block_state.negative_prompt_embeds = block_state.negative_text_ids = None
        if uses_guidance(components, block_state.guidance_scale):
            block_state.negative_prompt_embeds, block_state.negative_text_ids = encode(
                [""] * len(prompts)
            )
        block_state.batch_size = block_state.prompt_embeds.shape[0]
        self.set_block_state(state, block_state)
        return components, state


def preprocess_reference_image(image: Any, multiple_of: int, owner: str) -> torch.Tensor:
    """A PIL reference image -> (1, 3, H, W) in [-1, 1], H and W multiples of `multiple_of`.

    Images over 1024^2 pixels are first shrunk to that area (LANCZOS, aspect kept); then the
    image is centre-cropped, never resized, down to the multiple.
    """
    if not isinstance(image, Image.Image):
        raise InvalidInput(
            f"{owner}: reference images must be PIL images, got {type(image).__name__}"
        )
    width, height = image.size
    if width < REFERENCE_MIN_SIDE or height < REFERENCE_MIN_SIDE:
        raise InvalidInput(f"{owner}: reference image is {width}x{height}; both sides must be at "
                           f"least {REFERENCE_MIN_SIDE} px", "image")
    if max(width / height, height / width) > REFERENCE_MAX_ASPECT_RATIO:
        raise InvalidInput(f"{owner}: reference image is {width}x{height}; the aspect ratio may "
                           f"be at most {REFERENCE_MAX_ASPECT_RATIO}:1", "image")
    if width * height > REFERENCE_MAX_AREA:
        scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
        image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)
        width, height = image.size
    crop_width = width // multiple_of * multiple_of
    crop_height = height // multiple_of * multiple_of
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    image = image.crop((left, top, left + crop_width, top + crop_height))
    pixels = to_pixels(image) * 2 - 1  # (1, 3, H, W)
    # Channels-last is the layout PIL pixels come in and the reference pipeline hands the VAE;
    # its convolutions then take the same kernels and the latents match bit for bit.
    return pixels.contiguous(memory_format=torch.channels_last)


class Flux2KleinImagePreprocessStep(ModularPipelineBlocks):
    model_name = "flux2-klein"
    description = (
        "Checks reference images and centre-crops them to multiples of 16 px; the first one "
        "sets the output size when height/width are not given."
    )
    inputs = [
        InputParam("image", Image.Image | list[Image.Image], required=True,
                   description="Reference image(s) to condition on (PIL, >= 64 px a side)."),
        InputParam("height", int),
        InputParam("width", int),
    ]
    intermediate_outputs = [
        OutputParam("condition_images", list, "(1, 3, H, W) in [-1, 1] per reference image."),
        OutputParam("height", int, "Output height: the given one, else the first reference's."),
        OutputParam("width", int, "Output width: the given one, else the first reference's."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        images = block_state.image if isinstance(block_state.image, list) else [block_state.image]
        if not images:
            raise InvalidInput(f"{self.path}: image is an empty list", "image")
        multiple_of = latent_layout.vae_scale_factor(components) * 2
        block_state.condition_images = [
            preprocess_reference_image(image, multiple_of, self.path) for image in images
        ]
        _, _, first_height, first_width = block_state.condition_images[0].shape
        block_state.height = block_state.height or first_height
        block_state.width = block_state.width or first_width
        self.set_block_state(state, block_state)
        return components, state


class Flux2KleinVaeEncodeStep(ModularPipelineBlocks):
    model_name = "flux2-klein"
    description = "Encodes each reference image to normalised, patchified VAE latents."
    expected_components = [ComponentSpec("vae", AutoencoderKLFlux2, "FLUX.2's VAE.")]
    inputs = [
        InputParam("condition_images", list, required=True,
                   description="(1, 3, H, W) images in [-1, 1]."),
    ]
    intermediate_outputs = [
        OutputParam("image_latents", list,
                    "(1, 4c, H/16, W/16) normalised latents per reference image."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        vae = components.vae
        latents = []
        for image in block_state.condition_images:
            image = image.to(device=vae.device, dtype=vae.dtype)
            # The distribution's mode, not a sample: reference latents use no randomness.
            encoded = vae.encode(image).latent_dist.mode()  # (1, c, H/8, W/8)
            latents.append(latent_layout.normalise(latent_layout.patchify(encoded), vae))
        block_state.image_latents = latents
        self.set_block_state(state, block_state)
        return components, state

