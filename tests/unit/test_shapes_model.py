"""The committed tiny shapes model (assets/tiny-shapes-sd) loads through blockserve's
`ModularPipeline`, draws what it is asked for (held-out combinations included), matches
diffusers' own pipeline, and the training recipe that made it is deterministic."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
import torch

from blocks.pipeline import ModularPipeline
from recipes.shapes.evaluation import (
    THRESHOLDS,
    ShapesReport,
    evaluate_shapes,
    load_shapes_pipeline,
)
from recipes.shapes.training import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, train_shapes

CHECKPOINT = pathlib.Path(__file__).resolve().parents[2] / "assets" / "tiny-shapes-sd"
MAX_WEIGHT_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # A 64x64 model gains nothing from a second OpenMP thread, and on a 2-core machine shared
    # with other work that thread mostly waits for a busy core: measured 30-100 s per image
    # with 2 threads against 0.4 s with 1 while a training run held the other core.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipe() -> ModularPipeline:
    return load_shapes_pipeline(CHECKPOINT)


@pytest.fixture(scope="module")
def report(pipe: ModularPipeline) -> ShapesReport:
    # The first 12 evaluation prompts: 6 held-out and 6 seen combinations.
    return evaluate_shapes(CHECKPOINT, prompts=12, pipeline=pipe)


def test_checkpoint_is_a_standard_sd_folder() -> None:
    index = json.loads((CHECKPOINT / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    weights = sorted(CHECKPOINT.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"text_encoder", "unet", "vae"}
    assert sum(w.stat().st_size for w in weights) <= MAX_WEIGHT_BYTES


def test_loads_through_modular_pipeline(pipe: ModularPipeline) -> None:
    assert type(pipe.blocks).__name__ == "StableDiffusionAutoBlocks"
    loaded = {name: type(c).__name__ for name, c in pipe.components.items() if c is not None}
    assert loaded["unet"] == "UNet2DConditionModel"
    assert loaded["scheduler"] == "DDIMScheduler"


def test_prompt_adherence_on_seen_and_held_out_prompts(report: ShapesReport) -> None:
    assert report.count("held_out") >= 6
    assert report.steps == DEFAULT_STEPS
    accuracy = report.accuracy()
    for metric, bound in THRESHOLDS.items():
        assert accuracy[metric] >= bound, (metric, accuracy)


def test_matches_diffusers_pipeline(pipe: ModularPipeline) -> None:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        CHECKPOINT, safety_checker=None, requires_safety_checker=False
    )
    reference.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue background"  # a held-out combination
    kwargs = {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE_SCALE,
              "output_type": "np"}
    ours = pipe(prompt=prompt, generator=torch.Generator().manual_seed(3), output="images",
                **kwargs)
    theirs = reference(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_training_is_deterministic(tmp_path: pathlib.Path) -> None:
    tiny = {"vae_steps": 2, "unet_steps": 2, "pool_size": 8, "vae_batch_size": 2,
            "unet_batch_size": 4, "warmup_steps": 1, "log": lambda _message: None}
    digests = []
    for run in ("a", "b"):
        out = train_shapes(tmp_path / run, seed=5, **tiny)
        files = sorted(p for p in out.rglob("*") if p.is_file())
        digests.append({p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in files if p.name != "training.json"})
    assert digests[0] == digests[1]
    loaded = ModularPipeline.from_pretrained(str(tmp_path / "a"))
    loaded.load_components()
    assert loaded.components["unet"] is not None
