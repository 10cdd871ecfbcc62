"""The same user code against diffusers' Modular Diffusers and against `blocks`: same results.

Each scenario is a function of a library namespace (`lib.SequentialPipelineBlocks`,
`lib.InputParam`, ...) that defines its blocks on that library's base classes, runs them, and
returns what a user would look at; `same(scenario)` runs it on both and asserts equality, then
hands back the result so the test can also pin the expected value (a change in both libraries
still fails). Scenarios where we differ on purpose (listed in the README's "Differences from
diffusers") or that exercise what diffusers lacks (`strict=True`) check blocks alone.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers import modular_pipelines as dmp
from diffusers.modular_pipelines import mellon_node_utils as dmellon
from diffusers.modular_pipelines import modular_pipeline_utils as dutils

import blocks
from blocks import mellon, model_card
from tests.unit.tiny_family import tiny_vae

pytestmark = pytest.mark.usefixtures("quiet_diffusers")

# The names user code takes from `diffusers.modular_pipelines`, and from `blocks`.
SHARED_NAMES = (
    "ModularPipelineBlocks", "SequentialPipelineBlocks", "AutoPipelineBlocks",
    "ConditionalPipelineBlocks", "LoopSequentialPipelineBlocks", "InputParam", "OutputParam",
    "ComponentSpec", "ConfigSpec", "ModularPipeline", "ComponentsManager",
)
DIFFUSERS = SimpleNamespace(
    name="diffusers", **{n: getattr(dmp, n) for n in SHARED_NAMES},
    combine_inputs=dutils.combine_inputs, model_card=dutils.generate_modular_model_card_content,
    MellonPipelineConfig=dmellon.MellonPipelineConfig,
)
BLOCKS = SimpleNamespace(
    name="blocks", **{n: getattr(blocks, n) for n in SHARED_NAMES},
    combine_inputs=blocks.combine_inputs, model_card=model_card.generate_modular_model_card_content,
    MellonPipelineConfig=mellon.MellonPipelineConfig,
)


def same(scenario: Callable[[SimpleNamespace], Any]) -> Any:
    theirs, ours = scenario(DIFFUSERS), scenario(BLOCKS)
    assert ours == theirs, f"diffusers: {theirs!r}\nblocks:    {ours!r}"
    return ours


def leaf(lib: SimpleNamespace, name: str, inputs: list, outputs: list[str],
         requirements: dict | None = None) -> type:
    """A leaf block that records what it read, as `<name>_saw`, and writes `outputs`."""

    class Leaf(lib.ModularPipelineBlocks):
        _requirements = requirements

        @property
        def inputs(self):
            return inputs

        @property
        def intermediate_outputs(self):
            return [lib.OutputParam(f"{name}_saw"), *(lib.OutputParam(o) for o in outputs)]

        def __call__(self, components, state):
            block_state = self.get_block_state(state)
            keys = [p.name or p.kwargs_type for p in inputs]
            setattr(block_state, f"{name}_saw",
                    {key: getattr(block_state, key, "<unset>") for key in keys})
            for output in outputs:
                setattr(block_state, output, name)
            self.set_block_state(state, block_state)
            return components, state

    Leaf.__name__ = f"Leaf{name.title()}"
    return Leaf


def image_branches(lib: SimpleNamespace) -> type:
    """An auto block whose branches disagree on `strength`'s default."""
    inpaint = leaf(lib, "inpaint", [lib.InputParam("image"), lib.InputParam("mask"),
                                    lib.InputParam("strength", float, 0.9999)], ["workflow"])
    img2img = leaf(lib, "img2img", [lib.InputParam("image"),
                                    lib.InputParam("strength", float, 0.3)], ["workflow"])
    text2img = leaf(lib, "text2img", [lib.InputParam("prompt")], ["workflow"])

    class AutoImage(lib.AutoPipelineBlocks):
        block_classes = [inpaint, img2img, text2img]
        block_names = ["inpaint", "img2img", "text2img"]
        block_trigger_inputs = ["mask", "image", None]

    return AutoImage


