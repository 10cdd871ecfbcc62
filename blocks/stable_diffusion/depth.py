"""A custom block: depth maps for a depth ControlNet, made with Depth Anything.

This is the example to copy when adding your own step to a pipeline. A block is a pure
definition: it declares the components it needs (`ComponentSpec`), what it reads
(`InputParam`) and what it writes (`OutputParam`) at the top of its class, and `__call__`
only reads its state, computes, and writes its state back. Insert it where its output is
needed:

    blocks = StableDiffusionAutoBlocks()
    blocks.sub_blocks.pop("vae_encoder")  # the image guides through its depth, not its latents
    blocks.sub_blocks.insert("depth", DepthProcessorBlock(), 1)  # image -> control_image
    blocks.sub_blocks["denoise"] = StableDiffusionControlNetDenoiseStep()

Its components default to the checkpoint's `depth_processor/` folder (model and image
processor side by side); point the specs at a Hub repo such as
"depth-anything/Depth-Anything-V2-Small-hf" to use a real model.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import DepthAnythingForDepthEstimation, DPTImageProcessorPil

from blocks.block import ModularPipelineBlocks
from blocks.errors import InvalidInput
from blocks.image_processing import image_list
from blocks.specs import ComponentSpec, InputParam, OutputParam


def normalise_depth(depth: torch.Tensor) -> torch.Tensor:
    """(H, W) depth -> [0, 1] (min-max; a flat map becomes 0)."""
    low, high = depth.min(), depth.max()
    if high <= low:
        return torch.zeros_like(depth)
    return (depth - low) / (high - low)


class DepthProcessorBlock(ModularPipelineBlocks):
    model_name = "stable-diffusion"
    description = (
        "Estimates a depth map of each image with Depth Anything, as a 3-channel image at "
        "the image's size, for a depth ControlNet."
    )
    expected_components = [
        ComponentSpec("depth_processor", DepthAnythingForDepthEstimation,
                      "Depth Anything depth estimator.", subfolder="depth_processor"),
        # The PIL-backed processor: it needs no torchvision and is the same on every machine.
        ComponentSpec("depth_image_processor", DPTImageProcessorPil,
                      "Resizes and normalises images for the depth estimator.",
                      subfolder="depth_processor"),
    ]
    inputs = [
        InputParam("image", Image.Image | list, required=True,
                   description="PIL image(s) to estimate depth of."),
    ]
    intermediate_outputs = [
        OutputParam("control_image", list,
                    "One RGB PIL image per input: depth in [0, 255], near is bright."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        model = components.depth_processor
        processor = components.depth_image_processor
        depth_images = []
        for image in image_list(block_state.image):
            if not isinstance(image, Image.Image):
                raise InvalidInput(f"{self.path}: image must be PIL image(s), "
                                   f"got {type(image).__name__}", "image")
            image = image.convert("RGB")
            # One image at a time: images may differ in size, and a map never depends on
            # its batch.
            pixels = processor(images=image, return_tensors="pt").pixel_values
            output = model(pixel_values=pixels.to(model.device, model.dtype))
            depth = processor.post_process_depth_estimation(
                output, target_sizes=[(image.height, image.width)]
            )[0]["predicted_depth"]  # (H, W)
            depth = normalise_depth(depth.float()).cpu().numpy()
            grey = (depth * 255.0).round().astype(np.uint8)
            depth_images.append(Image.fromarray(grey).convert("RGB"))
        block_state.control_image = depth_images
        self.set_block_state(state, block_state)
        return components, state
