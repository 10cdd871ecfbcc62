"""What the service knows about each model family it can serve.

A family here is the serving view of a `blocks` family: the size factor requests must respect,
the schedulers a request may name (mapped to diffusers' scheduler classes, created from the
checkpoint's own scheduler config), whether a checkpoint path is needed, how to write a
tiny checkpoint for `create_tiny`, and how to preview its latents as RGB. How a checkpoint is
turned into blocks is `blocks.families`' job, not this module's.
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
    # One (R, G, B) row per latent channel: a linear latent -> RGB approximation for progress
    # previews (no VAE decode). None: this family's latents get no preview.
    latent_rgb_factors: tuple[tuple[float, float, float], ...] | None = None

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
        # SD 1.x's 4 latent channels -> RGB, the factors ComfyUI and A1111 preview with.
        latent_rgb_factors=(
            (0.3512, 0.2297, 0.3227),
            (0.3250, 0.4974, 0.2350),
            (-0.2829, 0.1762, 0.2721),
            (-0.2120, -0.2616, -0.7177),
        ),
    ),
    "flux2-klein": FamilySupport(
        name="flux2-klein",
        size_factor=16,
        needs_path=True,
        schedulers={"flow_match_euler": "FlowMatchEulerDiscreteScheduler"},
        tiny_writer="blocks.flux2.tiny_model:write_tiny_flux2_klein",
        # Its latents are packed tokens (B, S, C) while denoising: no preview.
    ),
    "demo": FamilySupport(
        name="demo",
        size_factor=8,
        needs_path=False,
        schedulers={"flow_match_euler": "FlowMatchEulerDiscreteScheduler"},
        latent_rgb_factors=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),  # pixels
    ),
}
