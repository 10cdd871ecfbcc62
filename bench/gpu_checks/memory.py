"""Memory: peak use per component, and the two memory paths of `ComponentsManager` that only
a GPU really exercises.

- `ComponentMemoryProbe`: while a pipeline runs, the peak memory while each component's
  forward runs (hooks on the component and its direct children, so `vae.decode`, which
  calls `post_quant_conv` and `decoder`, counts too) and how much of it its activations
  took. On CUDA the allocator's own peak; on a CPU the process's RSS sampled at the same
  hooks (a rough figure, labelled so), which keeps the hooks' logic exercised.
- `check_oom_retry`: the manager's answer to a real `torch.OutOfMemoryError` during a move
  (`ComponentsManager._load`: offload every idle module, retry once, else roll back and raise
  `ComponentOutOfMemoryError`). On CUDA a ballast allocation leaves too little free memory
  while the manager's own estimate says there is plenty, so only the allocator refuses: the
  real path. A CPU has no allocator limit; there the modules refuse their first moves the
  way a full GPU does (as the unit tests do), and the report says so.
- `check_offload_budget`: a real pipeline under `enable_auto_offload` with a budget that
  holds one model at a time: every block's models are moved in and idle ones out, and the
  image must be the one the pipeline makes with everything resident.

Not handled here: running pipelines (`gpu_checks.pipelines` passes a call in).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from blocks import ComponentOutOfMemoryError, ComponentsManager
from gpu_checks.runner import Outcome

MIB = 2**20


# ----------------------------------------------------------------------------- meters


class CudaMeter:
    """The CUDA caching allocator's own counters: exact."""

    exact = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


class HostMeter:
    """The process's resident set, sampled when asked: a CPU has no allocator peak."""

    exact = False

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._peak = 0

    def sync(self) -> None:
        pass

    def current(self) -> int:
        value = self._process.memory_info().rss
        self._peak = max(self._peak, value)
        return value

    def reset_peak(self) -> None:
        self._peak = self.current()

    def peak(self) -> int:
        return max(self._peak, self.current())


def meter_for(device: torch.device) -> CudaMeter | HostMeter:
    return CudaMeter(device) if device.type == "cuda" else HostMeter()


def module_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------- the probe


@dataclass
class _Phases:
    depth: int = 0
    start: int = 0
    phases: int = 0
    peak: int = 0
    activations: int = 0  # most memory above the phase's start


