"""Checkpoints open both ways: what diffusers' modular pipeline saves, blocks loads, and the
reverse, with the same pixels; the class names in the index are diffusers' own.

For FLUX.2 [klein], distilled and base: diffusers' `ModularPipeline` opens the tiny
checkpoint, generates, and saves; blocks opens that folder and must make the same image
(max difference 0); blocks then saves, and diffusers opens blocks' folder and must make it
too. A folder saved from workflow-pruned blocks reopens with the family's full blocks in both
libraries. diffusers 0.42.1 has no modular Stable Diffusion 1.x/2.x pipeline, so SD has no
counterpart to open (its own round trip is in test_loading.py).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from diffusers.modular_pipelines import ModularPipeline as DiffusersModularPipeline

from blocks import ModularPipeline
from blocks.flux2 import Flux2KleinAutoBlocks
from blocks.flux2.tiny_model import write_tiny_flux2_klein

pytestmark = pytest.mark.usefixtures("quiet_diffusers")

CALL = {"prompt": "a red circle", "num_inference_steps": 2, "height": 32, "width": 32,
        "max_sequence_length": 32}
NAMES = {
    "distilled": ("Flux2KleinModularPipeline", "Flux2KleinAutoBlocks"),
    "base": ("Flux2KleinBaseModularPipeline", "Flux2KleinBaseAutoBlocks"),
}


@pytest.fixture(scope="module", params=["distilled", "base"])
def variant(request, tmp_path_factory) -> tuple[str, pathlib.Path]:
    folder = tmp_path_factory.mktemp(f"klein-{request.param}")
    return request.param, write_tiny_flux2_klein(folder, base=request.param == "base")


def _image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    images = pipe(**CALL, generator=torch.Generator().manual_seed(0), output="images")
    return np.asarray(images[0], dtype=np.int16)


def _diffusers(path: pathlib.Path) -> DiffusersModularPipeline:
    pipe = DiffusersModularPipeline.from_pretrained(str(path))
    pipe.load_components(dtype=torch.float32)
    return pipe


def _blocks(path: pathlib.Path) -> ModularPipeline:
    pipe = ModularPipeline.from_pretrained(str(path))
    pipe.load_components(dtype=torch.float32, strict=True)
    return pipe


def test_checkpoints_open_both_ways_with_the_same_pixels(variant, tmp_path):
    name, checkpoint = variant
    pipeline_class, blocks_class = NAMES[name]

    theirs = _diffusers(checkpoint)
    reference = _image(theirs)
    theirs.save_pretrained(str(tmp_path / "by-diffusers"), overwrite_modular_index=True)

    ours = _blocks(tmp_path / "by-diffusers")
    assert (type(ours).__name__, type(ours.blocks).__name__) == (pipeline_class, blocks_class)
    assert ours.null_component_names == []
    assert np.abs(_image(ours) - reference).max() == 0

    ours.save_pretrained(tmp_path / "by-blocks")
    index = json.loads((tmp_path / "by-blocks" / "modular_model_index.json").read_text())
    assert (index["_class_name"], index["_blocks_class_name"]) == (pipeline_class, blocks_class)
    assert index["is_distilled"] is (name == "distilled")
    card = (tmp_path / "by-blocks" / "README.md").read_text()  # the model card
    assert f"`{blocks_class}`" in card and "- flux2-klein" in card

    again = _diffusers(tmp_path / "by-blocks")
    assert type(again).__name__ == pipeline_class and again.null_component_names == []
    assert np.abs(_image(again) - reference).max() == 0


def test_a_workflow_pruned_save_reopens_with_the_full_blocks(variant, tmp_path):
    _, checkpoint = variant
    pruned = ModularPipeline.from_pretrained(str(checkpoint), workflow="text2image")
    assert type(pruned.blocks).__name__ == "SequentialPipelineBlocks"
    pruned.save_pretrained(tmp_path)

    ours = ModularPipeline.from_pretrained(str(tmp_path))
    theirs = DiffusersModularPipeline.from_pretrained(str(tmp_path))
    assert type(ours).__name__ == type(theirs).__name__ == type(pruned).__name__
    assert isinstance(ours.blocks, Flux2KleinAutoBlocks)
    assert list(ours.blocks.sub_blocks) == list(theirs.blocks.sub_blocks)
