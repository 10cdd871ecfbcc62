"""Custom blocks shared as folders: saved with their source, loaded only when trusted."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import diffusers
import pytest

from blocks import ModularPipeline, ModularPipelineBlocks

SOURCE = textwrap.dedent(
    '''
    """A custom block shared as a folder."""
    from blocks import InputParam, ModularPipelineBlocks, OutputParam


    class ShoutBlock(ModularPipelineBlocks):
        _requirements = REQUIREMENTS
        description = "Upper-cases the prompt."
        inputs = [InputParam("prompt", str, required=True)]
        intermediate_outputs = [OutputParam("shout", str)]

        def __call__(self, components, state):
            block_state = self.get_block_state(state)
            block_state.shout = block_state.prompt.upper() + "!"
            self.set_block_state(state, block_state)
            return components, state
    '''
)


def _custom_blocks(tmp_path, requirements: dict[str, str]) -> ModularPipelineBlocks:
    source = tmp_path / "src" / "shout_block.py"
    source.parent.mkdir()
    source.write_text(SOURCE.replace("REQUIREMENTS", repr(requirements)))
    spec = importlib.util.spec_from_file_location("shout_block_under_test", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.ShoutBlock()


def test_save_writes_config_and_source(tmp_path):
    _custom_blocks(tmp_path, {"torch": ">=2.0"}).save_pretrained(str(tmp_path / "shared"))
    config = json.loads((tmp_path / "shared" / "modular_config.json").read_text())
    assert config == {
        "_class_name": "ShoutBlock",
        "_diffusers_version": diffusers.__version__,
        "auto_map": {"ModularPipelineBlocks": "shout_block.ShoutBlock"},
        "requirements": {"torch": ">=2.0"},
    }
    assert "class ShoutBlock" in (tmp_path / "shared" / "shout_block.py").read_text()


def test_loading_requires_trust_remote_code(tmp_path):
    _custom_blocks(tmp_path, {}).save_pretrained(str(tmp_path / "shared"))
    with pytest.raises(ValueError, match=r"shout_block\.py.*trust_remote_code=True"):
        ModularPipelineBlocks.from_pretrained(str(tmp_path / "shared"))
    blocks = ModularPipelineBlocks.from_pretrained(str(tmp_path / "shared"), trust_remote_code=True)
    assert type(blocks).__name__ == "ShoutBlock"
    pipe = ModularPipeline.from_pretrained(str(tmp_path / "shared"), trust_remote_code=True)
    assert pipe(prompt="hi", output="shout") == "HI!"


def test_unmet_requirements_are_listed_in_a_warning(tmp_path):
    requirements = {"torch": ">=999", "no-such-package-blockserve": ">=1"}
    with pytest.warns(UserWarning):
        _custom_blocks(tmp_path, requirements).save_pretrained(str(tmp_path / "shared"))
    # As in diffusers: a warning that names them, then the blocks load anyway.
    with pytest.warns(UserWarning) as caught:
        blocks = ModularPipelineBlocks.from_pretrained(str(tmp_path / "shared"),
                                                       trust_remote_code=True)
    message = " ".join(str(w.message) for w in caught)
    assert "torch>=999 (installed: 2." in message
    assert "no-such-package-blockserve>=1 (not installed)" in message
    assert type(blocks).__name__ == "ShoutBlock"
