"""A two-model test family (CLIP text encoder + VAEs) for loading and sharing tests.

Real model classes at tiny sizes, seeded, saved in diffusers' layout with a `model_index.json`
naming `TinyTestPipeline`, so `ModularPipeline.from_pretrained` finds these blocks for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from blocks import (
    AutoPipelineBlocks,
    ComponentSpec,
    InputParam,
    ModularPipelineBlocks,
    OutputParam,
    SequentialPipelineBlocks,
)
from blocks.families import Family, register_family
from blocks.tiny_checkpoint import reseed_constant_tensors

VAE_CONFIG = dict(
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
    layers_per_block=1, sample_size=16,
)


class TinyTextStep(ModularPipelineBlocks):
    expected_components = [ComponentSpec("text_encoder", CLIPTextModel)]
    inputs = [InputParam("prompt_ids", torch.Tensor, required=True)]
    intermediate_outputs = [OutputParam("text_embeds", torch.Tensor)]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        ids = block_state.prompt_ids.to(components._execution_device)
        block_state.text_embeds = components.text_encoder(ids).last_hidden_state
        self.set_block_state(state, block_state)
        return components, state


class TinyImageEncodeStep(ModularPipelineBlocks):
    expected_components = [ComponentSpec("image_encoder", AutoencoderKL)]
    inputs = [InputParam("image", torch.Tensor, required=True)]
    intermediate_outputs = [OutputParam("latents", torch.Tensor)]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        image = block_state.image.to(components._execution_device)
        block_state.latents = components.image_encoder.encode(image).latent_dist.mode()
        self.set_block_state(state, block_state)
        return components, state


class TinyImageEncoderAuto(AutoPipelineBlocks):
    block_classes = [TinyImageEncodeStep]
    block_names = ["encode"]
    block_trigger_inputs = ["image"]


class TinyDecodeStep(ModularPipelineBlocks):
    expected_components = [
        ComponentSpec("vae", AutoencoderKL),
        ComponentSpec("scheduler", EulerDiscreteScheduler, default_creation_method="from_config"),
    ]
    inputs = [InputParam("latents", torch.Tensor), InputParam("text_embeds", required=True)]
    intermediate_outputs = [OutputParam("images", torch.Tensor)]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        latents = block_state.latents
        if latents is None:
            latents = torch.zeros(1, 4, 4, 4, device=components._execution_device)
        latents = latents + block_state.text_embeds.mean()
        block_state.images = components.vae.decode(latents).sample
        self.set_block_state(state, block_state)
        return components, state


class TinyTestBlocks(SequentialPipelineBlocks):
    block_classes = [TinyTextStep, TinyImageEncoderAuto, TinyDecodeStep]
    block_names = ["text_encoder", "image_encoder", "decode"]
    _workflow_map = {
        "text2image": {"prompt_ids": True},
        "image2image": {"prompt_ids": True, "image": True},
    }


register_family(Family(name="tiny-test", blocks=TinyTestBlocks,
                       checkpoint_classes={"TinyTestPipeline": TinyTestBlocks}))


def tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    reseed_constant_tensors(vae, seed)
    return vae


def tiny_text_encoder(seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16,
    )
    model = CLIPTextModel(config)
    reseed_constant_tensors(model, seed)
    return model


def write_tiny_checkpoint(folder: Path, vae_seed: int = 1) -> Path:
    """A checkpoint with text_encoder, vae, image_encoder (same weights as vae) and scheduler."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_text_encoder(0).save_pretrained(folder / "text_encoder")
    tiny_vae(vae_seed).save_pretrained(folder / "vae")
    tiny_vae(vae_seed).save_pretrained(folder / "image_encoder")
    EulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "TinyTestPipeline",
        "_diffusers_version": "0.42.1",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
