"""The tiny FLUX.2 [klein] checkpoint: deterministic, loadable by diffusers, and runnable."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import Flux2KleinPipeline

from blocks.flux2.tiny_model import write_tiny_flux2_klein

PROMPT = "a red circle on a blue background"


def _file_digests(root: pathlib.Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _load(path: pathlib.Path) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def distilled_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_flux2_klein(tmp_path_factory.mktemp("klein"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_flux2_klein(tmp_path_factory.mktemp("klein_base"), base=True)


@pytest.fixture(scope="module")
def distilled(distilled_dir: pathlib.Path) -> Flux2KleinPipeline:
    return _load(distilled_dir)


def test_layout(distilled_dir: pathlib.Path) -> None:
    index = json.loads((distilled_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert index["is_distilled"] is True
    assert index["tokenizer"] == ["transformers", "Qwen2TokenizerFast"]
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (distilled_dir / name).is_dir()
    scheduler = json.loads((distilled_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"] is True
    assert scheduler["time_shift_type"] == "exponential"


def test_same_call_writes_identical_bytes(distilled_dir: pathlib.Path, tmp_path) -> None:
    again = write_tiny_flux2_klein(tmp_path / "again")
    assert _file_digests(again) == _file_digests(distilled_dir)


def test_seed_changes_weights(distilled_dir: pathlib.Path, tmp_path) -> None:
    other = _file_digests(write_tiny_flux2_klein(tmp_path / "other", seed=1))
    mine = _file_digests(distilled_dir)
    for name in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        assert other[name] != mine[name]


def test_caller_rng_is_untouched(tmp_path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    write_tiny_flux2_klein(tmp_path / "rng")
    assert torch.equal(torch.rand(3), expected)


def test_no_constant_floating_tensors(distilled: Flux2KleinPipeline) -> None:
    for component in (distilled.transformer, distilled.vae, distilled.text_encoder):
        tensors = dict(component.named_parameters())
        tensors.update(dict(component.named_buffers()))
        constant = [
            name
            for name, tensor in tensors.items()
            if tensor.is_floating_point()
            and tensor.numel() > 1
            and bool((tensor == tensor.flatten()[0]).all())
        ]
        assert constant == [], f"{type(component).__name__}: {constant}"


def test_sizes_follow_the_pipeline_constraints(distilled: Flux2KleinPipeline) -> None:
    text = distilled.text_encoder.config
    transformer = distilled.transformer.config
    assert text.num_hidden_layers >= 28  # hidden_states[27] is used
    assert transformer.joint_attention_dim == 3 * text.hidden_size
    assert transformer.in_channels == 4 * distilled.vae.config.latent_channels
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.guidance_embeds is False
    assert distilled.vae_scale_factor == 8


def test_chat_template_renders_like_qwen3(distilled: Flux2KleinPipeline) -> None:
    tokenizer = distilled.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text == (
        f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=64)["input_ids"]
    assert len(ids) == 64
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"
    # "<think>" is one added token, not a run of bytes.
    assert tokenizer.convert_tokens_to_ids("<think>") in ids


@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 32)])
def test_generates_an_image(distilled: Flux2KleinPipeline, height: int, width: int) -> None:
    image = distilled(
        prompt=PROMPT,
        height=height,
        width=width,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert isinstance(image, PIL.Image.Image)
    assert image.size == (width, height)
    assert np.asarray(image).std() > 0


def test_image_conditioning_runs(distilled: Flux2KleinPipeline) -> None:
    reference = PIL.Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    )
    images = distilled(
        image=reference,
        prompt=PROMPT,
        height=32,
        width=32,
        num_inference_steps=1,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 32, 32, 3)


def test_base_variant(distilled_dir: pathlib.Path, base_dir: pathlib.Path) -> None:
    index = json.loads((base_dir / "model_index.json").read_text())
    assert index["is_distilled"] is False
    # Only the flag differs: the weights are the distilled variant's.
    base_digests, distilled_digests = _file_digests(base_dir), _file_digests(distilled_dir)
    assert {k: v for k, v in base_digests.items() if k != "model_index.json"} == {
        k: v for k, v in distilled_digests.items() if k != "model_index.json"
    }

    pipe = _load(base_dir)
    assert pipe.config.is_distilled is False

    def run(guidance_scale: float) -> np.ndarray:
        return pipe(
            prompt=PROMPT,
            height=32,
            width=32,
            num_inference_steps=1,
            guidance_scale=guidance_scale,
            max_sequence_length=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    guided, unguided = run(4.0), run(1.0)
    assert guided.shape == (1, 32, 32, 3)
    # Classifier-free guidance (against the empty prompt) is active for the base variant.
    assert not np.allclose(guided, unguided)
