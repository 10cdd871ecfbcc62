"""`blockserve train-shapes`, `train-lora-shapes` and `eval-shapes`: argument handling, errors
that name the flag, one real train -> eval round trip at toy size (seconds, not the hour the
real recipe takes), and the LoRA training's seeding at toy size."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from PIL import Image

from blocks.lora import read_lora_file
from recipes.shapes import lora_training, training
from service.cli import main
from tests.unit.test_shapes_model import CHECKPOINT, one_torch_thread  # noqa: F401 (autouse)

# On top of --vae-steps/--unet-steps, which the CLI passes: what keeps a training run tiny.
TINY_TRAINING = {"pool_size": 8, "vae_batch_size": 2, "unet_batch_size": 4, "warmup_steps": 1,
                 "log": lambda _message: None}


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "toy-shapes"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "train_shapes",
                      functools.partial(training.train_shapes, **TINY_TRAINING))
        assert main(["train-shapes", str(out), "--seed", "1", "--vae-steps", "2",
                     "--unet-steps", "2"]) == 0
    return out


def test_train_shapes_writes_a_checkpoint(toy_checkpoint: Path) -> None:
    assert (toy_checkpoint / "model_index.json").is_file()
    assert (toy_checkpoint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (toy_checkpoint.parent / f".{toy_checkpoint.name}.partial").exists()


def test_an_interrupted_run_leaves_nothing_and_overwrite_replaces(tmp_path: Path,
                                                                   monkeypatch) -> None:
    out = tmp_path / "shapes"

    def interrupt(*_args: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training.ShapesTrainer, "_train_denoiser", interrupt)
        with pytest.raises(KeyboardInterrupt):
            training.train_shapes(out, vae_steps=1, unet_steps=1, progress=False,
                                  **TINY_TRAINING)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the rerun is not blocked
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(FileExistsError):
        training.train_shapes(out, vae_steps=1, unet_steps=1, progress=False, **TINY_TRAINING)
    training.train_shapes(out, vae_steps=1, unet_steps=1, progress=False, overwrite=True,
                          **TINY_TRAINING)
    assert (out / "model_index.json").is_file() and not (out / "old.txt").exists()


def test_eval_shapes_exits_1_below_the_thresholds(toy_checkpoint: Path, tmp_path: Path,
                                                  capsys) -> None:
    grid = tmp_path / "grid.png"
    code = main(["eval-shapes", str(toy_checkpoint), "--prompts", "2", "--steps", "2",
                 "--grid", str(grid)])
    out = capsys.readouterr().out
    assert code == 1  # two training steps draw nothing recognisable
    assert "2 prompts, 2 steps, guidance 5" in out and "-> FAIL" in out
    assert all(f"\n{split}" in out for split in ("seen", "held_out", "all"))
    assert Image.open(grid).format == "PNG"


def test_eval_shapes_defaults_to_the_models_files_default_model(capsys) -> None:
    # The packaged models file's default is the committed shapes model; the first evaluation
    # prompt (a held-out combination) is drawn right at the default 20 steps.
    assert main(["eval-shapes", "--prompts", "1"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {CHECKPOINT}: 1 prompts, 20 steps, guidance 5" in out
    assert "-> PASS" in out


DEMO_MODELS = "models:\n  demo: {family: demo}\n"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train-shapes", "{tmp}/full"], "OUT_DIR {tmp}/full must be missing or an empty"),
        (["train-shapes", "{tmp}/full"], "--overwrite replaces it"),
        (["train-shapes", "{tmp}/new", "--vae-steps", "0"], "--vae-steps: must be >= 1"),
        (["train-shapes", "{tmp}/new", "--unet-steps", "many"], "--unet-steps: invalid"),
        (["train-shapes", "{tmp}/new", "--threads", "0"], "--threads: must be >= 1"),
        (["eval-shapes", "{ckpt}", "--prompts", "0"], "--prompts: must be >= 1"),
        (["eval-shapes", "{ckpt}", "--prompts", "100000"], "--prompts 100000:"),
        (["eval-shapes", "{ckpt}", "--steps", "0"], "--steps: must be >= 1"),
        (["eval-shapes", "{ckpt}", "--guidance-scale", "-1"], "--guidance-scale: must be"),
        (["eval-shapes", "{ckpt}", "--guidance-scale", "nan"], "--guidance-scale: must be"),
        (["eval-shapes", "{ckpt}", "--grid", "grid.jpg"], "--grid must end in .png"),
        (["eval-shapes", "{tmp}"], "CHECKPOINT {tmp} is not a checkpoint folder"),
        (["eval-shapes", "--models", "{tmp}/demo.yaml"], "'demo' has no checkpoint"),
        (["eval-shapes", "{ckpt}", "--lora", "{tmp}/gone"], "--lora {tmp}/gone: no such file"),
        (["train-lora-shapes", "{tmp}/full"], "OUT_DIR {tmp}/full must be missing or an empty"),
        (["train-lora-shapes", "{tmp}/new", "--steps", "0"], "--steps: must be >= 1"),
        (["train-lora-shapes", "{tmp}/new", "--base", "{tmp}"],
         "--base {tmp} is not a checkpoint folder"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(args, fragment, tmp_path, capsys) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "demo.yaml").write_text(DEMO_MODELS)
    fill = functools.partial(str.format, tmp=tmp_path, ckpt=CHECKPOINT)
    with pytest.raises(SystemExit) as exit_info:
        main([fill(arg) for arg in args])
    assert exit_info.value.code == 2
    assert fill(fragment) in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_train_lora_shapes_is_seeded_and_writes_diffusers_keys(tmp_path: Path, monkeypatch) -> None:
    # `blockserve train-lora-shapes` twice with one seed, at toy size (the real run: minutes).
    monkeypatch.setattr(lora_training, "RingLoraConfig", functools.partial(
        lora_training.RingLoraConfig, batch_size=4, pool_size=8, warmup_steps=1, rank=2))
    files = []
    for run in ("a", "b"):
        assert main(["train-lora-shapes", str(tmp_path / run), "--base", str(CHECKPOINT),
                     "--steps", "2", "--seed", "3"]) == 0
        files.append(tmp_path / run / "pytorch_lora_weights.safetensors")
    # The same weights and header values (safetensors writes header entries in hash order).
    first, second = (read_lora_file(str(f)) for f in files)
    assert first.metadata == second.metadata
    assert first.tensors.keys() == second.tensors.keys()
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    keys = first.tensors
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder"}
    assert all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys)
    assert any(key.startswith("unet.") and ".attn2.to_k." in key for key in keys)
