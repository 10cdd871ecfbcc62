"""Stable Diffusion XL's text encoder stage: prompts to the embeddings of two CLIP encoders.

SDXL conditions its UNet on two text encoders at once: CLIP ViT-L (`text_encoder`) and
OpenCLIP bigG with a projection (`text_encoder_2`). Each gets its own prompt (`prompt_2`
defaults to `prompt`), padded to 77 tokens; the per-token conditioning is the *penultimate*
hidden state of each (no final layer norm; `clip_skip=k` goes k layers further back),
concatenated along the feature axis, and the second encoder's projected pooled output is the
pooled embedding the UNet's added conditioning takes.

Negative conditioning (with `guidance_scale > 1`): when no `negative_prompt` is given and the
checkpoint says `force_zeros_for_empty_prompt` (SDXL base does), the negative embeddings are
zeros, as in diffusers; otherwise `negative_prompt` ("" by default) and `negative_prompt_2`
(defaulting to it) are encoded like the prompts, without `clip_skip`.

Not handled here: checkpoints with only the second encoder (the SDXL refiner); prompt weighting,
textual inversion and LoRA scales; images (`blocks.unet_vae` encodes them).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from blocks.block import ModularPipelineBlocks
from blocks.errors import InvalidInput
from blocks.prompts import (
    check_clip_skip,
    check_images_per_prompt,
    negative_prompt_list,
    prompt_list,
    repeat_per_prompt,
    tokenize_padded,
)
from blocks.specs import ComponentSpec, ConfigSpec, InputParam, OutputParam

DEFAULT_GUIDANCE_SCALE = 5.0


def encode_with_both(
    encoders: list[tuple[CLIPTokenizer, Any]],
    prompts: list[list[str]],
    device: torch.device,
    hidden_state_index: int,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, L, D1 + D2) per-token embeddings and (P, Dp) pooled embeddings of P prompts.

    Encoder i reads `prompts[i]`; its hidden state `hidden_state_index` (e.g. -2, the
    penultimate) is its per-token part, and the pooled embedding is the first 2-D output of
    an encoder (the projected `text_embeds` of `CLIPTextModelWithProjection`).
    """
    per_token, pooled = [], None
    for (tokenizer, text_encoder), texts in zip(encoders, prompts, strict=True):
        input_ids = tokenize_padded(tokenizer, texts, max_length).input_ids
        output = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)
        if pooled is None and output[0].ndim == 2:
            pooled = output[0]
        per_token.append(output.hidden_states[hidden_state_index])
    if pooled is None:
        raise ValueError("no text encoder returned a pooled embedding; text_encoder_2 must be "
                         "a CLIPTextModelWithProjection")
    embeds = torch.cat(per_token, dim=-1)
    dtype = encoders[-1][1].dtype
    return embeds.to(dtype=dtype, device=device), pooled.to(device=device)


