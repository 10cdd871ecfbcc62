"""Stable Diffusion decoding: latents divided by the VAE's scaling factor, decoded, and turned
into PIL images, arrays or tensors by `blocks.image_processing.postprocess`.

`output_type="latent"` returns the denoised latents as they are (scaled, undecoded), as
diffusers does. There is no safety checker: images are returned as decoded.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from blocks.block import ModularPipelineBlocks
from blocks.image_processing import check_output_type, postprocess
from blocks.specs import ComponentSpec, InputParam, OutputParam


class StableDiffusionDecodeStep(ModularPipelineBlocks):
    model_name = "stable-diffusion"
    description = "Decodes the denoised latents with the VAE."
    expected_components = [ComponentSpec("vae", AutoencoderKL, "SD's VAE.")]
    inputs = [
        InputParam("latents", torch.Tensor, required=True, description="(B, c, h, w) denoised."),
        InputParam("output_type", str, default="pil",
                   description="'pil', 'np', 'pt', or 'latent' for the undecoded latents."),
    ]
    intermediate_outputs = [
        OutputParam("images", list, "PIL images, a (B, H, W, 3) array or a (B, 3, H, W) "
                                    "tensor in [0, 1], or the (B, c, h, w) latents."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        check_output_type(block_state.output_type, self.path)
        if block_state.output_type == "latent":
            block_state.images = block_state.latents
        else:
            vae = components.vae
            latents = block_state.latents.to(device=vae.device, dtype=vae.dtype)
            decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            block_state.images = postprocess(decoded, block_state.output_type)
        self.set_block_state(state, block_state)
        return components, state
