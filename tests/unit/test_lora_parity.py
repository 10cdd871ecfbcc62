"""LoRA loading against diffusers' `load_lora_weights` + `set_adapters`, per format and family.

Both sides load the same random-weight LoRA files (`blocks.lora.tiny_lora`, written to disk so
diffusers' header metadata is read too) into the same tiny checkpoints; images must agree to
1e-4. Formats: diffusers/peft keys with `lora_alpha` in the header, kohya keys with `.alpha`
(Stable Diffusion: every Linear and Conv2d of the UNet and text encoder; SDXL: the same over
both text encoders, `lora_te1_`/`lora_te2_`; FLUX.2 [klein]: BFL module names, fused `qkv`
included). Also: adapter weights per component, disable/enable,
fuse/unfuse (weights restored bit for bit), unload, and the errors a bad file gets.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, StableDiffusionPipeline

from blocks import ModularPipeline
from blocks.flux2.tiny_model import write_tiny_flux2_klein
from blocks.lora import LoraFileError, write_lora_file
from blocks.lora.tiny_lora import random_lora
from blocks.stable_diffusion.tiny_model import write_tiny_sd

pytestmark = pytest.mark.usefixtures("quiet_diffusers")
IMAGES_TOL = 1e-4
SD_CALL = {"prompt": "a red circle", "num_inference_steps": 2, "height": 32, "width": 32}
FLUX_CALL = {**SD_CALL, "max_sequence_length": 32}


def _every_module(path: str, module: torch.nn.Module) -> bool:
    return True


def _image(pipe, call: dict) -> np.ndarray:
    return pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images


def _ours(path: pathlib.Path) -> ModularPipeline:
    pipe = ModularPipeline.from_pretrained(str(path))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _start_pair(factory: pytest.TempPathFactory, name: str, write, reference_class,
                call: dict, **reference_kwargs):
    """(folder, diffusers' pipeline, ours, our base image) on a new tiny checkpoint that
    `write` makes in a temporary folder `name`; adapters are loaded by the caller."""
    root = factory.mktemp(name)
    checkpoint = write(root / "ckpt")
    reference = reference_class.from_pretrained(checkpoint, **reference_kwargs)
    reference.set_progress_bar_config(disable=True)
    ours = _ours(checkpoint)
    return root, reference, ours, _image(ours, call)


def _assert_adapters_match(pair, names, weights, call: dict, min_change: float) -> None:
    reference, ours, base = pair
    for pipe in (reference, ours):
        pipe.set_adapters(names, weights)
    expected, got = _image(reference, call), _image(ours, call)
    assert np.abs(expected - got).max() <= IMAGES_TOL
    assert np.abs(got - base).max() > min_change  # the adapter really changes the image


def _assert_fuse_unfuse_round_trip(pair, names, weights, call: dict, denoiser: str) -> None:
    """Fused adapters give diffusers' fused image and the unfused one (within tolerance);
    unfusing restores the denoiser's weights and image exactly."""
    reference, ours, _ = pair
    for pipe in (reference, ours):
        pipe.set_adapters(names, weights)
    unfused = _image(ours, call)
    model = getattr(ours, denoiser)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for pipe in (reference, ours):
        pipe.fuse_lora()
    fused = _image(ours, call)
    assert np.abs(fused - _image(reference, call)).max() <= IMAGES_TOL
    assert np.abs(fused - unfused).max() <= IMAGES_TOL
    for pipe in (reference, ours):
        pipe.unfuse_lora()
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert np.array_equal(_image(ours, call), unfused)


# -- Stable Diffusion -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_pair(tmp_path_factory: pytest.TempPathFactory):
    """(diffusers, ours, base image) with two adapters loaded into both: `pixel` (peft keys,
    attention projections, alpha 8 at rank 4 from the header) and `ink` (kohya keys, every
    Linear and Conv2d of the UNet and text encoder, alpha 2)."""
    root, reference, ours, base = _start_pair(tmp_path_factory, "sd_lora", write_tiny_sd,
                                              StableDiffusionPipeline, SD_CALL,
                                              safety_checker=None)
    models = {"unet": reference.unet, "text_encoder": reference.text_encoder}
    pixel = write_lora_file(root / "pixel" / "pytorch_lora_weights.safetensors",
                            *random_lora(models, rank=4, alpha=8, seed=1))
    ink_tensors, _ = random_lora(models, rank=4, alpha=2, seed=2, layout="kohya",
                                 targets=_every_module, std=0.05)
    # A1111 files name CLIP's modules from its checkpoint root, `text_model.`.
    ink_tensors = {key.replace("lora_te_", "lora_te_text_model_"): value
                   for key, value in ink_tensors.items()}
    ink = write_lora_file(root / "ink.safetensors", ink_tensors)
    for pipe in (reference, ours):
        pipe.load_lora_weights(pixel.parent, adapter_name="pixel")
        pipe.load_lora_weights(str(ink), adapter_name="ink")
    # diffusers: the adapter loaded last is the only active one.
    assert ours.get_active_adapters() == reference.get_active_adapters() == ["ink"]
    return reference, ours, base


@pytest.mark.parametrize(("names", "weights"), [
    ("pixel", None),
    ("ink", None),
    (["pixel", "ink"], [0.7, {"unet": 0.4, "text_encoder": 0.9}]),
])
def test_sd_adapters_match_diffusers(sd_pair, names, weights):
    _assert_adapters_match(sd_pair, names, weights, SD_CALL, min_change=0.05)


def test_sd_adapter_lists_match_diffusers(sd_pair):
    reference, ours, _ = sd_pair
    assert ours.get_list_adapters() == reference.get_list_adapters() == {
        "unet": ["pixel", "ink"], "text_encoder": ["pixel", "ink"]}
    for pipe in (reference, ours):
        pipe.set_adapters(["ink", "pixel"])
    assert ours.get_active_adapters() == reference.get_active_adapters() == ["ink", "pixel"]


def test_sd_disable_fuse_unfuse_round_trip(sd_pair):
    reference, ours, base = sd_pair
    for pipe in (reference, ours):
        pipe.set_adapters(["pixel", "ink"], [0.5, 0.8])
    unfused = _image(ours, SD_CALL)
    weights = {name: tensor.clone() for name, tensor in ours.unet.state_dict().items()}

    for pipe in (reference, ours):
        pipe.disable_lora()
    assert np.array_equal(_image(ours, SD_CALL), base)
    for pipe in (reference, ours):
        pipe.enable_lora()
        pipe.fuse_lora()
    fused = _image(ours, SD_CALL)
    assert np.abs(fused - _image(reference, SD_CALL)).max() <= IMAGES_TOL
    assert np.abs(fused - unfused).max() <= IMAGES_TOL
    assert not torch.equal(ours.unet.state_dict()["conv_in.weight"], weights["conv_in.weight"])

    for pipe in (reference, ours):
        pipe.unfuse_lora()
    assert all(torch.equal(tensor, weights[name])
               for name, tensor in ours.unet.state_dict().items())
    assert np.array_equal(_image(ours, SD_CALL), unfused)


def test_sd_lora_errors_name_the_problem(sd_pair, tmp_path):
    _, ours, _ = sd_pair
    with pytest.raises(ValueError, match="not loaded; loaded: \\['ink', 'pixel'\\]"):
        ours.set_adapters("nope")
    with pytest.raises(ValueError, match="already in use"):
        ours.load_lora_weights({}, adapter_name="pixel")
    bad = {"unet.no_such_block.to_q.lora_A.weight": torch.zeros(2, 4),
           "unet.no_such_block.to_q.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(LoraFileError, match=r"match no Linear or Conv2d.*no_such_block"):
        ours.load_lora_weights(bad, adapter_name="bad")
    wrong = {"unet.conv_in.lora_A.weight": torch.zeros(2, 5, 3, 3),
             "unet.conv_in.lora_B.weight": torch.zeros(32, 2, 1, 1)}
    with pytest.raises(LoraFileError, match="conv_in is Conv2d 4 -> 32"):
        ours.load_lora_weights(wrong, adapter_name="wrong")
    dora = {"unet.conv_in.lora_magnitude_vector": torch.zeros(2)}
    with pytest.raises(LoraFileError, match="only plain LoRA"):
        ours.load_lora_weights(dora, adapter_name="dora")
    with pytest.raises(LoraFileError, match="pass weight_name"):
        (tmp_path / "a.safetensors").write_bytes(b"")
        (tmp_path / "b.safetensors").write_bytes(b"")
        ours.load_lora_weights(tmp_path)
    assert ours.get_list_adapters()["unet"] == ["pixel", "ink"]  # nothing half-loaded


def test_sd_unload_keeps_what_was_fused(sd_pair):
    reference, ours, base = sd_pair
    for pipe in (reference, ours):
        pipe.set_adapters("pixel")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    assert ours.get_list_adapters() == {}
    fused = _image(ours, SD_CALL)
    assert np.abs(fused - _image(reference, SD_CALL)).max() <= IMAGES_TOL
    assert np.abs(fused - base).max() > 0.05


# -- FLUX.2 [klein] ---------------------------------------------------------------------------


def _bfl_kohya_lora(seed: int = 3) -> dict[str, torch.Tensor]:
    """kohya keys with BFL's module names for the tiny FLUX.2 transformer (width 32, one
    double and one single block), fused qkv projections included."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, fan_in, fan_out, rank in [
        ("double_blocks_0_img_attn_qkv", 32, 96, 4), ("double_blocks_0_txt_attn_qkv", 32, 96, 6),
        ("double_blocks_0_img_attn_proj", 32, 32, 4), ("double_blocks_0_img_mlp_0", 32, 192, 4),
        ("double_blocks_0_txt_mlp_2", 96, 32, 4), ("single_blocks_0_linear1", 32, 288, 4),
        ("single_blocks_0_linear2", 128, 32, 4), ("img_in", 16, 32, 4),
        ("final_layer_linear", 32, 16, 4),
    ]:
        key = f"lora_unet_{name}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    return tensors


@pytest.fixture(scope="module")
def flux_pair(tmp_path_factory: pytest.TempPathFactory):
    root, reference, ours, base = _start_pair(tmp_path_factory, "flux_lora",
                                              write_tiny_flux2_klein, Flux2KleinPipeline,
                                              FLUX_CALL)
    peft = write_lora_file(root / "peft.safetensors", *random_lora(
        {"transformer": reference.transformer}, rank=4, alpha=8, seed=1, targets=_every_module))
    kohya = write_lora_file(root / "kohya.safetensors", _bfl_kohya_lora())
    for pipe in (reference, ours):
        pipe.load_lora_weights(str(peft), adapter_name="peft")
        pipe.load_lora_weights(str(kohya), adapter_name="kohya")
    return reference, ours, base


@pytest.mark.parametrize(("names", "weights"), [
    ("peft", None), ("kohya", None), (["peft", "kohya"], [0.6, 1.3])])
def test_flux2_adapters_match_diffusers(flux_pair, names, weights):
    _assert_adapters_match(flux_pair, names, weights, FLUX_CALL, min_change=0.02)


def test_flux2_fuse_unfuse_round_trip(flux_pair):
    _assert_fuse_unfuse_round_trip(flux_pair, ["peft", "kohya"], [0.6, 1.3], FLUX_CALL,
                                   "transformer")


# -- Stable Diffusion XL ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory: pytest.TempPathFactory):
    """(diffusers, ours, base image) with `pixel` (peft keys on the UNet and both text
    encoders) and `ink` (kohya keys, `lora_te1_`/`lora_te2_` for the two text encoders) loaded
    into both."""
    from diffusers import StableDiffusionXLPipeline

    from blocks.stable_diffusion_xl.tiny_model import write_tiny_sdxl

    root, reference, ours, base = _start_pair(tmp_path_factory, "sdxl_lora", write_tiny_sdxl,
                                              StableDiffusionXLPipeline, SD_CALL)
    models = {"unet": reference.unet, "text_encoder": reference.text_encoder,
              "text_encoder_2": reference.text_encoder_2}
    pixel = write_lora_file(root / "pixel" / "pytorch_lora_weights.safetensors",
                            *random_lora(models, rank=4, alpha=8, seed=1))
    # Every Linear and Conv2d but the UNet's `add_embedding`: diffusers' kohya converter reads
    # `lora_unet_add_embedding_linear_1` as `add.embedding.linear` and refuses the file (ours
    # applies it; kohya's own SDXL files name that module `label_emb`, in SGM's naming).
    ink_tensors, _ = random_lora(models, rank=4, alpha=2, seed=2, layout="kohya",
                                 targets=lambda path, module: "add_embedding" not in path,
                                 std=0.05)
    # SDXL's A1111 files: `lora_te1_` and `lora_te2_`, CLIP's modules named from `text_model.`
    # (the second encoder's paths start there already).
    ink_tensors = {key.replace("lora_te_", "lora_te1_text_model_"): value
                   for key, value in ink_tensors.items()}
    ink = write_lora_file(root / "ink.safetensors", ink_tensors)
    for pipe in (reference, ours):
        pipe.load_lora_weights(pixel.parent, adapter_name="pixel")
        pipe.load_lora_weights(ink, adapter_name="ink")
    return reference, ours, base


@pytest.mark.parametrize(("names", "weights"), [
    ("pixel", None),
    ("ink", None),
    (["pixel", "ink"], [0.7, {"unet": 0.4, "text_encoder": 0.9, "text_encoder_2": 0.5}]),
])
def test_sdxl_adapters_match_diffusers(sdxl_pair, names, weights):
    _assert_adapters_match(sdxl_pair, names, weights, SD_CALL, min_change=0.05)


def test_sdxl_fuse_unfuse_round_trip(sdxl_pair):
    _assert_fuse_unfuse_round_trip(sdxl_pair, ["pixel", "ink"], [0.7, 0.6], SD_CALL, "unet")
