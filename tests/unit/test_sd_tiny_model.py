"""The tiny Stable Diffusion checkpoint is deterministic and loads in diffusers' own pipelines."""

from __future__ import annotations

import json
import pathlib

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open

from blocks.stable_diffusion.tiny_model import write_tiny_sd
from blocks.tiny_unet_parts import MODEL_MAX_LENGTH
from tests.unit.checkpoint_files import constant_tensors, digest

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_sd(tmp_path_factory.mktemp("sd") / "ckpt", controlnet=True, depth=True)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_sd(tmp_path_factory.mktemp("sd_inpaint") / "ckpt", inpaint=True)


pytestmark = pytest.mark.usefixtures("quiet_diffusers")


def _image(size: int, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask(size: int) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask)


def _run(pipe: diffusers.DiffusionPipeline, size: int, **kwargs: object) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        negative_prompt="blurry",
        num_inference_steps=2,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    )
    return out.images


def test_same_call_writes_identical_bytes(sd_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = write_tiny_sd(tmp_path / "again", controlnet=True, depth=True)
    assert digest(again) == digest(sd_dir)
    other_seed = write_tiny_sd(tmp_path / "other", seed=1)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (other_seed / unet).read_bytes() != (sd_dir / unet).read_bytes()


def test_refuses_non_empty_dir(sd_dir: pathlib.Path) -> None:
    with pytest.raises(FileExistsError):
        write_tiny_sd(sd_dir)


def test_layout(sd_dir: pathlib.Path, inpaint_dir: pathlib.Path) -> None:
    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    # The extras live beside the pipeline, not in it.
    assert "controlnet" not in index and "depth_processor" not in index
    for name in ("controlnet", "depth_processor", "tokenizer", "text_encoder", "unet", "vae"):
        assert (sd_dir / name).is_dir()
    assert sorted(p.name for p in (sd_dir / "tokenizer").iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    # The hub's key layout, which real SD checkpoints have (transformers 5 would drop the prefix).
    with safe_open(sd_dir / "text_encoder" / "model.safetensors", "pt") as tensors:
        assert all(name.startswith("text_model.") for name in tensors.keys())  # noqa: SIM118
    inpaint_index = json.loads((inpaint_dir / "model_index.json").read_text())
    assert inpaint_index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert json.loads((inpaint_dir / "unet" / "config.json").read_text())["in_channels"] == 9
    assert not (inpaint_dir / "controlnet").exists()


def test_no_floating_tensor_is_constant(sd_dir: pathlib.Path, inpaint_dir: pathlib.Path) -> None:
    files = sorted(sd_dir.rglob("*.safetensors")) + sorted(inpaint_dir.rglob("*.safetensors"))
    assert len(files) == 8  # 5 models, then the inpaint checkpoint's 3
    assert constant_tensors(files) == []


def test_tokenizer_pads_and_truncates_to_77(sd_dir: pathlib.Path) -> None:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH == 77
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens([bos, eos]) == ["<|startoftext|>", "<|endoftext|>"]
    assert tokenizer.pad_token_id == eos
    batch = tokenizer(
        [PROMPT, "word " * 200],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = batch.input_ids
    assert ids.shape == (2, 77)
    assert ids[:, 0].tolist() == [bos, bos]
    assert ids[1, -1].item() == eos  # truncation keeps the closing <|endoftext|>
    short = tokenizer(PROMPT).input_ids
    assert 4 < len(short) < 77 and len(set(short)) > 4  # several distinct real tokens
    assert ids[0, : len(short)].tolist() == short
    assert ids[0, len(short) :].eq(eos).all()  # SD 1.x pads with <|endoftext|>
    assert tokenizer.convert_ids_to_tokens(short)[1] == "a</w>"  # CLIP's end-of-word suffix


@pytest.mark.parametrize("size", [32, 64])
def test_text2img(sd_dir: pathlib.Path, size: int) -> None:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir)
    assert pipe.vae_scale_factor == 4
    assert isinstance(pipe.scheduler, diffusers.EulerDiscreteScheduler)
    images = _run(pipe, size)
    assert images.shape == (1, size, size, 3)
    assert images.std() > 0.05  # a real picture, neither blank nor saturated
    assert (images == 0).mean() < 0.5 and (images == 1).mean() < 0.5


def test_img2img(sd_dir: pathlib.Path) -> None:
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT,
        image=_image(32),
        strength=0.75,
        num_inference_steps=4,  # strength 0.75 of 4 steps runs 3
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("nine_channels", [True, False])
def test_inpaint(sd_dir: pathlib.Path, inpaint_dir: pathlib.Path, nine_channels: bool) -> None:
    # The 9-channel UNet is the dedicated inpaint model; a 4-channel UNet takes diffusers'
    # latent-blending path instead, and both must work.
    folder = inpaint_dir if nine_channels else sd_dir
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder)
    assert pipe.unet.config.in_channels == (9 if nine_channels else 4)
    images = _run(pipe, 64, image=_image(64), mask_image=_mask(64))
    assert images.shape == (1, 64, 64, 3)


def test_controlnet(sd_dir: pathlib.Path) -> None:
    controlnet = diffusers.ControlNetModel.from_pretrained(sd_dir / "controlnet")
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        sd_dir, controlnet=controlnet
    )
    with_control = _run(pipe, 32, image=_image(32))
    without_control = _run(pipe, 32, image=_image(32), controlnet_conditioning_scale=0.0)
    assert with_control.shape == (1, 32, 32, 3)
    # The zero-initialised output convs were re-drawn, so the control image really steers.
    assert np.abs(with_control - without_control).max() > 1e-3


def test_depth_model(sd_dir: pathlib.Path) -> None:
    folder = sd_dir / "depth_processor"
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    model = transformers.DepthAnythingForDepthEstimation.from_pretrained(folder).eval()
    image = _image(48).resize((56, 40))
    inputs = processor(images=image, return_tensors="pt")
    # keep_aspect_ratio + ensure_multiple_of=4 around the 32x32 target.
    assert inputs.pixel_values.shape == (1, 3, 32, 44)
    with torch.no_grad():
        outputs = model(**inputs)
    depth = outputs.predicted_depth
    assert depth.shape == (1, 32, 44)
    assert (depth > 0).float().mean() > 0.5 and depth.std() > 0.1  # the ReLU is not dead
    resized = processor.post_process_depth_estimation(outputs, target_sizes=[(40, 56)])
    assert resized[0]["predicted_depth"].shape == (40, 56)
