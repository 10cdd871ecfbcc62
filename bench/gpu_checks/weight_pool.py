"""Ray mode's weight pool with replicas that hold a fraction of a GPU each.

Two Ray actors, each asking for `gpu_fraction` of the GPU (as a Serve replica with
`ray_actor_options: {num_gpus: 0.25}` does), build the same component from the pool
(`deployments.weight_pool.PooledWeights`) on the device and run it; then they stay idle past
`idle_offload_s`, which must drop their device copies (the allocator's bytes go down), and
run again, which must bring the weights back from the pool, not from disk (the registry's
`loads` stay at 1), with the same output. On a CPU (`--smoke`) the same actors run without a
GPU share and the pool maps the object store's pages instead of copying them to a device.

Not handled here: Serve's routing and HTTP (the integration tests run the whole Serve app).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_checks.memory import MIB
from gpu_checks.runner import CheckSkipped, Outcome, log

MODEL = "gpu-check"


def _replica_class() -> Any:
    """The actor class, defined here so Ray ships it by value with this function."""
    import ray

    @ray.remote
    class PoolReplica:
        def __init__(self, name: str, idle_offload_s: float, heartbeat_s: float) -> None:
            from deployments.weight_pool import PooledWeights, get_registry

            self.pool = PooledWeights(get_registry(heartbeat_s), name,
                                      idle_offload_s=idle_offload_s, heartbeat_s=heartbeat_s)
            self.device = torch.device("cpu")
            self.module: Any = None
            self.component = ""

        def load(self, path: str, component: str, dtype: str, device: str) -> dict[str, Any]:
            self.device, self.component = torch.device(device), component
            self.module = self.pool.load(MODEL, path, component, dtype, device)
            return self.state()

        def decode(self, latents: torch.Tensor) -> np.ndarray:
            with self.pool.using(MODEL, [self.component]), torch.inference_mode():
                dtype = next(self.module.parameters()).dtype
                out = self.module.decode(latents.to(self.device, dtype)).sample
            return out.float().cpu().numpy()

        def state(self) -> dict[str, Any]:
            described = self.pool.describe().get(f"{MODEL}/{self.component}", {})
            allocated = (torch.cuda.memory_allocated(self.device)
                         if self.device.type == "cuda" else None)
            return {"resident": described.get("resident"), "bytes": described.get("bytes"),
                    "allocated": allocated, "gpu_ids": [str(g) for g in _gpu_ids()],
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

        def close(self) -> None:
            self.pool.close()

    return PoolReplica


def _gpu_ids() -> list[Any]:
    import ray

    return list(ray.get_gpu_ids())


def check_weight_pool(checkpoint: Path, dtype: str, device: torch.device, latent_side: int,
                      gpu_fraction: float = 0.25, replicas: int = 2,
                      idle_offload_s: float = 1.0) -> Outcome:
    try:
        import ray
    except ImportError:
        raise CheckSkipped("ray is not installed here (pip install '.[ray]')") from None
    from deployments.weight_pool import registry_stats, shutdown_registry

    gpu = device.type == "cuda"
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    start = time.monotonic()
    ray.init(num_cpus=max(2, replicas), num_gpus=1 if gpu else 0, include_dashboard=False,
             _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    log(f"  ray started in {time.monotonic() - start:.1f}s")
    actors: list[Any] = []
    try:
        cls = _replica_class()
        heartbeat_s = 0.25
        actors = [cls.options(num_cpus=0.5, num_gpus=gpu_fraction if gpu else 0).remote(
            f"gpu-check-replica-{i}", idle_offload_s, heartbeat_s) for i in range(replicas)]
        loaded = ray.get([a.load.remote(str(checkpoint), "vae", dtype, str(device))
                          for a in actors])
        log(f"  {replicas} replicas built the VAE from the pool at "
            f"{time.monotonic() - start:.1f}s")
        latents = torch.randn(1, 4, latent_side, latent_side,
                              generator=torch.Generator().manual_seed(0))
        first = ray.get([a.decode.remote(latents) for a in actors])
        busy = ray.get([a.state.remote() for a in actors])
        stats_loaded = registry_stats(timeout_s=10) or {}
        log(f"  pool: loads {stats_loaded.get('loads')}, hits {stats_loaded.get('hits')}; "
            f"waiting {idle_offload_s}s for the idle offload")
        deadline = time.monotonic() + idle_offload_s + 15
        idle = busy
        while time.monotonic() < deadline:
            idle = ray.get([a.state.remote() for a in actors])
            if not any(state["resident"] for state in idle):
                break
            time.sleep(0.2)
        again = ray.get([a.decode.remote(latents) for a in actors])
        stats_after = registry_stats(timeout_s=10) or {}
        for actor in actors:
            ray.get(actor.close.remote())
    finally:
        for actor in actors:
            ray.kill(actor)
        shutdown_registry()
        ray.shutdown()
    entry_bytes = loaded[0]["bytes"] or 0
    replicas_same = all(np.array_equal(first[0], out) for out in first)
    back_same = all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    offloaded = not any(state["resident"] for state in idle)
    freed = [None if b["allocated"] is None else b["allocated"] - i["allocated"]
             for b, i in zip(busy, idle, strict=True)]
    device_freed = all(f is not None and f >= 0.9 * entry_bytes for f in freed) if gpu else True
    from_pool = stats_after.get("loads") == 1 and stats_after.get("hits", 0) > stats_loaded.get(
        "hits", 0)
    rows = [{"replica": i, "gpu_ids": b["gpu_ids"], "cuda_visible_devices":
             b["cuda_visible_devices"],
             "allocated_mib_in_use": None if b["allocated"] is None else round(
                 b["allocated"] / MIB, 1),
             "allocated_mib_idle": None if s["allocated"] is None else round(
                 s["allocated"] / MIB, 1),
             "resident_after_idle": s["resident"]}
            for i, (b, s) in enumerate(zip(busy, idle, strict=True))]
    data = {"component": "vae", "entry_mib": round(entry_bytes / MIB, 1),
            "gpu_fraction": gpu_fraction if gpu else 0, "replicas": rows,
            "registry_after_load": {k: stats_loaded.get(k) for k in ("loads", "hits", "misses")},
            "registry_after_reuse": {k: stats_after.get(k) for k in ("loads", "hits", "misses")},
            "same_output_across_replicas": replicas_same, "same_output_after_offload": back_same}
    ok = replicas_same and back_same and offloaded and device_freed and from_pool
    share = f"{gpu_fraction} GPU each" if gpu else "no GPU (CPU smoke)"
    summary = (f"{replicas} replicas ({share}) built the {entry_bytes / MIB:.0f} MiB VAE from one "
               f"pool entry (loads {stats_loaded.get('loads')}); idle offload "
               f"{'dropped' if offloaded else 'did NOT drop'} the device copies"
               + (f" (freed {min(f or 0 for f in freed) / MIB:.0f} MiB each)" if gpu else "")
               + f"; back from the pool (loads {stats_after.get('loads')}) with "
               + ("the same output" if back_same else "a DIFFERENT output"))
    return Outcome(summary, data, ok)
