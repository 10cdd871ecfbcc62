"""One family on one device: its checkpoint, our pipeline against diffusers', ms per image.

`FamilyRun` walks a family through the run in order:

1. `write`: the checkpoint, written once into the scratch folder by the family's factory
   through the CLI (`blockserve tiny-model FAMILY DIR --size real --device cuda`), reused by
   later runs on the same machine (a marker file names what was written).
2. `load`: the service's registry loads it (`ServiceHarness`), so the engine checks and the
   pipelines below run on the very same weights; our pipeline (`ModularPipeline`) and
   diffusers' (`DiffusionPipeline.from_pretrained` with our modules passed in, so nothing is
   loaded twice) are built around those modules.
3. `parity(dtype)`: the weights are cast in place to `dtype`; both pipelines make the same
   image (same prompt, size, steps, seed, a CPU generator); max abs difference of the images,
   and the peak memory of each component in each pipeline (`ComponentMemoryProbe`).
4. `speed(dtype)`: ms per image, interleaved (ours, theirs, then the order rotated), after
   the parity call warmed both up; the ratio ours / diffusers.
5. `offload_budget()`: our pipeline under `ComponentsManager` auto offload with a budget of
   one model (`gpu_checks.memory.check_offload_budget`).

Not handled here: the engine's checks (`gpu_checks.engine`), the order of checks.
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blocks.dtypes import DTYPES
from gpu_checks.engine import EngineRun, ServiceHarness
from gpu_checks.memory import (
    MIB,
    ComponentMemoryProbe,
    check_offload_budget,
    meter_for,
    module_bytes,
)
from gpu_checks.runner import Budget, Outcome, log

# Largest max abs difference of [0, 1] images accepted between our pipeline and diffusers'.
# float32 is what the unit tests hold on a CPU; in half precision the same ops in another
# order may round differently, and twenty steps amplify it.
PARITY_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
MARKER = ".gpu-check-written.json"


@dataclass(frozen=True)
class FamilyPlan:
    """What one family is checked with."""

    family: str  # the CLI's and models file's family name
    size: str  # "tiny" | "real"
    width: int
    height: int
    steps: int
    guidance_scale: float | None
    dtypes: tuple[str, ...]  # the first is what the registry loads
    speed_rounds: int
    engine_batches: tuple[int, ...]
    engine_rounds: int
    # sd.step_scheduling (gpu_checks.scheduling): offered loads, seconds of arrivals per mode
    # and load, lone jobs per mode and class; no loads: the family has no such check.
    step_loads: tuple[float, ...] = ()
    step_run_seconds: float = 0.0
    step_lone_repeats: int = 1
    prompt: str = "a photo of a cat sitting on a wooden table, high quality, detailed"
    seed: int = 0

    def call_inputs(self) -> dict[str, Any]:
        inputs: dict[str, Any] = {"prompt": self.prompt, "num_inference_steps": self.steps,
                                  "height": self.height, "width": self.width,
                                  "output_type": "np"}
        if self.guidance_scale is not None:
            inputs["guidance_scale"] = self.guidance_scale
        return inputs


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class FamilyRun:
    """A family's checkpoint, loaded model and pipelines (see the module docstring)."""

    def __init__(self, plan: FamilyPlan, device: torch.device, scratch: Path, budget: Budget,
                 writer_device: torch.device | None = None) -> None:
        self.plan = plan
        self.device = device
        self.scratch = scratch
        self.budget = budget
        self.writer_device = writer_device or device
        self.checkpoint: Path | None = None
        self.harness: ServiceHarness | None = None
        self.engine: EngineRun | None = None
        self.ours: Any = None
        self.reference: Any = None
        self.modules: dict[str, torch.nn.Module] = {}
        self.shared: dict[str, Any] = {}
        self.dtype: str | None = None
        self.images: dict[str, np.ndarray] = {}  # dtype -> our parity image
        _quiet_libraries()

    @property
    def model_name(self) -> str:
        return f"gpu-check-{self.plan.family}"

    @property
    def alone_model_name(self) -> str:
        return f"{self.model_name}-alone"

    @property
    def request_model_name(self) -> str:
        """The same checkpoint scheduled at request granularity (for step_scheduling)."""
        return f"{self.model_name}-request"

    # -- 1. the checkpoint --------------------------------------------------------------------

    def write(self) -> Outcome:
        plan = self.plan
        target = self.scratch / f"{plan.family}-{plan.size}-seed{plan.seed}"
        wanted = {"family": plan.family, "size": plan.size, "seed": plan.seed,
                  "device": self.writer_device.type}
        marker = target / MARKER
        reused = marker.is_file() and json.loads(marker.read_text()) == wanted
        start = time.perf_counter()
        if not reused:
            from service.cli import main as blockserve

            shutil.rmtree(target, ignore_errors=True)
            staging = target.with_name(target.name + ".writing")
            shutil.rmtree(staging, ignore_errors=True)
            staging.parent.mkdir(parents=True, exist_ok=True)
            argv = ["tiny-model", plan.family, str(staging), "--size", plan.size,
                    "--seed", str(plan.seed), "--device", str(self.writer_device)]
            try:
                blockserve(argv)
            except SystemExit as stop:  # argparse's error exit: the message is printed
                raise RuntimeError(f"blockserve {' '.join(argv)} exited {stop.code}") from None
            (staging / MARKER).write_text(json.dumps(wanted))
            staging.rename(target)
            if self.writer_device.type == "cuda":
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - start
        self.checkpoint = target
        size = sum(p.stat().st_size for p in target.rglob("*.safetensors"))
        data = {"path": str(target), "reused": reused, "seconds": round(seconds, 1),
                "safetensors_gib": round(size / 2**30, 2),
                "command": f"blockserve tiny-model {plan.family} DIR --size {plan.size} "
                           f"--device {self.writer_device}"}
        how = "reused" if reused else f"written in {seconds:.1f}s"
        return Outcome(f"{plan.family} at size {plan.size}: {size / 2**30:.2f} GiB of "
                       f"safetensors, {how}", data)

    # -- 2. loading ---------------------------------------------------------------------------

    def load(self) -> Outcome:
        assert self.checkpoint is not None, "write() first"
        plan = self.plan
        dtype = plan.dtypes[0]
        entry = {
            "family": plan.family, "path": str(self.checkpoint), "dtype": dtype,
            "device": str(self.device),
            "defaults": {"steps": plan.steps, "size": f"{plan.width}x{plan.height}",
                         "guidance_scale": plan.guidance_scale},
            "sizes": [f"{plan.width}x{plan.height}"],
            "limits": {"max_steps": plan.steps, "max_n": 1},
        }
        models = {self.model_name: entry, self.alone_model_name: {**entry, "max_batch_size": 1},
                  self.request_model_name: {**entry, "scheduling": "request"}}
        start = time.perf_counter()
        self.harness = ServiceHarness(models, self.scratch / "service-cache",
                                      max_batch_size=max(plan.engine_batches))
        loaded = self.harness.load(self.model_name)
        seconds = time.perf_counter() - start
        base = loaded.base
        # What the checkpoint provides (weights, tokenizer); each pipeline keeps its own
        # scheduler (it holds per-call state).
        self.shared = {name: component for name, component in base.components.items()
                       if component is not None and name != "scheduler"
                       and base.component_specs[name].default_creation_method == "from_pretrained"}
        self.modules = {name: c for name, c in self.shared.items()
                        if isinstance(c, torch.nn.Module)}
        self.ours = self.make_pipeline()
        import diffusers

        index = json.loads((self.checkpoint / "model_index.json").read_text())
        reference_class = getattr(diffusers, index["_class_name"])
        self.reference = reference_class.from_pretrained(str(self.checkpoint), **self.shared)
        self.reference.set_progress_bar_config(disable=True)
        self.dtype = dtype
        self.engine = EngineRun(self.harness, self.model_name, plan.prompt, plan.width,
                                plan.height, plan.steps, plan.guidance_scale)
        weights = {name: round(module_bytes(m) / MIB, 1) for name, m in self.modules.items()}
        data = {"seconds": round(seconds, 1), "dtype": dtype, "weights_mib": weights,
                "reference": reference_class.__name__}
        parts = ", ".join(f"{name} {mib:.0f}" for name, mib in weights.items())
        return Outcome(f"loaded by the service registry in {seconds:.1f}s: "
                       f"{sum(weights.values()):.0f} MiB of {dtype} weights on {self.device} "
                       f"({parts})", data)

    def make_pipeline(self, manager: Any = None) -> Any:
        """A fresh `ModularPipeline` of the checkpoint on the shared components."""
        from blocks import ModularPipeline

        pipe = ModularPipeline.from_pretrained(str(self.checkpoint), components_manager=manager,
                                               collection="gpu-check" if manager else None)
        pipe.update_components(**self.shared)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _cast(self, dtype: str) -> None:
        if self.dtype != dtype:
            for module in self.modules.values():
                module.to(DTYPES[dtype])
            self.dtype = dtype

    def _ours(self, pipe: Any = None) -> np.ndarray:
        pipe = pipe if pipe is not None else self.ours
        return np.asarray(pipe(**self.plan.call_inputs(), generator=_generator(self.plan.seed),
                               output="images"), dtype=np.float32)

    def _theirs(self) -> np.ndarray:
        out = self.reference(**self.plan.call_inputs(), generator=_generator(self.plan.seed))
        return np.asarray(out.images, dtype=np.float32)

    # -- 3. parity and memory -----------------------------------------------------------------

    def parity(self, dtype: str) -> Outcome:
        self._cast(dtype)
        meter = meter_for(self.device)
        images, rows, peaks = {}, {}, {}
        for name, run in (("blockserve", self._ours), ("diffusers", self._theirs)):
            probe = ComponentMemoryProbe(self.modules, meter)
            with probe.watching():
                images[name] = run()
            meter.sync()
            peaks[name] = max(probe.overall, meter.peak())
            rows[name] = probe.rows()
        ours, theirs = images["blockserve"], images["diffusers"]
        self.images[dtype] = ours
        finite_ours, finite_theirs = np.isfinite(ours), np.isfinite(theirs)
        same_mask = bool(np.array_equal(finite_ours, finite_theirs))
        both = finite_ours & finite_theirs
        diff = float(np.abs(ours[both] - theirs[both]).max()) if both.any() else float("nan")
        differing = float((np.round(ours * 255) != np.round(theirs * 255))[both].mean()) \
            if both.any() else float("nan")
        nonfinite = int((~finite_ours).sum())
        memory = [{"component": a["component"], "class": a["class"],
                   "weights_mib": a["weights_mib"], "forwards": a["forwards"],
                   "peak_mib": a["peak_mib"], "activations_mib": a["activations_mib"],
                   "diffusers_peak_mib": b["peak_mib"],
                   "diffusers_activations_mib": b["activations_mib"]}
                  for a, b in zip(rows["blockserve"], rows["diffusers"], strict=True)]
        tolerance = PARITY_TOLERANCE[dtype]
        ok = same_mask and both.any() and diff <= tolerance
        exact = "" if meter.exact else " (CPU: RSS sampled at module boundaries)"
        data = {"dtype": dtype, "max_abs_diff": diff, "tolerance": tolerance,
                "differing_8bit_fraction": differing, "nonfinite_values": nonfinite,
                "same_nonfinite_positions": same_mask,
                "peak_mib": {k: round(v / MIB, 1) for k, v in peaks.items()},
                "memory_exact": meter.exact, "memory": memory}
        notes = [] if nonfinite == 0 else [
            f"{nonfinite} non-finite values in our image (random weights overflow {dtype}?); "
            f"compared where both are finite"]
        summary = (f"{dtype}: max |ours - diffusers| {diff:.3g} (tolerance {tolerance:g}), "
                   f"{differing:.2%} of 8-bit values differ; peak {peaks['blockserve'] / MIB:.0f}"
                   f" MiB (diffusers {peaks['diffusers'] / MIB:.0f}){exact}")
        return Outcome(summary, data, ok, notes=notes)

    # -- 4. speed -----------------------------------------------------------------------------

    def speed(self, dtype: str) -> Outcome:
        self._cast(dtype)
        runners = {"blockserve": self._ours, "diffusers": self._theirs}
        times: dict[str, list[float]] = {name: [] for name in runners}
        names = list(runners)
        partial = False
        for round_index in range(self.plan.speed_rounds):
            if round_index and self.budget.left() < 2 * sum(t[-1] for t in times.values()) + 5:
                partial = True
                break
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                self._sync()
                start = time.perf_counter()
                runners[name]()
                self._sync()
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(values) * 1000 for name, values in times.items()}
        ratio = median["blockserve"] / median["diffusers"]
        data = {"dtype": dtype, "runs": len(times["blockserve"]),
                "ms_per_image": {k: round(v, 1) for k, v in median.items()},
                "all_ms": {k: [round(x * 1000, 1) for x in v] for k, v in times.items()},
                "ratio_ours_to_diffusers": round(ratio, 3),
                "resolution": f"{self.plan.width}x{self.plan.height}", "steps": self.plan.steps}
        summary = (f"{dtype} {self.plan.width}x{self.plan.height}, {self.plan.steps} steps: "
                   f"{median['blockserve']:.0f} ms/image vs diffusers {median['diffusers']:.0f}"
                   f" ({ratio:.3f}x, median of {len(times['blockserve'])} interleaved)")
        return Outcome(summary, data, partial=partial)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- 5. offload under a budget ------------------------------------------------------------

    def offload_budget(self) -> Outcome:
        assert self.dtype in self.images, "parity() in this dtype first"
        return check_offload_budget(self.modules, self.make_pipeline, self._ours,
                                    self.images[self.dtype], self.device)

    # -- the end ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the engine and drop every reference to the weights, freeing the device."""
        if self.harness is not None:
            self.harness.stop()
        self.harness = self.engine = self.ours = self.reference = None
        self.modules, self.shared = {}, {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"{self.plan.family}: released")
