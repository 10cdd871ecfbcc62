"""What ran the check: the device, its memory, and the versions of everything that computes.

Figures from a GPU are only comparable with the GPU, driver and library versions beside them;
this is the first part of every report.

Not handled here: choosing the device (`bench/gpu_check.py` does, from `--smoke`).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

import torch

from gpu_checks.runner import Outcome

PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "ray", "fastapi", "pydantic")


def describe(device: torch.device) -> dict[str, Any]:
    """Device, memory and package versions, as plain data."""
    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update({
            "gpu": props.name,
            "gpu_memory_gib": round(total / 2**30, 1),
            "gpu_free_gib": round(free / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        })
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def check_environment(device: torch.device) -> Outcome:
    info = describe(device)
    if device.type == "cuda":
        summary = (f"{info['gpu']} ({info['gpu_memory_gib']} GiB, sm {info['compute_capability']}),"
                   f" torch {info['torch']}, CUDA {info['cuda']}, diffusers {info['diffusers']}")
    else:
        summary = (f"CPU ({info['cpu_cores']} cores, {info['torch_threads']} torch threads), "
                   f"torch {info['torch']}, diffusers {info['diffusers']}")
    return Outcome(summary, info)


def imported_distributions() -> list[str]:
    """The installed distributions whose modules this process has imported, by name: what a
    machine needs to run what ran (a bare GPU image lacks some; see `make gpu-wheels`)."""
    owners = metadata.packages_distributions()
    top_level = {name.partition(".")[0] for name in list(sys.modules)}
    return sorted({dist for name in top_level for dist in owners.get(name, ())},
                  key=str.lower)
