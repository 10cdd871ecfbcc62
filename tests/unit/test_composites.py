"""Sequential, auto, conditional and loop composites; sub-block edits; workflows; repr/doc."""

from __future__ import annotations

import pytest
import torch

from blocks import (
    AutoPipelineBlocks,
    ComponentSpec,
    ConditionalPipelineBlocks,
    InputParam,
    LoopSequentialPipelineBlocks,
    ModularPipelineBlocks,
    OutputParam,
    SequentialPipelineBlocks,
)
from blocks.demo import DemoAutoBlocks, DemoDecodeStep, DemoDenoiser


def leaf(name: str, reads: list[str], writes: list[str], required: tuple[str, ...] = ()):
    """A leaf block class that writes `"<name>(<inputs>)"` strings, recording the call order."""

    class Leaf(ModularPipelineBlocks):
        inputs = [InputParam(r, required=r in required) for r in reads]
        intermediate_outputs = [OutputParam(w) for w in writes]

        def __call__(self, components, state):
            block_state = self.get_block_state(state)
            args = ",".join(str(block_state.get(r)) for r in reads)
            for w in writes:
                setattr(block_state, w, f"{name}({args})")
            self.set_block_state(state, block_state)
            return components, state

    Leaf.__name__ = f"Leaf_{name}"
    return Leaf


A = leaf("a", ["x"], ["y"], required=("x",))
B = leaf("b", ["y", "z"], ["w"], required=("y",))
C = leaf("c", ["w", "q"], ["out"])


class ABC(SequentialPipelineBlocks):
    block_classes = [A, B, C]
    block_names = ["a", "b", "c"]


def test_sequential_inputs_are_union_minus_produced():
    blocks = ABC()
    assert [p.name for p in blocks.inputs] == ["x", "z", "q"]
    assert blocks.required_inputs == ["x"]
    assert blocks.output_names == ["y", "w", "out"]
    assert blocks.init_pipeline()(x=1, z=2, output="out") == "c(b(a(1),2),None)"


def test_sequential_from_instances_and_dict_are_equivalent():
    from_dict = SequentialPipelineBlocks.from_blocks_dict({"a": A(), "b": B, "c": C})
    assert [p.name for p in from_dict.inputs] == [p.name for p in ABC().inputs]
    assert from_dict.init_pipeline()(x=1, output="out") == "c(b(a(1),None),None)"


class Img2Img(SequentialPipelineBlocks):
    block_classes = [leaf("i2i", ["image", "strength"], ["latents"], required=("image",))]
    block_names = ["prepare"]


class Txt2Img(SequentialPipelineBlocks):
    block_classes = [leaf("t2i", ["height"], ["latents"])]
    block_names = ["prepare"]


class Inpaint(SequentialPipelineBlocks):
    block_classes = [leaf("inp", ["image", "mask"], ["latents"], required=("image", "mask"))]
    block_names = ["prepare"]


class AutoDenoise(AutoPipelineBlocks):
    block_classes = [Inpaint, Img2Img, Txt2Img]
    block_names = ["inpaint", "image2image", "text2image"]
    block_trigger_inputs = ["mask", "image", None]


def test_auto_first_present_trigger_wins_else_default():
    pipe = SequentialPipelineBlocks.from_blocks_dict({"denoise": AutoDenoise}).init_pipeline()
    assert pipe(output="latents") == "t2i(None)"
    assert pipe(image="I", output="latents") == "i2i(I,None)"
    assert pipe(image="I", mask="M", output="latents") == "inp(I,M)"
    # a trigger that is present but None counts as absent
    assert pipe(image=None, height=8, output="latents") == "t2i(8)"


def test_auto_inputs_required_only_when_required_everywhere():
    blocks = AutoDenoise()
    assert blocks.required_inputs == []
    assert {"image", "mask", "strength", "height"} <= set(blocks.input_names)


class OptionalPost(AutoPipelineBlocks):
    block_classes = [leaf("post", ["latents", "upscale"], ["latents"])]
    block_names = ["upscale"]
    block_trigger_inputs = ["upscale"]