# -- 1. input defaults flow ---------------------------------------------------------------------


def test_first_declared_default_reaches_later_blocks_and_the_state():
    def scenario(lib):
        a = leaf(lib, "a", [lib.InputParam("strength", default=0.3)], [])
        b = leaf(lib, "b", [lib.InputParam("strength")], [])
        pipe = lib.SequentialPipelineBlocks.from_blocks_dict({"a": a, "b": b}).init_pipeline()
        state = pipe()
        return state.get("b_saw"), state.get("strength")

    assert same(scenario) == ({"strength": 0.3}, 0.3)


def test_chosen_branch_applies_its_own_default_and_keeps_it_in_the_state():
    def scenario(lib):
        pipe = image_branches(lib)().init_pipeline()
        runs = [pipe(prompt="p", image="i"), pipe(prompt="p", image="i", mask="m"),
                pipe(prompt="p", image="i", strength=0.7)]
        return [(s.get("workflow"), s.get("strength")) for s in runs]

    assert same(scenario) == [("img2img", 0.3), ("inpaint", 0.9999), ("img2img", 0.7)]


# -- 2. merged defaults of branches -------------------------------------------------------------


def test_branches_with_different_defaults_report_none_and_each_default():
    def scenario(lib):
        auto = image_branches(lib)()
        (strength,) = [p for p in auto.inputs if p.name == "strength"]
        doc = " ".join(auto.doc.split())
        return (strength.default, strength.defaults_by_block,
                "defaults to 0.9999 or 0.3, depending on the workflow" in doc)

    assert same(scenario) == (None, {"inpaint": 0.9999, "img2img": 0.3}, True)


def test_combine_inputs_and_defaults_by_block():
    def scenario(lib):
        p = lib.InputParam
        merged = [
            lib.combine_inputs(("a", [p(name="x", default=5)]), ("b", [p(name="x", default=5)])),
            lib.combine_inputs(("a", [p(name="x")]), ("b", [p(name="x", default=5)])),
            lib.combine_inputs(("a", [p(name="x", default=3)]),
                               ("b", [p(name="x", defaults_by_block={"c": 1, "d": 2})])),
        ]
        return [[(q.name, q.default, q.defaults_by_block) for q in group] for group in merged]

    assert same(scenario) == [[("x", 5, None)], [("x", None, {"a": None, "b": 5})],
                              [("x", None, {"a": 3, "b.c": 1, "b.d": 2})]]


# -- 3. choosing blocks -------------------------------------------------------------------------


def test_select_block_and_get_execution_blocks():
    def scenario(lib):
        auto = image_branches(lib)()
        optional = type("Optional", (lib.AutoPipelineBlocks,), {
            "block_classes": [leaf(lib, "up", [lib.InputParam("upscale")], [])],
            "block_names": ["up"], "block_trigger_inputs": ["upscale"]})()
        seq = lib.SequentialPipelineBlocks.from_blocks_dict({"image": auto, "post": optional})
        return (
            auto.select_block(), auto.select_block(image="i"),
            type(auto.get_execution_blocks()).__name__,
            type(auto.get_execution_blocks(mask=True)).__name__,
            optional.get_execution_blocks(),
            list(seq.get_execution_blocks(image=True).sub_blocks),
            list(seq.get_execution_blocks(upscale=2).sub_blocks),
        )

    assert same(scenario) == (None, "img2img", "LeafText2Img", "LeafInpaint", None,
                              ["image"], ["image", "post"])


# -- 4. kwargs_type -----------------------------------------------------------------------------


