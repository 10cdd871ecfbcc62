"""Lazy loading from folders and (faked) Hub repos; load/update/unload; save round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler

from blocks import ComponentLoadError, ModularPipeline
from tests.unit.tiny_family import TinyTestBlocks, write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def no_hub(monkeypatch):
    """Any Hub call fails the test: local folders must never touch the network."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected Hub call: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_from_pretrained_reads_index_and_loads_nothing(checkpoint, no_hub):
    pipe = ModularPipeline.from_pretrained(str(checkpoint))
    assert isinstance(pipe.blocks, TinyTestBlocks)
    assert set(pipe.null_component_names) == {"text_encoder", "vae", "image_encoder"}
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)  # weight-free: created at once
    spec = pipe.component_specs["vae"]
    assert (spec.pretrained_model_name_or_path, spec.subfolder) == (str(checkpoint), "vae")
    assert spec.load_id == f"{checkpoint}|vae|null|null"


def test_load_components_by_workflow_loads_only_what_it_needs(checkpoint, no_hub):
    pipe = ModularPipeline.from_pretrained(str(checkpoint))
    pipe.load_components(workflow="text2image")
    assert pipe.null_component_names == ["image_encoder"]
    pipe.load_components(names="image_encoder")
    assert pipe.null_component_names == []


def test_load_components_dtype_dict_with_default(checkpoint, no_hub):
    pipe = ModularPipeline.from_pretrained(str(checkpoint))
    pipe.load_components(dtype={"vae": torch.float16, "default": torch.bfloat16})
    assert pipe.vae.dtype == torch.float16
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.image_encoder.dtype == torch.bfloat16


def test_torch_dtype_alias_and_device(checkpoint, no_hub):
    pipe = ModularPipeline.from_pretrained(str(checkpoint))
    pipe.load_components(torch_dtype=torch.float16, device="cpu")
    assert pipe.vae.dtype == torch.float16
    pipe.to(dtype=torch.float32)
    assert pipe.vae.dtype == torch.float32 and pipe.device.type == "cpu"


def test_unknown_component_name_lists_valid(checkpoint, no_hub):
    pipe = ModularPipeline.from_pretrained(str(checkpoint))
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['unet'\]; valid:"):
        pipe.load_components(names=["unet"], strict=True)
    with pytest.warns(UserWarning, match=r"unknown component\(s\) \['unet'\]; valid:"):
        pipe.load_components(names=["unet"])  # as in diffusers: warned about and ignored
    with pytest.raises(ValueError, match="unknown workflow 'inpaint'"):
        pipe.load_components(workflow="inpaint")


def test_failed_load_names_component_and_source(checkpoint, tmp_path, no_hub):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    pipe = ModularPipeline.from_pretrained(str(broken))
    expected = rf"component 'vae' \(AutoencoderKL\) from {broken}"
    with pytest.raises(ComponentLoadError, match=expected):
        pipe.load_components(names="vae", strict=True)
    assert pipe.vae is None  # no silent half-load
    with pytest.warns(UserWarning, match=expected):
        pipe.load_components(names="vae")  # as in diffusers: warned about, left None
    assert pipe.vae is None


def test_update_and_unload_components(checkpoint, no_hub):
    pipe = ModularPipeline.from_pretrained(str(checkpoint))
    pipe.load_components()
    pipe.update_components(scheduler=DDIMScheduler())
    assert isinstance(pipe.components["scheduler"], DDIMScheduler)
    pipe.unload_components(["vae", "image_encoder"])
    assert set(pipe.null_component_names) == {"vae", "image_encoder"}


def test_missing_component_is_loaded_on_first_use(checkpoint, no_hub):
    pipe = ModularPipeline.from_pretrained(str(checkpoint))
    images = pipe(prompt_ids=torch.tensor([[1, 2, 3]]), output="images")
    assert images.shape == (1, 3, 8, 8)
    # the image encoder was not needed, so it was not loaded
    assert pipe.null_component_names == ["image_encoder"]


def test_missing_component_without_source_is_a_clear_error():
    pipe = TinyTestBlocks().init_pipeline()
    with pytest.raises(ValueError, match="'text_encoder' is not loaded and has no source"):
        pipe(prompt_ids=torch.tensor([[1, 2]]))


def test_save_pretrained_round_trip(checkpoint, tmp_path, no_hub):
    pipe = ModularPipeline.from_pretrained(str(checkpoint))
    pipe.load_components()
    pipe.update_components(scheduler=DDIMScheduler(num_train_timesteps=500))
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "modular_model_index.json").read_text())
    assert index["_blocks_class_name"] == "TinyTestBlocks"
    assert list((tmp_path / "saved" / "vae").glob("*.safetensors"))

    again = ModularPipeline.from_pretrained(str(tmp_path / "saved"))
    assert isinstance(again.blocks, TinyTestBlocks)
    assert isinstance(again.scheduler, DDIMScheduler)
    assert again.scheduler.config.num_train_timesteps == 500
    assert again.component_specs["vae"].subfolder == "vae"
    again.load_components()
    for name in ("text_encoder", "vae", "image_encoder"):
        for (key, a), (_, b) in zip(
            getattr(pipe, name).state_dict().items(), getattr(again, name).state_dict().items(),
            strict=True,
        ):
            assert torch.equal(a, b), f"{name}.{key}"
    ids = torch.tensor([[4, 5, 6]])
    torch.testing.assert_close(
        pipe(prompt_ids=ids, output="images"), again(prompt_ids=ids, output="images"),
        rtol=0, atol=0,
    )


