"""`ModularPipeline.__call__`: outputs, warnings, state handling, callbacks, progress."""

from __future__ import annotations

import warnings

import pytest
import torch

from blocks import (
    GenerationCancelled,
    InputParam,
    ModularPipeline,
    ModularPipelineBlocks,
    OutputParam,
    PipelineState,
    SequentialPipelineBlocks,
)
from blocks.demo import DemoAutoBlocks


@pytest.fixture
def pipe() -> ModularPipeline:
    pipe = DemoAutoBlocks().init_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_output_modes(pipe):
    state = pipe(prompt="red", generator=seeded())
    assert isinstance(state, PipelineState)
    assert state.images[0].size == (32, 32)
    images = pipe(prompt="red", generator=seeded(), output="images")
    assert isinstance(images, list) and images[0].size == (32, 32)
    both = pipe(prompt="red", generator=seeded(), output=["images", "latents"])
    assert set(both) == {"images", "latents"}
    assert both["latents"].shape == (1, 3, 32, 32)


def test_same_seed_same_image_and_batch_equals_alone(pipe):
    a = pipe(prompt="red", generator=seeded(1), output_type="pt", output="images")
    b = pipe(prompt="red", generator=seeded(1), output_type="pt", output="images")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    batch = pipe(prompt=["red", "blue"], generator=[seeded(1), seeded(2)], output_type="pt",
                 output="images")
    alone = pipe(prompt="blue", generator=[seeded(2)], output_type="pt", output="images")
    torch.testing.assert_close(batch[0:1], a, rtol=0, atol=0)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)


def test_unknown_kwargs_warn_once(pipe):
    with pytest.warns(UserWarning, match="does not use input 'colour'"):
        pipe(prompt="red", colour="blue")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(prompt="red", colour="blue")


def test_passed_state_is_not_mutated(pipe):
    state = PipelineState()
    state.set("prompt", "red")
    before = dict(state.values)
    result = pipe(state=state, generator=seeded())
    assert state.values == before
    assert "images" in result.values and result is not state


def test_pipe_blocks_is_a_copy(pipe):
    blocks = DemoAutoBlocks()
    pipe = blocks.init_pipeline()
    blocks.sub_blocks.pop("decode")  # editing the source leaves the pipeline alone
    assert "decode" in pipe.blocks.sub_blocks
    copy = pipe.blocks
    copy.sub_blocks.pop("decode")
    assert "decode" in pipe.blocks.sub_blocks


class CheckInferenceMode(ModularPipelineBlocks):
    intermediate_outputs = [OutputParam("inference_mode")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        block_state.inference_mode = torch.is_inference_mode_enabled()
        self.set_block_state(state, block_state)
        return components, state


def test_runs_under_inference_mode():
    blocks = SequentialPipelineBlocks.from_blocks_dict({"check": CheckInferenceMode})
    assert blocks.init_pipeline()(output="inference_mode") is True


def test_step_callback_sees_every_step_and_can_stop(pipe):
    seen = []
    pipe(prompt="red", num_inference_steps=5,
         callback_on_step_end=lambda step, t, bs: seen.append((step, float(t))))
    assert [step for step, _ in seen] == [0, 1, 2, 3, 4]

    def stop_after_two(step, timestep, block_state):
        assert block_state.latents.shape == (1, 3, 32, 32)
        return step == 1

    with pytest.raises(GenerationCancelled, match="after step 2 of 5") as raised:
        pipe(prompt="red", num_inference_steps=5, callback_on_step_end=stop_after_two)
    assert raised.value.step == 1 and raised.value.total == 5


def test_progress_bar_shows_and_can_be_silenced(capsys):
    pipe = DemoAutoBlocks().init_pipeline()
    pipe(prompt="red", num_inference_steps=3)
    assert "3/3" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="red", num_inference_steps=3)
    assert "3/3" not in capsys.readouterr().err


def test_components_and_configs_as_attributes(pipe):
    assert pipe.default_size == 32
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    pipe.update_components(default_size=16)
    assert pipe(prompt="red", output="images")[0].size == (16, 16)
    with pytest.raises(ValueError, match="'nope' is neither a component nor a config"):
        pipe.update_components(nope=1)


def test_required_input_with_default_is_reported_at_the_top():
    class NeedsSteps(ModularPipelineBlocks):
        inputs = [InputParam("steps", int, default=4, required=True)]

    blocks = SequentialPipelineBlocks.from_blocks_dict({"need": NeedsSteps})
    assert blocks.required_inputs == ["steps"]