class StableDiffusionXLTextEncoderStep(ModularPipelineBlocks):
    model_name = "stable-diffusion-xl"
    description = (
        "Encodes the prompts with both CLIP text encoders (per-token and pooled embeddings), "
        "and the negative prompts when guidance_scale > 1 (for classifier-free guidance)."
    )
    expected_components = [
        ComponentSpec("text_encoder", CLIPTextModel, "CLIP ViT-L text encoder."),
        ComponentSpec("text_encoder_2", CLIPTextModelWithProjection,
                      "OpenCLIP bigG text encoder with its projection."),
        ComponentSpec("tokenizer", CLIPTokenizer, "Tokenizer of text_encoder."),
        ComponentSpec("tokenizer_2", CLIPTokenizer, "Tokenizer of text_encoder_2."),
    ]
    expected_configs = [
        ConfigSpec("force_zeros_for_empty_prompt", True,
                   "Without a negative prompt, use zeros as negative embeddings."),
    ]
    inputs = [
        InputParam("prompt", str | list[str], required=True, description="What to draw."),
        InputParam("prompt_2", str | list[str],
                   description="The prompt for text_encoder_2; `prompt` by default."),
        InputParam("negative_prompt", str | list[str],
                   description="What to steer away from (with guidance); see "
                               "force_zeros_for_empty_prompt for the default."),
        InputParam("negative_prompt_2", str | list[str],
                   description="The negative prompt for text_encoder_2; negative_prompt by "
                               "default."),
        InputParam("num_images_per_prompt", int, default=1),
        InputParam("guidance_scale", float, default=DEFAULT_GUIDANCE_SCALE,
                   description="Classifier-free guidance scale; > 1 enables it."),
        InputParam("clip_skip", int,
                   description="Use the hidden state this many layers before the "
                               "penultimate one."),
    ]
    intermediate_outputs = [
        OutputParam("prompt_embeds", torch.Tensor, "(B, 77, D1 + D2) text embeddings.",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("negative_prompt_embeds", torch.Tensor,
                    "(B, 77, D1 + D2) negative embeddings; None when guidance_scale <= 1.",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("pooled_prompt_embeds", torch.Tensor, "(B, Dp) pooled text embeddings.",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("negative_pooled_prompt_embeds", torch.Tensor,
                    "(B, Dp) pooled negative embeddings; None when guidance_scale <= 1.",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("batch_size", int, "Number of images: prompts x num_images_per_prompt."),
        OutputParam("guidance_scale", float, "The guidance scale in effect (SDXL's default "
                                             f"{DEFAULT_GUIDANCE_SCALE} when not given)."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        prompts = prompt_list(block_state.prompt, self.path)
        prompts_2 = prompts if block_state.prompt_2 is None else prompt_list(
            block_state.prompt_2, self.path, "prompt_2")
        if len(prompts_2) != len(prompts):
            raise InvalidInput(f"{self.path}: got {len(prompts_2)} prompt_2 for {len(prompts)} "
                               "prompts; pass one per prompt", "prompt_2")
        n = check_images_per_prompt(block_state.num_images_per_prompt, self.path)
        clip_skip = block_state.clip_skip
        check_clip_skip(clip_skip, min(components.text_encoder.config.num_hidden_layers,
                                       components.text_encoder_2.config.num_hidden_layers),
                        self.path)
        encoders = [(components.tokenizer, components.text_encoder),
                    (components.tokenizer_2, components.text_encoder_2)]
        device = components._execution_device
        embeds, pooled = encode_with_both(encoders, [prompts, prompts_2], device,
                                          -((clip_skip or 0) + 2))
        block_state.prompt_embeds = repeat_per_prompt(embeds, n)
        block_state.pooled_prompt_embeds = repeat_per_prompt(pooled, n)
        block_state.negative_prompt_embeds = None
        block_state.negative_pooled_prompt_embeds = None
        # The UNet decides whether guidance really runs (see `uses_guidance`); a guidance-
        # distilled UNet just leaves these unused.
        if block_state.guidance_scale > 1:
            if block_state.negative_prompt is None and components.force_zeros_for_empty_prompt:
                negative_embeds = torch.zeros_like(embeds)
                negative_pooled = torch.zeros_like(pooled)
            else:
                negatives = negative_prompt_list(block_state.negative_prompt or "", len(prompts),
                                                 self.path)
                negatives_2 = negative_prompt_list(
                    block_state.negative_prompt_2 or block_state.negative_prompt or "",
                    len(prompts), self.path)
                # Negatives never use clip_skip, as in diffusers.
                negative_embeds, negative_pooled = encode_with_both(
                    encoders, [negatives, negatives_2], device, -2, max_length=embeds.shape[1])
            block_state.negative_prompt_embeds = repeat_per_prompt(negative_embeds, n)
            block_state.negative_pooled_prompt_embeds = repeat_per_prompt(negative_pooled, n)
        block_state.batch_size = block_state.prompt_embeds.shape[0]
        self.set_block_state(state, block_state)
        return components, state