@dataclass
class ComponentMemoryProbe:
    """Peak memory during each component's forwards (see the module docstring).

    Each forward resets the meter's peak, so the whole call's peak is `overall`: the most
    seen at any component's forward (the weights of every resident model included)."""

    components: dict[str, torch.nn.Module]
    meter: CudaMeter | HostMeter
    overall: int = 0
    _state: dict[str, _Phases] = field(default_factory=dict)

    @contextmanager
    def watching(self) -> Iterator[ComponentMemoryProbe]:
        handles = []
        self._state = {name: _Phases() for name in self.components}
        for name, module in self.components.items():
            for part in (module, *module.children()):
                handles.append(part.register_forward_pre_hook(self._enter(name)))
                handles.append(part.register_forward_hook(self._leave(name), always_call=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            state = self._state[name]
            if state.depth == 0:
                self.meter.sync()
                state.start = self.meter.current()
                self.meter.reset_peak()
            state.depth += 1

        return hook

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            state = self._state[name]
            state.depth -= 1
            if state.depth == 0:
                self.meter.sync()
                peak = self.meter.peak()
                state.phases += 1
                state.peak = max(state.peak, peak)
                self.overall = max(self.overall, peak)
                state.activations = max(state.activations, peak - state.start)

        return hook

    def rows(self) -> list[dict[str, Any]]:
        """One row per component: weights, forwards seen, peak and activation MiB."""
        return [{
            "component": name,
            "class": type(module).__name__,
            "weights_mib": round(module_bytes(module) / MIB, 1),
            "forwards": self._state[name].phases,
            "peak_mib": round(self._state[name].peak / MIB, 1),
            "activations_mib": round(self._state[name].activations / MIB, 1),
        } for name, module in self.components.items()]


# ----------------------------------------------------------------------------- OOM retry


class _RefusingLinear(torch.nn.Linear):
    """A real Linear (one weight tensor, so a move is all or nothing) whose next `refusals`
    moves raise as a full GPU does; 0 on CUDA, where the allocator decides."""

    def __init__(self, nbytes: int, value: float) -> None:
        super().__init__(4096, max(1, nbytes // (4 * 4096)), bias=False)
        with torch.no_grad():
            # Distinct constants: equal weights would be one shared entry in the manager; and
            # filling is instant where drawing GiBs of random numbers takes seconds.
            self.weight.fill_(value)
        self.refusals = 0

    def to(self, *args: Any, **kwargs: Any) -> _RefusingLinear:
        if self.refusals:
            self.refusals -= 1
            raise torch.OutOfMemoryError("out of memory (refused by the CPU smoke check)")
        return super().to(*args, **kwargs)


class _CudaBallast:
    """Takes the device's free memory but `leave` bytes, in one allocation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tensor: torch.Tensor | None = None

    def leave(self, leave: int) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        take = free - leave
        for _ in range(64):  # the driver keeps a little for itself: step down until it fits
            try:
                self.tensor = torch.empty(take, dtype=torch.uint8, device=self.device)
                break
            except torch.OutOfMemoryError:
                take -= 8 * MIB
        if self.tensor is None:
            raise RuntimeError(f"could not allocate a ballast of {take / MIB:.0f} MiB")
        return take

    def release(self) -> None:
        self.tensor = None
        torch.cuda.empty_cache()


def check_oom_retry(device: torch.device, module_mib: int) -> Outcome:
    """A retry that succeeds after offloading an idle module, then one that rolls back."""
    size = module_mib * MIB
    manager = ComponentsManager()
    modules = {name: _RefusingLinear(nbytes, value) for name, nbytes, value in
               (("idle", size, 1e-3), ("fits_after_retry", size, 2e-3),
                ("never_fits", 2 * size, 3e-3))}
    ids = {name: manager.add(name, module) for name, module in modules.items()}
    # The manager's estimate says "plenty" (a huge budget, and on CUDA a free-memory query
    # that overstates): only a real allocation failure can stop a move.
    manager.enable_auto_offload(device, memory_budget=1 << 50,
                                free_memory_fn=(lambda: 1 << 50) if device.type == "cuda"
                                else None)
    ballast = _CudaBallast(device) if device.type == "cuda" else None
    data: dict[str, Any] = {"module_mib": module_mib,
                            "allocator": "CUDA (ballast leaves half a module free)"
                            if ballast else "CPU: the modules refuse their first moves"}
    x = torch.ones(1, 4096, device=device)
    try:
        with manager.using([ids["idle"]]):
            pass
        if ballast is not None:
            data["ballast_mib"] = round(ballast.leave(size // 2) / MIB)
        else:
            modules["fits_after_retry"].refusals = 1
            modules["never_fits"].refusals = 2
        first = len(manager.offload_log)
        with manager.using([ids["fits_after_retry"]]):
            output = modules["fits_after_retry"](x)
        retried = [(r.component_id, r.reason) for r in manager.offload_log[first:]]
        expected = [(ids["idle"], "evict-oom"), (ids["fits_after_retry"], "load-retry")]
        allocated_before = torch.cuda.memory_allocated(device) if ballast else 0
        raised: ComponentOutOfMemoryError | None = None
        try:
            with manager.using([ids["never_fits"]]):
                pass
        except ComponentOutOfMemoryError as error:
            raised = error
        allocated_after = torch.cuda.memory_allocated(device) if ballast else 0
    finally:
        if ballast is not None:
            ballast.release()
    never = modules["never_fits"].weight
    rolled_back = (raised is not None and manager.offload_log[-1].reason == "rollback"
                   and not manager.is_resident(ids["never_fits"])
                   and never.device.type == "cpu" and manager.use_count(ids["never_fits"]) == 0)
    leaked = allocated_after - allocated_before
    data.update({
        "moves_after_pressure": [{"component": c, "reason": r} for c, r in retried],
        "retry_output_finite": bool(torch.isfinite(output).all()),
        "second_oom_raised": type(raised).__name__ if raised else "nothing",
        "rolled_back": rolled_back,
        "leaked_mib": round(leaked / MIB, 1),
    })
    ok = retried == expected and rolled_back and leaked <= 0 and data["retry_output_finite"]
    retry = "ok" if retried == expected else f"WRONG moves {retried}"
    second = "rolled back, ComponentOutOfMemoryError" if rolled_back else "NOT rolled back"
    summary = (f"OOM on a move -> idle module offloaded, retry {retry}; second OOM -> {second}; "
               f"leaked {leaked / MIB:.0f} MiB ({data['allocator']})")
    return Outcome(summary, data, ok)


# ----------------------------------------------------------------------------- budget offload


def check_offload_budget(
    components: dict[str, torch.nn.Module],
    make_pipeline: Callable[[ComponentsManager], Any],
    call: Callable[[Any], np.ndarray],
    reference: np.ndarray,
    device: torch.device,
) -> Outcome:
    """Run `call(pipeline)` with a budget that holds the largest model but no two models.

    `make_pipeline(manager)` returns a pipeline whose modules (`components`, shared with the
    rest of the run) the manager holds; afterwards everything is back on `device`."""
    manager = ComponentsManager()
    pipe = make_pipeline(manager)
    # Weights start at home (the CPU), as when a device has room for one model at a time; a
    # module already on the device would count as resident and never have to move.
    for module in components.values():
        module.to("cpu")
    sizes = sorted(module_bytes(m) for m in components.values())
    largest = sizes[-1]
    budget_bytes = largest + sizes[0] // 2  # any two models are more than this
    total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None
    # On CUDA as a fraction of the card (the branch that asks the device its size).
    budget: int | float = budget_bytes / total if total else budget_bytes
    limit = int(budget * total) if total else budget_bytes  # as the manager resolves it
    manager.enable_auto_offload(device, memory_budget=budget)
    try:
        start = time.perf_counter()
        image = call(pipe)
        seconds = time.perf_counter() - start
        log = manager.offload_log
    finally:
        manager.disable_auto_offload()
        for module in components.values():
            module.to(device)
    moves = [{"component": r.component_id, "to": r.to_device, "reason": r.reason,
              "resident_mib": round(r.resident_bytes / MIB, 1)} for r in log]
    evictions = sum(not r.is_load for r in log)
    over = [r for r in log if r.resident_bytes > limit]
    identical = bool(np.array_equal(image, reference))
    diff = float(np.abs(image.astype(np.float64) - reference).max())
    data = {"budget_mib": round(limit / MIB, 1), "largest_mib": round(largest / MIB, 1),
            "budget_as": "fraction of the device" if total else "bytes",
            "moves": moves, "evictions": evictions, "seconds": round(seconds, 3),
            "max_abs_diff_vs_resident": diff}
    ok = identical and evictions > 0 and not over
    summary = (f"budget {limit / MIB:.0f} MiB (largest model {largest / MIB:.0f} MiB): "
               f"{len(log)} moves, {evictions} offloads, never over budget: {not over}; image "
               f"{'identical to' if identical else f'DIFFERS (max {diff:.3g}) from'} the "
               f"all-resident one; {seconds * 1000:.0f} ms")
    return Outcome(summary, data, ok)
