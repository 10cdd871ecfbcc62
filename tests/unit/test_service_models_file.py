"""The models file and the settings: what is accepted, and errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes.shapes.training import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS
from service.models_file import (
    ModelsFileError,
    expand_env,
    load_models_file,
    parse_models,
    parse_size,
)
from service.settings import DEFAULT_MODELS_FILE, Settings, SettingsError


def parse(data: object, base: Path = Path("/srv")):
    return parse_models(data, base)


def one(**entry: object) -> dict[str, object]:
    return {"models": {"m": entry}}


def test_default_models_file_serves_the_committed_shapes_model_first(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKSERVE_CACHE_DIR", str(tmp_path))
    models = load_models_file(DEFAULT_MODELS_FILE)
    assert list(models.models) == ["tiny-shapes-sd", "tiny-sd"]
    assert models.default_model == "tiny-shapes-sd"
    shapes = models.models["tiny-shapes-sd"]
    # ../assets from service/: the repo's assets/ in a checkout or an editable install.
    assert shapes.path == str(Path(__file__).resolve().parents[2] / "assets" / "tiny-shapes-sd")
    assert (Path(shapes.path) / "model_index.json").is_file()
    assert (shapes.family, shapes.create_tiny) == ("sd", None)
    # What the checkpoint was trained and evaluated for.
    assert (shapes.defaults.steps, shapes.defaults.guidance_scale, shapes.defaults.size) == (
        DEFAULT_STEPS, DEFAULT_GUIDANCE_SCALE, "64x64")
    assert shapes.defaults.scheduler is None  # the checkpoint's own DDIM
    tiny = models.models["tiny-sd"]
    assert (tiny.family, tiny.create_tiny) == ("sd", "sd")
    assert tiny.path == str(tmp_path / "tiny-sd")
    for config in (shapes, tiny):
        assert config.defaults.size in config.allowed_sizes


def test_default_cache_dir_when_the_variable_is_unset(monkeypatch):
    monkeypatch.delenv("BLOCKSERVE_CACHE_DIR", raising=False)
    config = load_models_file(DEFAULT_MODELS_FILE).models["tiny-sd"]
    assert config.path == str(Path("~/.cache/blockserve/tiny-sd").expanduser())


def test_env_expansion():
    env = {"A": "/data", "EMPTY": ""}
    assert expand_env("${A}/x", env) == "/data/x"
    assert expand_env("${B:-/fallback}/x", env) == "/fallback/x"
    assert expand_env("${EMPTY:-/fallback}", env) == "/fallback"
    with pytest.raises(ValueError, match="B is not set"):
        expand_env("${B}/x", env)


def test_first_model_is_the_default_and_order_is_kept():
    models = parse({"models": {"b": {"family": "demo"}, "a": {"family": "demo"}}})
    assert models.default_model == "b"
    assert list(models.models) == ["b", "a"]


def test_paths_local_relative_and_repo_ids(tmp_path):
    (tmp_path / "ckpt").mkdir()
    models = parse({"models": {
        "local": {"family": "sd", "path": "ckpt"},
        "explicit": {"family": "sd", "path": "./later"},
        "repo": {"family": "sd", "path": "org/some-model"},
        "tiny": {"family": "sd", "path": "tiny", "create_tiny": "sd"},
    }}, tmp_path)
    assert models.models["local"].path == str(tmp_path / "ckpt")
    assert models.models["explicit"].path == str(tmp_path / "later")
    assert models.models["repo"].path == "org/some-model"
    assert models.models["tiny"].path == str(tmp_path / "tiny")


def test_defaults_and_allowed_sizes():
    config = parse(one(family="demo")).models["m"]
    assert config.allowed_sizes == ("64x64",)
    assert (config.limits.max_n, config.limits.max_steps) == (4, 50)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"models": {}}, "models"),
        ({}, "models"),
        ([1, 2], "(top level)"),
        (one(family="nope"), "models.m.family: Value error, unknown family 'nope'; known: demo"),
        (one(family="demo", create_tiny="demo"), "built in"),
        (one(family="sd"), "needs a `path`"),
        (one(family="demo", path="/x"), "built in"),
        (one(family="sd", path="/x", create_tiny="flux2-klein"), "does not match family"),
        (one(family="flux2-klein", path="/x", sizes=["40x40"]), "multiples of 16"),
        (one(family="sd", path="/x", sizes=["64x60"]), "multiples of 8"),
        (one(family="demo", sizes=["big"]), "WIDTHxHEIGHT"),
        (one(family="demo", sizes=["8192x64"]), "sides must be in"),
        (one(family="demo", sizes=["32x32"]), "defaults.size 64x64 is not in sizes"),
        (one(family="demo", defaults={"steps": 60}), "exceeds limits.max_steps"),
        (one(family="demo", limits={"max_n": 11}), "models.m.limits.max_n"),
        (one(family="demo", limits={"max_steps": 0}), "models.m.limits.max_steps"),
        (one(family="demo", defaults={"guidance_scale": 50}), "max_guidance_scale"),
        (one(family="demo", defaults={"scheduler": "ddim"}), "flow_match_euler"),
        (one(family="demo", dtype="float64"), "models.m.dtype"),
        (one(family="demo", device="tpu"), "models.m.device"),
        (one(family="demo", stepz=3), "models.m.stepz"),
        ({"models": {"bad name!": {"family": "demo"}}}, "name"),
        ({"models": {"m": {"family": "demo", "name": "other"}}}, "must match its key"),
    ],
)
def test_invalid_models_files_name_the_problem(data, fragment):
    with pytest.raises(ModelsFileError) as error:
        parse(data)
    assert fragment in str(error.value)


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(ModelsFileError, match="cannot read models file"):
        load_models_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ModelsFileError, match="not valid YAML"):
        load_models_file(bad)


def test_parse_size():
    assert parse_size("640x480") == (640, 480)
    assert parse_size(" 64X32 ") == (64, 32)
    for bad in ("64", "64x", "x64", "-64x64", "64*64"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_settings_from_env_and_overrides(tmp_path):
    env = {"BLOCKSERVE_PORT": "9000", "BLOCKSERVE_API_KEYS": " a, b ,,",
           "BLOCKSERVE_CACHE_DIR": str(tmp_path), "BLOCKSERVE_HOST": ""}
    settings = Settings.from_env(env, port=None, host="0.0.0.0")
    assert settings.port == 9000
    assert settings.api_keys == ("a", "b")
    assert settings.host == "0.0.0.0"
    assert settings.cache_dir == tmp_path
    assert Settings.from_env({}).models_file == DEFAULT_MODELS_FILE
    assert Settings.from_env({"BLOCKSERVE_API_KEYS": ""}).api_keys == ()


def test_invalid_settings_name_the_variable():
    with pytest.raises(SettingsError, match="BLOCKSERVE_PORT"):
        Settings.from_env({"BLOCKSERVE_PORT": "99999"})
    with pytest.raises(SettingsError, match="BLOCKSERVE_MAX_BODY_BYTES"):
        Settings.from_env({"BLOCKSERVE_MAX_BODY_BYTES": "lots"})
    with pytest.raises(SettingsError, match=r"BLOCKSERVE_WORKERS: .*greater than or equal to 1"):
        Settings.from_env({"BLOCKSERVE_WORKERS": "0"})
    assert Settings.from_env({"BLOCKSERVE_WORKERS": "2"}).workers == 2
