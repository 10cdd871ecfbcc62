"""What the service knows about each model family it can serve.

A family here is the serving view of a `blocks` family: the size factor requests must respect,
the schedulers a request may name (mapped to diffusers' scheduler classes, created from the
checkpoint's own scheduler config), whether a checkpoint path is needed, and how to write a
tiny checkpoint for `create_tiny`. How a checkpoint is turned into blocks is
`blocks.families`' job, not this module's; previews need no family fact (`service.latent_rgb`
fits them on each model's own VAE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FamilySupport:
    """Serving facts of one family."""

    name: str
    size_factor: int  # width and height must be multiples of this (the VAE's downsampling)
    needs_path: bool  # False only for the built-in weight-free demo
    # Request name -> diffusers scheduler class name; the checkpoint's scheduler is the default.
    schedulers: dict[str, str]
    tiny_writer: str | None = None  # "module:function" writing a tiny checkpoint to a folder

    def scheduler_class(self, name: str) -> type:
        import diffusers

        return getattr(diffusers, self.schedulers[name])

    def scheduler_name_of(self, scheduler: Any) -> str | None:
        """The request name of a scheduler object's class, if this family lists it."""
        class_name = type(scheduler).__name__
        for name, listed in self.schedulers.items():
            if listed == class_name:
                return name
        return None

    def write_tiny(self, out_dir: Path) -> Path:
        if self.tiny_writer is None:
            raise ValueError(f"family {self.name!r} has no tiny-checkpoint writer")
        module_name, function_name = self.tiny_writer.split(":")
        import importlib

        writer: Callable[[Path], Path] = getattr(
            importlib.import_module(module_name), function_name
        )
        return writer(out_dir)


FAMILIES: dict[str, FamilySupport] = {
    "sd": FamilySupport(
        name="sd",
        size_factor=8,
        needs_path=True,
        schedulers={
            "euler": "EulerDiscreteScheduler",
            "euler_a": "EulerAncestralDiscreteScheduler",
            "ddim": "DDIMScheduler",
            "dpmpp_2m": "DPMSolverMultistepScheduler",
            "lcm": "LCMScheduler",
        },
        tiny_writer="blocks.stable_diffusion.tiny_model:write_tiny_sd",
    ),
    "flux2-klein": FamilySupport(
        name="flux2-klein",
        size_factor=16,
        needs_path=True,
        schedulers={"flow_match_euler": "FlowMatchEulerDiscreteScheduler"},
        tiny_writer="blocks.flux2.tiny_model:write_tiny_flux2_klein",
    ),
    "demo": FamilySupport(
        name="demo",
        size_factor=8,
        needs_path=False,
        schedulers={"flow_match_euler": "FlowMatchEulerDiscreteScheduler"},
    ),
}
