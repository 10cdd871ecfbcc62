"""The tiny SDXL checkpoint is deterministic, has SDXL's layout and loads in diffusers' SDXL
pipeline (its images are compared with ours in test_sdxl_parity.py)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import transformers
from diffusers import StableDiffusionXLPipeline

from blocks.stable_diffusion_xl.tiny_model import write_tiny_sdxl
from service.cli import main
from tests.unit.checkpoint_files import constant_tensors, digest

pytestmark = pytest.mark.usefixtures("quiet_diffusers")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "ckpt", controlnet=True)


def test_same_call_writes_identical_bytes(sdxl_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    assert digest(write_tiny_sdxl(tmp_path / "again", controlnet=True)) == digest(sdxl_dir)
    other_seed = write_tiny_sdxl(tmp_path / "other", seed=1)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (other_seed / unet).read_bytes() != (sdxl_dir / unet).read_bytes()
    with pytest.raises(FileExistsError):
        write_tiny_sdxl(sdxl_dir)


def test_layout_and_no_constant_tensor(sdxl_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert "controlnet" not in index and (sdxl_dir / "controlnet").is_dir()
    unet = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["cross_attention_dim"] == 72
    # Through the CLI: the family's declaration alone makes `blockserve tiny-model sdxl` work.
    inpaint = tmp_path / "inpaint"
    assert main(["tiny-model", "sdxl", str(inpaint), "--inpaint"]) == 0
    assert json.loads((inpaint / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionXLInpaintPipeline")
    assert json.loads((inpaint / "unet" / "config.json").read_text())["in_channels"] == 9
    assert constant_tensors(sorted(sdxl_dir.rglob("*.safetensors"))) == []


def test_second_tokenizer_pads_with_exclamation_marks(sdxl_dir: pathlib.Path) -> None:
    first = transformers.CLIPTokenizer.from_pretrained(sdxl_dir / "tokenizer")
    second = transformers.CLIPTokenizer.from_pretrained(sdxl_dir / "tokenizer_2")
    assert first.get_vocab() == second.get_vocab()
    assert first.pad_token == "<|endoftext|>" and second.pad_token == "!"
    ids = second("a red circle", padding="max_length", max_length=77).input_ids
    assert ids[-1] == second.convert_tokens_to_ids("!")


def test_diffusers_sdxl_pipeline_runs_it(sdxl_dir: pathlib.Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", negative_prompt="blurry", num_inference_steps=2, height=32,
                  width=48, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 48, 3) and images.std() > 0.01


def test_only_the_tiny_size_exists(tmp_path: pathlib.Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "sdxl", str(tmp_path / "out"), "--size", "real"])
    assert exit_info.value.code == 2
    assert "only size 'tiny' exists for SDXL" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_blockserve_opens_it_as_the_sdxl_pipeline_class(sdxl_dir: pathlib.Path) -> None:
    from blocks import ModularPipeline
    from blocks.stable_diffusion_xl import (
        StableDiffusionXLAutoBlocks,
        StableDiffusionXLModularPipeline,
    )

    pipe = ModularPipeline.from_pretrained(sdxl_dir)
    assert type(pipe) is StableDiffusionXLModularPipeline  # declared by the family
    assert type(pipe.blocks) is StableDiffusionXLAutoBlocks
    assert pipe.blocks.model_name == "stable-diffusion-xl"
    assert type(StableDiffusionXLAutoBlocks().init_pipeline()) is StableDiffusionXLModularPipeline
