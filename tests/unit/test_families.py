"""A family is one folder: it declares everything about itself, and the serving layers
(`service/`, `deployments/`) name no family; they read the declarations."""

from __future__ import annotations

import ast
import re
from dataclasses import replace
from pathlib import Path

import pytest

from blocks.demo import DemoAutoBlocks
from blocks.families import DENOISER, Family, families, get_family, register_family

ROOT = Path(__file__).resolve().parents[2]
SERVING_LAYERS = ("service", "deployments")
# What the repository's stop hook greps for, whether or not such a family exists yet.
HOOK_PATTERNS = (re.compile(r"blocks\.(flux2|stable_diffusion|stable_diffusion_xl|shapes)\b"),
                 re.compile(r"\"(flux2-klein|sdxl)\""))


def _serving_sources() -> dict[Path, str]:
    return {path: path.read_text() for layer in SERVING_LAYERS
            for path in sorted((ROOT / layer).rglob("*.py"))}


def test_service_and_deployments_name_no_family():
    named = []
    for family in families().values():
        package = ".".join(family.blocks.__module__.split(".")[:2])  # blocks.<folder>
        identifiers = {family.blocks.__name__, *family.checkpoint_classes,
                       *(cls.__name__ for cls in family.checkpoint_classes.values())}
        words = re.compile(rf"\b({re.escape(package)}|{'|'.join(map(re.escape, identifiers))})\b")
        for path, text in _serving_sources().items():
            where = path.relative_to(ROOT)
            named += [f"{where}: {m.group(0)}" for m in words.finditer(text)]
            named += [f"{where}:{node.lineno}: {node.value!r}" for node in ast.walk(ast.parse(text))
                      if isinstance(node, ast.Constant) and node.value == family.name]
    for path, text in _serving_sources().items():
        named += [f"{path.relative_to(ROOT)}: {m.group(0)}"
                  for pattern in HOOK_PATTERNS for m in pattern.finditer(text)]
    assert not named, "service/ or deployments/ name a family:\n" + "\n".join(named)


def test_built_in_families_declare_their_facts():
    sd, flux, demo = get_family("sd"), get_family("flux2-klein"), get_family("demo")
    assert {"sd", "flux2-klein", "demo"} <= set(families())
    assert sd.workflows == ("text2image", "image2image", "inpaint")
    assert flux.heavy_block_names(DENOISER) == ("denoise",)
    assert (sd.size_multiple, flux.size_multiple) == (8, 16)
    assert demo.heavy_blocks == {} and not demo.needs_checkpoint
    assert sd.scheduler_class("ddim").__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="unknown family 'nope'; known: ") as unknown:
        get_family("nope")
    assert all(name in str(unknown.value) for name in ("demo", "flux2-klein", "sd"))


def test_a_declaration_is_checked_when_registered():
    demo = get_family("demo")
    with pytest.raises(ValueError, match="heavy block 'unet' is not a top-level block of "
                                         "DemoAutoBlocks"):
        register_family(replace(demo, name="demo-bad-heavy", heavy_blocks={"unet": DENOISER}))
    with pytest.raises(ValueError, match="role 'gpu'"):
        register_family(replace(demo, name="demo-bad-role", heavy_blocks={"denoise": "gpu"}))
    with pytest.raises(ValueError, match="family 'demo' is already registered"):
        register_family(Family(name="demo", blocks=DemoAutoBlocks))
    with pytest.raises(ValueError, match="'StableDiffusionPipeline' already belongs to family "
                                         "'sd'"):
        register_family(Family(name="sd-copy", blocks=DemoAutoBlocks,
                               checkpoint_classes={"StableDiffusionPipeline": DemoAutoBlocks}))
    assert "demo-bad-heavy" not in families() and "sd-copy" not in families()


def test_a_family_without_heavy_blocks_runs_wholly_in_the_router():
    from deployments.remote_block import RemoteBlock
    from service.models_file import parse_models
    from service.ray_placement import RayPlacement, heavy_models

    models = parse_models({"models": {"demo": {"family": "demo"}}}, ROOT)
    placement = RayPlacement(handles={DENOISER: object()})
    blocks = placement.transform_blocks(models.models["demo"], DemoAutoBlocks())
    assert not any(isinstance(b, RemoteBlock) for b in blocks.sub_blocks.values())
    assert placement.describe("demo") is None
    assert heavy_models(models) == {}