def test_auto_without_default_is_skipped_and_its_outputs_absent():
    skip = AutoPipelineBlocks  # noqa: F841 - readability of the assertion below
    blocks = SequentialPipelineBlocks.from_blocks_dict(
        {"post": OptionalPost, "after": leaf("after", ["latents"], ["done"])}
    )
    assert blocks.sub_blocks["post"].skippable
    # outputs of a skippable block don't satisfy later inputs
    assert "latents" in blocks.input_names
    state = blocks.init_pipeline()()
    assert state.get("done") == "after(None)"
    assert state.get("latents") is None
    assert blocks.init_pipeline()(upscale=2, latents="L", output="latents") == "post(L,2)"


@pytest.mark.parametrize(
    ("classes", "names", "triggers", "message"),
    [
        ([A, B], ["a"], ["x", None], "block_names"),
        ([A, B], ["a", "b"], ["x"], "block_trigger_inputs has 1"),
        ([A, B], ["a", "b"], [None, "x"], "only the last branch"),
        ([A, B], ["a", "a"], ["x", None], "duplicate"),
        ([], [], [], "at least one branch"),
    ],
)
def test_invalid_auto_definitions_raise_at_construction(classes, names, triggers, message):
    bad = type("Bad", (AutoPipelineBlocks,), {
        "block_classes": classes, "block_names": names, "block_trigger_inputs": triggers,
    })
    with pytest.raises(ValueError, match=message):
        bad()


class PickBySize(ConditionalPipelineBlocks):
    block_classes = [leaf("small", [], ["size"]), leaf("large", [], ["size"])]
    block_names = ["small", "large"]
    block_trigger_inputs = ["width"]
    default_block_name = "small"

    def select_block(self, width=None):
        return "large" if width is not None and width > 512 else None


def test_conditional_select_block_and_default():
    pipe = SequentialPipelineBlocks.from_blocks_dict({"pick": PickBySize}).init_pipeline()
    assert pipe(output="size") == "small()"
    assert pipe(width=1024, output="size") == "large()"
    assert pipe(width=64, output="size") == "small()"


def test_conditional_default_must_exist():
    bad = type("Bad", (PickBySize,), {"default_block_name": "nope"})
    with pytest.raises(ValueError, match="default_block_name 'nope'"):
        bad()


class AddStep(ModularPipelineBlocks):
    inputs = [InputParam("value", required=True), InputParam("increment", default=1)]
    intermediate_outputs = [OutputParam("value")]

    def __call__(self, components, block_state, i, t):
        block_state.value = block_state.value + block_state.increment * t
        block_state.seen.append((i, t))
        return components, block_state


class CountLoop(LoopSequentialPipelineBlocks):
    loop_expected_components = [
        ComponentSpec("denoiser", DemoDenoiser, default_creation_method="from_config", config={})
    ]
    loop_inputs = [InputParam("timesteps", required=True), InputParam("seen", default=None)]
    loop_intermediate_outputs = [OutputParam("value"), OutputParam("seen")]
    block_classes = [AddStep]
    block_names = ["add"]

    def __call__(self, components, state):
        state.set("seen", [])
        return super().__call__(components, state)


def test_loop_runs_leaves_per_step_with_i_and_t():
    blocks = CountLoop()
    assert blocks.component_names == ["denoiser"]
    assert blocks.input_names == ["timesteps", "seen", "value", "increment"]
    assert blocks.output_names == ["value", "seen"]
    pipe = SequentialPipelineBlocks.from_blocks_dict({"loop": blocks}).init_pipeline()
    pipe.set_progress_bar_config(disable=True)
    result = pipe(value=0, timesteps=[3, 2, 1], increment=10, output=["value", "seen"])
    assert result == {"value": 60, "seen": [(0, 3), (1, 2), (2, 1)]}


def test_loop_rejects_non_leaf_sub_blocks():
    bad = type("Bad", (LoopSequentialPipelineBlocks,), {
        "block_classes": [ABC], "block_names": ["nested"],
    })
    with pytest.raises(ValueError, match=r"'nested'.*not a leaf"):
        bad()
    loop = CountLoop()
    loop.sub_blocks.insert("nested", ABC(), 0)
    pipe = SequentialPipelineBlocks.from_blocks_dict({"loop": loop}).init_pipeline()
    with pytest.raises(ValueError, match="not a leaf"):
        pipe(value=0, timesteps=[1])


