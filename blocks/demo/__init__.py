"""The demo as blocks: the weight-free `demo` family, declared at the bottom of this module.

Pure-tensor blocks that paint the colour a prompt names (`blocks.demo.modular_blocks`); no
checkpoint, no heavy blocks, so in Ray mode everything runs in the router. Run it with
`python -m blocks.demo "a red circle" -o demo.png`.
"""

from blocks.demo.modular_blocks import (
    COLOURS,
    DemoAutoBlocks,
    DemoAutoDenoise,
    DemoDecodeStep,
    DemoDenoiseLoop,
    DemoDenoiser,
    DemoDenoiserStep,
    DemoImage2ImageDenoise,
    DemoImageLatentsStep,
    DemoPrepareLatentsStep,
    DemoSchedulerStep,
    DemoSetTimestepsStep,
    DemoText2ImageDenoise,
    DemoTextEncoderStep,
    prompt_colour,
)
from blocks.families import Family, register_family

FAMILY = register_family(Family(
    name="demo",
    blocks=DemoAutoBlocks,
    size_multiple=8,
    schedulers={"flow_match_euler": "FlowMatchEulerDiscreteScheduler"},
    needs_checkpoint=False,
))

__all__ = [
    "COLOURS",
    "FAMILY",
    "DemoAutoBlocks",
    "DemoAutoDenoise",
    "DemoDecodeStep",
    "DemoDenoiseLoop",
    "DemoDenoiser",
    "DemoDenoiserStep",
    "DemoImage2ImageDenoise",
    "DemoImageLatentsStep",
    "DemoPrepareLatentsStep",
    "DemoSchedulerStep",
    "DemoSetTimestepsStep",
    "DemoText2ImageDenoise",
    "DemoTextEncoderStep",
    "prompt_colour",
]
