"""`--size real`: the factories build the published architectures, counted on the meta device.

Writing a real-size checkpoint takes minutes and gigabytes (that is `bench/gpu_check.py`'s
job on a GPU); here the very builders the factories use run on the meta device, and their
parameter counts must be the published models' (SD 1.5: CLIP ViT-L/14 text tower 123.06M,
UNet 859.52M, VAE 83.65M, its ControlNet 361.28M; FLUX.2-klein-4B: transformer 3.876B, VAE
84.05M, Qwen3-4B 4.022B).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blocks.flux2 import tiny_model as flux2
from blocks.stable_diffusion import tiny_model as sd
from blocks.tiny_checkpoint import build_seeded, check_size, default_weight_dtype
from blocks.tiny_unet_parts import build_clip_vocab
from service.cli import main as blockserve

META = torch.device("meta")


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd_real_is_sd_1_5() -> None:
    arch = sd.ARCHITECTURES["real"]
    vocab, _ = build_clip_vocab()
    counts = {name: _parameters(build_seeded(0, make, META)) for name, make in {
        "text_encoder": sd.text_encoder_model(arch, vocab),
        "unet": sd.unet_model(arch),
        "vae": sd.vae_model(arch),
        "controlnet": sd.controlnet_model(arch),
    }.items()}
    assert counts == {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863,
                      "controlnet": 361_279_120}
    unet = build_seeded(0, sd.unet_model(arch), META)
    assert unet.config.sample_size == 64 and unet.config.cross_attention_dim == 768


def test_flux2_klein_real_is_klein_4b_with_qwen3_4b() -> None:
    arch = flux2.ARCHITECTURES["real"]
    tokenizer = flux2._build_tokenizer()
    text_encoder = flux2._build_text_encoder(tokenizer, 0, arch, META)
    transformer = flux2._build_transformer(0, arch, META)
    vae = flux2._build_vae(0, arch, META)
    assert _parameters(text_encoder) == 4_022_468_096
    assert _parameters(transformer) == 3_875_544_576
    assert _parameters(vae) == 84_046_115
    # What the pipeline relies on: hidden states 9, 18, 27 exist; 3 stacked layers of width
    # 2560 feed the transformer; 2x2-packed 32-channel latents are its 128 input channels.
    assert text_encoder.config.num_hidden_layers == 36
    assert transformer.config.joint_attention_dim == 3 * 2560
    assert transformer.config.in_channels == 4 * vae.config.latent_channels == 128


def test_sizes_and_their_default_dtypes() -> None:
    assert default_weight_dtype("tiny") == torch.float32
    assert default_weight_dtype("real") == torch.bfloat16
    with pytest.raises(ValueError, match="size 'huge' is not one of tiny, real"):
        check_size("huge")
    with pytest.raises(ValueError, match="size 'huge'"):
        sd.write_tiny_sd("unused", size="huge")


def test_cli_size_errors_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, message in (
        (["sd", "--size", "real", "--depth"], "--size real: depth: the depth estimator exists "
                                              "at size 'tiny' only"),
        (["sd", "--size", "giant"], "argument --size: invalid choice: 'giant'"),
        (["sd", "--device", "toaster"], "--device 'toaster' is not a torch device"),
    ):
        with pytest.raises(SystemExit) as stop:
            blockserve(["tiny-model", argv[0], str(tmp_path / "out"), *argv[1:]])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written
