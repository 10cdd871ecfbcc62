"""The leaf-block contract: inputs, outputs, kwargs types, errors that name the block path."""

from __future__ import annotations

import pytest
import torch

from blocks import (
    InputParam,
    ModularPipelineBlocks,
    OutputParam,
    PipelineState,
    SequentialPipelineBlocks,
)
from blocks.demo import DemoAutoBlocks, DemoPrepareLatentsStep, DemoTextEncoderStep


class Scale(ModularPipelineBlocks):
    inputs = [
        InputParam("x", torch.Tensor, required=True),
        InputParam("factor", float, default=2.0),
        InputParam("offset", float, default=1.0, required=True),
    ]
    intermediate_outputs = [OutputParam("y", torch.Tensor)]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        block_state.y = block_state.x * block_state.factor + block_state.offset
        self.set_block_state(state, block_state)
        return components, state


class ForgetsOutput(ModularPipelineBlocks):
    inputs = [InputParam("x")]
    intermediate_outputs = [OutputParam("y"), OutputParam("z")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        block_state.y = 1
        self.set_block_state(state, block_state)
        return components, state


class Tag(ModularPipelineBlocks):
    intermediate_outputs = [
        OutputParam("a", int, kwargs_type="extras"),
        OutputParam("b", int, kwargs_type="extras"),
        OutputParam("c", int),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        block_state.a, block_state.b, block_state.c = 1, 2, 3
        self.set_block_state(state, block_state)
        return components, state


class CollectExtras(ModularPipelineBlocks):
    inputs = [InputParam(None, kwargs_type="extras")]
    intermediate_outputs = [OutputParam("seen")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        # The group arrives both as a dict and as attributes of their own names.
        block_state.seen = (dict(block_state.extras), block_state.a, block_state.b)
        self.set_block_state(state, block_state)
        return components, state


def test_optional_input_takes_its_default():
    state = PipelineState()
    state.set("x", torch.tensor(3.0))
    state.set("offset", 0.5)
    _, state = Scale()(None, state)
    assert state.get("y").item() == pytest.approx(6.5)


def test_required_input_stays_required_despite_default():
    state = PipelineState()
    state.set("x", torch.tensor(3.0))
    with pytest.raises(ValueError, match="required input 'offset' is missing"):
        Scale()(None, state)


def test_missing_required_input_names_the_block_path():
    pipe = DemoAutoBlocks().init_pipeline()
    broken = SequentialPipelineBlocks.from_blocks_dict(
        {"text_encoder": DemoTextEncoderStep(), "scale": Scale()}
    )
    with pytest.raises(ValueError, match=r"^text_encoder: required input 'prompt' is missing"):
        pipe(prompt=None)
    with pytest.raises(ValueError, match=r"^scale: required input 'x' is missing"):
        broken.init_pipeline()(prompt="red")


def test_nested_block_path_in_error():
    # prepare_latents needs batch_size, which the text encoder would produce; drop it.
    blocks = DemoAutoBlocks()
    blocks.sub_blocks.pop("text_encoder")
    pipe = blocks.init_pipeline()
    with pytest.raises(ValueError) as raised:
        pipe(num_inference_steps=2)
    assert str(raised.value).startswith("denoise.prepare_latents: required input 'batch_size'")


def test_unset_declared_output_names_output_and_block():
    blocks = SequentialPipelineBlocks.from_blocks_dict({"forgetful": ForgetsOutput()})
    with pytest.raises(ValueError, match=r"forgetful: declared output 'z' was not set"):
        blocks.init_pipeline()(x=1)


def test_kwargs_type_values_are_collected_as_dict_and_attributes():
    blocks = SequentialPipelineBlocks.from_blocks_dict({"tag": Tag, "collect": CollectExtras})
    seen = blocks.init_pipeline()(output="seen")
    assert seen == ({"a": 1, "b": 2}, 1, 2)
    # the group stays an input (as in diffusers): the caller may add to it as a dict
    assert [p.key for p in blocks.inputs] == ["**extras"]
    seen = blocks.init_pipeline()(extras={"c": 3}, output="seen")
    assert seen == ({"c": 3, "a": 1, "b": 2}, 1, 2)


def test_leaf_block_runs_with_exactly_its_declared_inputs():
    """The basis of remote execution: a fresh state with only the declared inputs suffices."""
    pipe = DemoAutoBlocks().init_pipeline()
    for block in (DemoTextEncoderStep(), DemoPrepareLatentsStep()):
        values = {"prompt": ["red", "blue"], "batch_size": 2, "height": 8, "width": 8,
                  "generator": torch.Generator().manual_seed(0), "num_images_per_prompt": 1}
        state = PipelineState()
        for name in block.input_names:
            state.set(name, values[name])
        _, state = block(pipe, state)
        assert set(block.output_names) <= set(state.values)
        assert set(state.values) == set(block.input_names) | set(block.output_names)


def test_input_param_needs_name_or_kwargs_type():
    with pytest.raises(ValueError, match="needs a name"):
        InputParam(None)


class FillSize(ModularPipelineBlocks):
    inputs = [InputParam("height", int), InputParam("width", int, default=16)]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        if block_state.height is None:
            block_state.height = 32  # filled in: written back although the user never set it
        self.set_block_state(state, block_state)
        return components, state


def test_inputs_a_block_replaces_and_defaults_end_in_the_state():
    blocks = SequentialPipelineBlocks.from_blocks_dict({"fill": FillSize})
    state = blocks.init_pipeline()()
    assert state.get("height") == 32
    assert state.get("width") == 16  # every declared input is in the state, as in diffusers
    assert blocks.init_pipeline()(height=8, output="height") == 8
