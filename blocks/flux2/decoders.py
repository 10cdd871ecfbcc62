"""FLUX.2 [klein] decoding: packed latent tokens back to VAE latents, then to images.

Tokens are put back on their (h, w) grid by their position ids, de-normalised with the VAE's
batch-norm statistics and unpatchified to (B, c, 2h, 2w) VAE latents. `output_type="latent"`
returns those VAE latents without decoding (as the reference pipeline does); otherwise the
VAE decodes them and `blocks.image_processing.postprocess` makes PIL images, arrays or tensors.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2

from blocks.block import ModularPipelineBlocks
from blocks.flux2 import latent_layout
from blocks.image_processing import check_output_type, postprocess
from blocks.specs import ComponentSpec, InputParam, OutputParam


class Flux2KleinDecodeStep(ModularPipelineBlocks):
    model_name = "flux2-klein"
    description = "Unpacks the denoised tokens and decodes them with the VAE."
    expected_components = [ComponentSpec("vae", AutoencoderKLFlux2, "FLUX.2's VAE.")]
    inputs = [
        InputParam("latents", torch.Tensor, required=True, description="(B, S, C) tokens."),
        InputParam("latent_ids", torch.Tensor, required=True, description="(B, S, 4) their ids."),
        InputParam("output_type", str, default="pil",
                   description="'pil', 'np', 'pt', or 'latent' for undecoded VAE latents."),
    ]
    intermediate_outputs = [
        OutputParam("images", list, "PIL images, a (B, H, W, 3) array, a (B, 3, H, W) tensor "
                                    "in [0, 1], or (B, c, H/8, W/8) VAE latents."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        check_output_type(block_state.output_type, self.path)
        vae = components.vae
        latents = latent_layout.unpack(block_state.latents, block_state.latent_ids)
        latents = latent_layout.unpatchify(latent_layout.denormalise(latents, vae))
        if block_state.output_type == "latent":
            block_state.images = latents
        else:
            decoded = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
            block_state.images = postprocess(decoded, block_state.output_type)
        self.set_block_state(state, block_state)
        return components, state
