"""`blockserve models` and `blockserve generate`, in-process on a demo models file."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from service.cli import main

MODELS = """
models:
  demo:
    family: demo
    defaults: {steps: 2, size: 32x32}
    sizes: [32x32, 64x64]
"""


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(MODELS)
    return path


def test_models_lists_the_configured_models(models_file, capsys):
    assert main(["models", "--models", str(models_file)]) == 0
    out = capsys.readouterr().out
    assert "demo (default): family demo" in out and "32x32, 64x64" in out


def test_generate_writes_the_image_and_is_reproducible(models_file, tmp_path, capsys):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for out in (first, second):
        assert main(["generate", "a red circle", "-o", str(out), "--models", str(models_file),
                     "--seed", "3", "--size", "64x64", "--steps", "3"]) == 0
    assert Image.open(first).size == (64, 64)
    assert first.read_bytes() == second.read_bytes()
    assert "seed 3" in capsys.readouterr().out


def test_generate_edits_an_image(models_file, tmp_path):
    source, out = tmp_path / "in.png", tmp_path / "out.webp"
    Image.new("RGB", (64, 64), "blue").save(source)
    assert main(["generate", "make it red", "-o", str(out), "--models", str(models_file),
                 "--image", str(source), "--strength", "0.5"]) == 0
    assert Image.open(out).format == "WEBP"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--size", "72x64"], "allowed sizes: 32x32, 64x64"),
        (["--model", "nope"], "available: demo"),
        (["--mask", "m.png"], "--mask needs --image"),
        (["--steps", "0"], "must be >= 1"),
        (["-o", "out.gif"], "must end in .png"),
    ],
)
def test_generate_errors_exit_2_with_a_message(models_file, tmp_path, capsys, args, fragment):
    argv = ["generate", "red", "--models", str(models_file), *args]
    if "-o" not in args:
        argv += ["-o", str(tmp_path / "out.png")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_an_invalid_models_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {family: not-a-family}}")
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--models", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "models.m.family" in err and "unknown family 'not-a-family'; known: " in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("blockserve ")


def test_a_bad_size_is_refused_before_the_model_loads(tmp_path, capsys):
    # A model whose checkpoint does not exist: loading it would fail, so exit 2 naming the
    # size shows the size was checked first.
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  sd:\n    family: sd\n    path: {tmp_path}/missing\n"
                      "    sizes: [64x64]\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "red", "--models", str(models), "--size", "32x32",
              "-o", str(tmp_path / "out.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "size '32x32' is not allowed" in err and "loading model" not in err


@pytest.mark.parametrize(
    ("cores", "workers", "environ", "configured", "expected"),
    [
        (2, 1, {}, None, 1),  # one core stays free for everything else
        (16, 1, {}, None, 15),
        (16, 2, {}, None, 7),
        (1, 1, {}, None, 1),
        (16, 1, {"OMP_NUM_THREADS": "4"}, None, None),  # torch already reads it
        (16, 1, {"OMP_NUM_THREADS": "4"}, 3, 3),  # BLOCKSERVE_TORCH_THREADS wins
    ],
)
def test_default_torch_threads_leave_a_core_free(cores, workers, environ, configured,
                                                 expected):
    from service.torch_threads import default_torch_threads

    assert default_torch_threads(workers, cores, environ, configured) == expected


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["demo"], "no tiny checkpoint for family 'demo'; choose from "),
        (["sd", "--base"], "unrecognized arguments for family 'sd': --base; its options: "
                           "--controlnet, --depth, --inpaint"),
    ],
)
def test_tiny_model_checks_the_family_and_its_options(tmp_path, capsys, args, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", args[0], str(tmp_path / "out"), *args[1:]])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tiny_model_writes_the_familys_variant(tmp_path, capsys):
    assert main(["tiny-model", "sd", str(tmp_path / "sd"), "--inpaint"]) == 0
    assert '"in_channels": 9' in (tmp_path / "sd" / "unet" / "config.json").read_text()
    assert f"wrote {tmp_path / 'sd'}" in capsys.readouterr().out