def test_kwargs_type_inputs():
    def scenario(lib):
        class Producer(lib.ModularPipelineBlocks):
            inputs = [lib.InputParam("a")]
            intermediate_outputs = [lib.OutputParam("a", kwargs_type="group")]

            def __call__(self, components, state):
                block_state = self.get_block_state(state)
                block_state.a = f"{block_state.a}-produced"
                self.set_block_state(state, block_state)
                return components, state

        consumer = leaf(lib, "consumer", [lib.InputParam(kwargs_type="group")], [])
        seq = lib.SequentialPipelineBlocks.from_blocks_dict({"p": Producer, "c": consumer})
        alone = consumer().init_pipeline()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return (
                [(p.name, p.kwargs_type) for p in seq.inputs],
                "**group" in seq.doc,
                seq.init_pipeline()(a="x", output="consumer_saw"),
                alone(group={"a": "given"}, output="consumer_saw"),
                sorted(alone(a="by-name").values),  # not tagged: not delivered, not stored
            )

    assert same(scenario) == (
        [("a", None), (None, "group")], True, {"group": {"a": "x-produced"}},
        {"group": {"a": "given"}}, ["consumer_saw"],
    )


# -- 5. requirements ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sequential", "conditional", "loop"])
def test_requirements_of_sub_blocks_are_saved(kind, tmp_path):
    def scenario(lib):
        one = leaf(lib, "one", [], [], {"no-such-package-x": ">=0.8.0", "torch": "2.0"})
        two = leaf(lib, "two", [], [], {"transformers": ">=4.44.0"})
        if kind == "sequential":
            composite = lib.SequentialPipelineBlocks.from_blocks_dict({"one": one, "two": two})
        elif kind == "loop":
            composite = lib.LoopSequentialPipelineBlocks.from_blocks_dict({"one": one,
                                                                          "two": two})
        else:
            composite = type("Pick", (lib.ConditionalPipelineBlocks,), {
                "block_classes": [one, two], "block_names": ["one", "two"],
                "block_trigger_inputs": [], "select_block": lambda self, **kw: "one"})()
        folder = tmp_path / lib.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            composite.save_pretrained(str(folder))
        return json.loads((folder / "modular_config.json").read_text())["requirements"]

    assert same(scenario) == {"no-such-package-x": ">=0.8.0", "torch": "==2.0",
                              "transformers": ">=4.44.0"}


def test_unmet_requirements_warn_by_name(tmp_path):
    one = leaf(BLOCKS, "one", [], [], {"no-such-package-x": ">=1", "torch": ">=999"})
    with pytest.warns(UserWarning) as caught:
        blocks.SequentialPipelineBlocks.from_blocks_dict({"one": one}).save_pretrained(
            str(tmp_path))
    message = " ".join(str(w.message) for w in caught)
    assert "no-such-package-x>=1 (not installed)" in message
    assert "torch>=999 (installed: 2." in message


# -- 6. load_components -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae") / "vae"
    tiny_vae(1).save_pretrained(folder)
    return folder


def vae_block(lib: SimpleNamespace, vae_dir: Path, broken: Path | None = None) -> type:
    class UsesVae(lib.ModularPipelineBlocks):
        @property
        def expected_components(self):
            specs = [lib.ComponentSpec("vae", AutoencoderKL,
                                       pretrained_model_name_or_path=str(vae_dir))]
            if broken is not None:
                specs.append(lib.ComponentSpec("broken", AutoencoderKL,
                                               pretrained_model_name_or_path=str(broken)))
            return specs

        inputs = [lib.InputParam("prompt")]
        intermediate_outputs = [lib.OutputParam("done")]

        def __call__(self, components, state):
            block_state = self.get_block_state(state)
            block_state.done = True
            self.set_block_state(state, block_state)
            return components, state

    return UsesVae


def test_load_components_skips_loaded_ignores_unknown_and_survives_failures(vae_dir, tmp_path):
    def scenario(lib):
        pipe = vae_block(lib, vae_dir, broken=tmp_path / "missing")().init_pipeline()
        pipe.load_components(names="vae")
        first = pipe.vae
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_components()  # loads what is missing: the broken one fails, stays None
            pipe.load_components(names=["vae_typo"])
        return (pipe.vae is first, pipe.broken is None, pipe.component_names,
                pipe.pretrained_component_names, pipe.null_component_names)

    assert same(scenario) == (True, True, ["vae", "broken"], ["vae", "broken"], ["broken"])