def _fake_hub_cache(root: Path, repo_id: str, checkpoint: Path) -> Path:
    """Lay out `checkpoint` the way huggingface_hub caches a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    return repo


def test_repo_id_resolves_offline_from_the_hf_cache(checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    _fake_hub_cache(cache, "org/tiny", checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    pipe = ModularPipeline.from_pretrained("org/tiny")
    assert pipe.component_specs["vae"].load_id == "org/tiny|vae|null|null"
    pipe.load_components(names="vae")
    assert isinstance(pipe.vae, AutoencoderKL)


def test_repo_id_fetches_index_first_then_only_loaded_subfolders(checkpoint, monkeypatch):
    import huggingface_hub

    calls: list[list[str]] = []

    def fake_snapshot_download(repo_id, allow_patterns=None, revision=None, **kwargs):
        assert repo_id == "org/tiny"
        calls.append(list(allow_patterns))
        return str(checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pipe = ModularPipeline.from_pretrained("org/tiny")
    assert ["modular_model_index.json", "model_index.json"] in calls
    assert all(not pattern.startswith(("vae", "text_encoder")) for c in calls for pattern in c)
    calls.clear()
    pipe.load_components(names="vae")
    assert calls == [["vae/*"]]



def test_from_pretrained_workflow_prunes_the_blocks(checkpoint, monkeypatch):
    import huggingface_hub

    def strict_snapshot_download(repo_id, allow_patterns=None, revision=None):
        return str(checkpoint)  # no **kwargs: anything else passed fails the call

    monkeypatch.setattr(huggingface_hub, "snapshot_download", strict_snapshot_download)
    for source in (str(checkpoint), "org/tiny"):
        pipe = ModularPipeline.from_pretrained(source, workflow="text2image")
        assert list(pipe.blocks.sub_blocks) == ["text_encoder", "decode"]
        assert sorted(pipe.null_component_names) == ["text_encoder", "vae"]


def test_pipelines_sharing_a_manager_hold_one_copy(checkpoint, tmp_path, no_hub):
    from blocks import ComponentsManager

    manager = ComponentsManager()
    copy_dir = tmp_path / "copy"
    shutil.copytree(checkpoint, copy_dir)  # same weights, another folder
    first = ModularPipeline.from_pretrained(str(checkpoint), components_manager=manager,
                                            collection="first")
    second = ModularPipeline.from_pretrained(str(copy_dir), components_manager=manager,
                                             collection="second")
    first.load_components()
    second.load_components()
    assert second.vae is first.vae and second.text_encoder is first.text_encoder
    # image_encoder has the very weights of vae: one object for both, by content hash
    assert first.image_encoder is first.vae
    modules = [c for c in first.components.values() if isinstance(c, torch.nn.Module)]
    assert len({id(m) for m in modules}) == 2
    assert "AutoencoderKL" in manager.summary() and "first, second" in manager.summary()

    second.unload_components("text_encoder")  # still in "first": kept
    assert first.text_encoder is not None and len(manager.search("text_encoder*")) == 1
    first.unload_components("text_encoder")  # in no collection now: dropped
    assert manager.search("text_encoder*") == []


def test_auto_offload_moves_models_per_block_under_a_budget(checkpoint, no_hub):
    from blocks import ComponentsManager

    manager = ComponentsManager()
    pipe = ModularPipeline.from_pretrained(str(checkpoint), components_manager=manager)
    pipe.load_components(names=["text_encoder", "vae"])
    text_bytes = sum(t.numel() * t.element_size() for t in pipe.text_encoder.state_dict().values())
    vae_bytes = sum(t.numel() * t.element_size() for t in pipe.vae.state_dict().values())
    # room for the larger of the two, not both: every call must swap them
    manager.enable_auto_offload("cpu", memory_budget=max(text_bytes, vae_bytes) + 1)
    pipe(prompt_ids=torch.tensor([[1, 2]]), output="images")
    pipe(prompt_ids=torch.tensor([[1, 2]]), output="images")
    loads = [r.component_id for r in manager.offload_log if r.is_load]
    assert loads == ["text_encoder_1", "vae_1", "text_encoder_1", "vae_1"]
    assert all(r.resident_bytes <= max(text_bytes, vae_bytes) + 1 for r in manager.offload_log)


def test_loading_prints_nothing_unless_the_blocks_logger_is_at_debug(capfd):
    # The committed shapes checkpoint: a transformers text encoder and diffusers models, the
    # two libraries whose load-time chatter (a weight-loading bar per model, the accelerate
    # hint, an empty float32-modules warning) used to fill every start's log.
    shapes = Path(__file__).resolve().parents[2] / "assets" / "tiny-shapes-sd"
    capfd.readouterr()
    pipe = ModularPipeline.from_pretrained(str(shapes))
    pipe.load_components(dtype=torch.float32, device="cpu")
    pipe.to("cpu")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
