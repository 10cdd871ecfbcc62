"""Stable Diffusion 1.x/2.x's text encoder stage: prompts to CLIP embeddings.

Prompts are padded to the tokenizer's `model_max_length` (77 for CLIP), run through the CLIP
text encoder, and the last hidden state (after the final layer norm) is the conditioning;
`clip_skip=k` takes the hidden state k layers earlier, through the same layer norm. With
`guidance_scale > 1` the negative prompt (empty by default) is encoded too.

Not handled here: images (`blocks.unet_vae` encodes them); prompt weighting and textual
inversion.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from blocks.block import ModularPipelineBlocks
from blocks.prompts import (
    check_clip_skip,
    check_images_per_prompt,
    negative_prompt_list,
    prompt_list,
    repeat_per_prompt,
    tokenize_padded,
)
from blocks.specs import ComponentSpec, InputParam, OutputParam

DEFAULT_GUIDANCE_SCALE = 7.5


def encode_prompts(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    prompts: list[str],
    device: torch.device,
    max_length: int | None = None,
    clip_skip: int | None = None,
) -> torch.Tensor:
    """(P, L, D) CLIP embeddings of P prompts, in the text encoder's dtype, on `device`."""
    tokens = tokenize_padded(tokenizer, prompts, max_length)
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(text_encoder.device)
    input_ids = tokens.input_ids.to(text_encoder.device)
    if clip_skip is None:
        embeds = text_encoder(input_ids, attention_mask=attention_mask)[0]
    else:
        output = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        # The final layer norm belongs to the representation the UNet was trained on, so the
        # earlier layer goes through it too. (transformers < 5 nests it under `text_model`.)
        final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        embeds = final_layer_norm(output.hidden_states[-(clip_skip + 1)])
    return embeds.to(dtype=text_encoder.dtype, device=device)


class StableDiffusionTextEncoderStep(ModularPipelineBlocks):
    model_name = "stable-diffusion"
    description = (
        "Encodes the prompts with CLIP, and the negative prompts when guidance_scale > 1 "
        "(for classifier-free guidance)."
    )
    expected_components = [
        ComponentSpec("text_encoder", CLIPTextModel, "CLIP text encoder."),
        ComponentSpec("tokenizer", CLIPTokenizer, "CLIP tokenizer."),
    ]
    inputs = [
        InputParam("prompt", str | list[str], required=True, description="What to draw."),
        InputParam("negative_prompt", str | list[str],
                   description="What to steer away from (with guidance); '' by default."),
        InputParam("num_images_per_prompt", int, default=1),
        InputParam("guidance_scale", float, default=DEFAULT_GUIDANCE_SCALE,
                   description="Classifier-free guidance scale; > 1 enables it."),
        InputParam("clip_skip", int,
                   description="Use the hidden state this many layers before the last."),
    ]
    intermediate_outputs = [
        OutputParam("prompt_embeds", torch.Tensor, "(B, 77, D) text embeddings.",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("negative_prompt_embeds", torch.Tensor,
                    "(B, 77, D) negative embeddings; None when guidance_scale <= 1.",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("batch_size", int, "Number of images: prompts x num_images_per_prompt."),
        OutputParam("guidance_scale", float, "The guidance scale in effect (SD's default "
                                             f"{DEFAULT_GUIDANCE_SCALE} when not given)."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        prompts = prompt_list(block_state.prompt, self.path)
        n = check_images_per_prompt(block_state.num_images_per_prompt, self.path)
        clip_skip = block_state.clip_skip
        check_clip_skip(clip_skip, components.text_encoder.config.num_hidden_layers, self.path)
        device = components._execution_device
        embeds = encode_prompts(components.text_encoder, components.tokenizer, prompts, device,
                                clip_skip=clip_skip)
        block_state.prompt_embeds = repeat_per_prompt(embeds, n)
        block_state.negative_prompt_embeds = None
        # The UNet decides whether guidance really runs (see `uses_guidance`); a guidance-
        # distilled UNet just leaves these unused.
        if block_state.guidance_scale > 1:
            negatives = negative_prompt_list(block_state.negative_prompt, len(prompts), self.path)
            # Negatives never use clip_skip, as in diffusers.
            negative_embeds = encode_prompts(components.text_encoder, components.tokenizer,
                                             negatives, device, max_length=embeds.shape[1])
            block_state.negative_prompt_embeds = repeat_per_prompt(negative_embeds, n)
        block_state.batch_size = block_state.prompt_embeds.shape[0]
        self.set_block_state(state, block_state)
        return components, state