def test_load_components_strict_raises(vae_dir, tmp_path):
    pipe = vae_block(BLOCKS, vae_dir, broken=tmp_path / "missing")().init_pipeline()
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['vae_typo'\]"):
        pipe.load_components(names=["vae_typo"], strict=True)
    with pytest.raises(blocks.ComponentLoadError, match="failed to load component 'broken'"):
        pipe.load_components(strict=True)


def test_trust_remote_code_only_reaches_the_pipelines_own_repo(vae_dir, tmp_path):
    pipe = vae_block(BLOCKS, vae_dir)().init_pipeline()  # no repo of its own: passed on
    assert pipe._kwargs_for("vae", {"trust_remote_code": True}) == {"trust_remote_code": True}
    pipe._pretrained_model_name_or_path = str(tmp_path)  # the vae is another repo's
    assert "trust_remote_code" not in pipe._kwargs_for("vae", {"trust_remote_code": True})


# -- 8. update_components keeps the source; spec and pipeline names -----------------------------


def test_component_spec_load_and_update_components_keep_the_source(vae_dir):
    def scenario(lib):
        pipe = vae_block(lib, vae_dir)().init_pipeline()
        spec = lib.ComponentSpec("vae", AutoencoderKL, pretrained_model_name_or_path=str(vae_dir))
        pipe.update_components(vae=spec.load(dtype=torch.float16))
        kept = pipe.get_component_spec("vae")
        pipe.update_components(vae=tiny_vae(2))  # made by hand: no source to keep
        lost = pipe.get_component_spec("vae")
        return (pipe.vae.dtype, kept.pretrained_model_name_or_path, kept.load_id,
                lost.pretrained_model_name_or_path, pipe.default_call_parameters)

    assert same(scenario) == (torch.float32, str(vae_dir), f"{vae_dir}||null|null", None,
                              {"prompt": None})


# -- 9. index files -----------------------------------------------------------------------------


def test_saved_index_has_what_diffusers_reads(vae_dir, tmp_path):
    def scenario(lib):
        pipe = vae_block(lib, vae_dir)().init_pipeline()
        pipe.load_components()
        kept, moved = tmp_path / f"{lib.name}-kept", tmp_path / f"{lib.name}-moved"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.save_pretrained(str(kept), overwrite_modular_index=False)
            pipe.save_pretrained(str(moved))
        entries = [json.loads((f / "modular_model_index.json").read_text())["vae"]
                   for f in (kept, moved)]
        for entry, folder in zip(entries, (kept, moved), strict=True):
            path = entry[2]["pretrained_model_name_or_path"]
            entry[2]["pretrained_model_name_or_path"] = "<here>" if path == str(folder) else path
        return entries

    kept, moved = same(scenario)
    assert kept[2]["pretrained_model_name_or_path"] == str(vae_dir)
    assert moved[2] == {"type_hint": ["diffusers", "AutoencoderKL"], "subfolder": "vae",
                        "pretrained_model_name_or_path": "<here>", "variant": None,
                        "revision": None}


# -- 11. unknown call arguments -----------------------------------------------------------------


def test_unknown_call_arguments_warn_and_stay_out_of_the_state():
    def scenario(lib):
        pipe = leaf(lib, "a", [lib.InputParam("x")], [])().init_pipeline()
        with pytest.warns(UserWarning):
            state = pipe(x=1, typo=2)
        return sorted(state.values)

    assert same(scenario) == ["a_saw", "x"]


# -- 12. a components manager shares loads ------------------------------------------------------