class Brighten(ModularPipelineBlocks):
    description = "Adds 0.1 to every pixel."
    expected_components = [
        ComponentSpec("brightener", DemoDenoiser, config={}, default_creation_method="from_config")
    ]
    inputs = [InputParam("images", required=True), InputParam("amount", float, default=0.1)]
    intermediate_outputs = [OutputParam("images")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        block_state.images = block_state.images + block_state.amount
        self.set_block_state(state, block_state)
        return components, state


def test_sub_block_edits_propagate_everywhere():
    blocks = DemoAutoBlocks()
    blocks.sub_blocks.insert("brighten", Brighten(), len(blocks.sub_blocks))
    assert "amount" in blocks.input_names
    assert "brightener" in blocks.component_names
    assert "[3] brighten (Brighten)" in repr(blocks)
    assert list(blocks.get_workflow("text2image").sub_blocks)[-1] == "brighten"
    pipe = blocks.init_pipeline()
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator
    base = DemoAutoBlocks().init_pipeline()
    base.set_progress_bar_config(disable=True)
    plain = base(prompt="red", output_type="pt", generator=gen().manual_seed(0), output="images")
    bright = pipe(prompt="red", output_type="pt", generator=gen().manual_seed(0), output="images")
    torch.testing.assert_close(bright, plain + 0.1)

    popped = blocks.sub_blocks.pop("brighten")
    assert isinstance(popped, Brighten)
    assert "amount" not in blocks.input_names and "brightener" not in blocks.component_names

    class Halve(DemoDecodeStep):
        def __call__(self, components, state):
            components, state = super().__call__(components, state)
            state.set("images", state.get("images") / 2)
            return components, state

    blocks.sub_blocks["decode"] = Halve()
    assert "[2] decode (Halve)" in repr(blocks)
    half = blocks.init_pipeline()(
        prompt="red", output_type="pt", generator=gen().manual_seed(0), output="images"
    )
    torch.testing.assert_close(half, plain / 2)


def test_workflows_and_execution_blocks():
    blocks = DemoAutoBlocks()
    assert blocks.available_workflows == ["text2image", "image2image"]
    assert list(blocks.get_workflow("image2image").sub_blocks) == [
        "text_encoder", "denoise.set_timesteps", "denoise.image_latents", "denoise.loop", "decode"
    ]
    assert list(blocks.get_execution_blocks(prompt="x").sub_blocks) == [
        "text_encoder", "denoise.set_timesteps", "denoise.prepare_latents", "denoise.loop",
        "decode",
    ]
    with pytest.raises(ValueError, match="unknown workflow 'foo' for DemoAutoBlocks; "
                                         "available: text2image, image2image"):
        blocks.get_workflow("foo")


def test_skipped_branch_is_absent_from_execution_blocks():
    blocks = SequentialPipelineBlocks.from_blocks_dict({"post": OptionalPost, "a": A})
    assert list(blocks.get_execution_blocks(x=1).sub_blocks) == ["a"]
    assert list(blocks.get_execution_blocks(x=1, upscale=2).sub_blocks) == ["post", "a"]


def test_repr_shows_class_description_components_configs_and_sub_blocks():
    text = repr(DemoAutoBlocks())
    for expected in (
        "DemoAutoBlocks(", "Class: SequentialPipelineBlocks", "Description: Demo pipeline",
        "Components:", "scheduler (FlowMatchEulerDiscreteScheduler)", "Configs:",
        "default_size (default: 32)", "Sub-Blocks:", "[0] text_encoder (DemoTextEncoderStep)",
        "[1] denoise (DemoAutoDenoise)", "[2] decode (DemoDecodeStep)",
    ):
        assert expected in text, expected


def test_doc_lists_inputs_with_types_defaults_and_descriptions():
    doc = DemoAutoBlocks().doc
    assert "prompt (`str`, *required*):" in doc
    assert "num_inference_steps (`int`, *optional*, defaults to 4):" in doc
    assert "What to paint" in doc
    assert "images (`list`):" in doc