def test_pipelines_on_one_manager_read_each_component_once(vae_dir, monkeypatch):
    from blocks import pipeline as pipeline_module

    reads: list[str] = []
    real = pipeline_module.load_component
    monkeypatch.setattr(pipeline_module, "load_component",
                        lambda spec, *a, **k: reads.append(spec.name) or real(spec, *a, **k))
    manager = blocks.ComponentsManager()
    pipes = [vae_block(BLOCKS, vae_dir)().init_pipeline(components_manager=manager,
                                                        collection=f"c{i}") for i in range(3)]
    for pipe in pipes:
        pipe.load_components()
    assert reads == ["vae"]
    assert pipes[0].vae is pipes[1].vae is pipes[2].vae
    pipes[2].load_components(names="vae", dtype=torch.float16)  # another dtype: a new load
    assert reads == ["vae", "vae"] and pipes[2].vae.dtype == torch.float16


def test_components_manager_names():
    def scenario(lib):
        manager = lib.ComponentsManager()
        vae = tiny_vae(1)
        first, again = manager.add("vae", vae), manager.add("vae", vae)
        info = manager.get_model_info(first, fields=["class_name", "size_gb"])
        return (first == again, list(manager.components.values()) == [vae], info)

    ok, listed, info = same(scenario)
    assert ok and listed and info["size_gb"] == tiny_vae(1).get_memory_footprint() / 1024**3


class SizedModel(torch.nn.Linear):
    """A model of `size` bytes that reports its footprint as diffusers' models do."""

    def __init__(self, size: int) -> None:
        super().__init__(size // 4, 1, bias=False)

    def get_memory_footprint(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def test_auto_offload_strategy_picks_the_smallest_sufficient_set(monkeypatch):
    from diffusers.modular_pipelines.components_manager import (
        AutoOffloadStrategy as DiffusersAutoOffloadStrategy,
    )

    from blocks.offload_strategy import AutoOffloadStrategy

    unit = 1024
    cases = [  # (incoming, free, resident sizes, margin), in units
        (4, 70, {"a": 5, "b": 3}, 1), (6, 4, {"a": 5, "b": 3, "c": 2}, 1),
        (8, 4, {"a": 4, "b": 4, "c": 1}, 1), (11, 1, {"a": 5, "b": 3}, 1),
        (3, 5, {"a": 2}, 3),
    ]

    def scenario(strategy_class):
        picks = []
        for incoming, free, sizes, margin in cases:
            monkeypatch.setattr(torch.cuda, "mem_get_info",
                                lambda device=None, free=free: (free * unit, 80 * unit))
            hooks = [SimpleNamespace(model_id=n, model=SizedModel(s * unit))
                     for n, s in sizes.items()]
            chosen = strategy_class(margin * unit)(hooks, "new", SizedModel(incoming * unit),
                                                   "cuda:0")
            picks.append(sorted(h.model_id for h in chosen))
        return picks, strategy_class("3GB").memory_reserve_margin

    theirs, ours = scenario(DiffusersAutoOffloadStrategy), scenario(AutoOffloadStrategy)
    assert ours == theirs
    assert ours == ([[], ["b"], ["a", "c"], ["a", "b"], ["a"]], 3 * 10**9)
    # A deliberate difference (README): a model that exactly fills the room offloads nothing;
    # diffusers offloads the smallest resident model.
    cases[:] = [(4, 5, {"a": 3, "b": 2}, 1)]
    assert scenario(AutoOffloadStrategy)[0] == [[]]
    assert scenario(DiffusersAutoOffloadStrategy)[0] == [["b"]]


# -- model cards and Mellon ---------------------------------------------------------------------


def test_model_card_content_has_diffusers_sections_and_tags():
    def scenario(lib):
        class WithWorkflows(lib.SequentialPipelineBlocks):
            block_classes = [image_branches(lib)]
            block_names = ["image"]
            _workflow_map = {"text2image": {"prompt": True}, "image2image": {"image": True},
                             "inpainting": {"image": True, "mask": True}}

        content = lib.model_card(WithWorkflows())
        return sorted(content), [t for t in content["tags"] if t != "blockserve"]

    assert same(scenario)[1] == ["modular-diffusers", "diffusers", "inpainting",
                                 "image-to-image", "text-to-image"]


def test_mellon_config_for_a_custom_block_and_read_back(tmp_path):
    def scenario(lib):
        inputs = [lib.InputParam("prompt", str, required=True),
                  lib.InputParam("scale", float, 1.5, metadata={"mellon": "slider"})]
        block = leaf(lib, "custom", inputs, ["result"])()
        config = lib.MellonPipelineConfig.from_custom_block(block, output_types={"result": "image"})
        config.save(tmp_path / lib.name)
        read = lib.MellonPipelineConfig.load(tmp_path / lib.name)
        return config.to_dict(), read.node_params == config.node_params

    config, read_back = same(scenario)
    assert read_back and config["node_params"]["custom"]["params"]["prompt"]["label"] == "Prompt *"


@pytest.mark.parametrize("family", ["flux2-klein", "flux2-klein-base", "sd", "sd-controlnet"])
def test_mellon_config_of_every_family_matches_and_reads_back(family, tmp_path):
    from blocks.flux2 import Flux2KleinAutoBlocks, Flux2KleinBaseAutoBlocks
    from blocks.stable_diffusion import (
        StableDiffusionAutoBlocks,
        StableDiffusionControlNetAutoBlocks,
    )

    family_blocks = {"flux2-klein": Flux2KleinAutoBlocks, "flux2-klein-base":
                     Flux2KleinBaseAutoBlocks, "sd": StableDiffusionAutoBlocks,
                     "sd-controlnet": StableDiffusionControlNetAutoBlocks}[family]()
    ours = mellon.MellonPipelineConfig.from_blocks(family_blocks)
    # diffusers' own function, given our blocks, makes the same nodes.
    assert ours.to_dict() == dmellon.MellonPipelineConfig.from_blocks(family_blocks).to_dict()
    nodes = ours.node_params
    assert {"denoise", "text_encoder", "vae_encoder", "decoder"} <= {k for k, v in nodes.items()
                                                                    if v is not None}
    ours.save(tmp_path)
    as_json = json.loads(json.dumps(nodes))  # JSON makes the guider's True/False keys strings
    assert dmellon.MellonPipelineConfig.load(tmp_path).node_params == as_json
    assert mellon.MellonPipelineConfig.load(tmp_path).node_params == as_json


# -- 10. custom-block repos with weights --------------------------------------------------------

CUSTOM_SOURCE = '''
from diffusers import AutoencoderKL
from {library} import ComponentSpec, InputParam, ModularPipelineBlocks, OutputParam


class VaeShape(ModularPipelineBlocks):
    expected_components = [ComponentSpec("vae", AutoencoderKL)]
    inputs = [InputParam("prompt")]
    intermediate_outputs = [OutputParam("latent_channels")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        block_state.latent_channels = components.vae.config.latent_channels
        self.set_block_state(state, block_state)
        return components, state
'''


def test_a_custom_block_repo_with_weights_loads_them(vae_dir, tmp_path):
    import importlib.util

    def scenario(lib):
        library = "diffusers.modular_pipelines" if lib is DIFFUSERS else "blocks"
        folder = tmp_path / lib.name
        folder.mkdir()
        module_name = f"vae_shape_{lib.name}"
        source = folder / f"{module_name}.py"
        source.write_text(CUSTOM_SOURCE.format(library=library))
        spec = importlib.util.spec_from_file_location(module_name, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        block = module.VaeShape()
        block.save_pretrained(str(folder))  # modular_config.json (+ the source, for blocks)
        pipe = block.init_pipeline()
        vae = lib.ComponentSpec("vae", AutoencoderKL, pretrained_model_name_or_path=str(vae_dir))
        pipe.update_components(vae=vae.load())
        pipe.save_pretrained(str(folder))  # the weights and modular_model_index.json
        loaded = lib.ModularPipeline.from_pretrained(str(folder), trust_remote_code=True)
        loaded.load_components()
        spec = loaded.get_component_spec("vae")
        return (type(loaded.vae).__name__, spec.pretrained_model_name_or_path == str(folder),
                loaded(prompt="p", output="latent_channels"))

    assert same(scenario) == ("AutoencoderKL", True, 4)
