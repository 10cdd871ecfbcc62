"""Benchmark: memory of TextEncoder replicas on one node, with the shared weight pool vs.
each replica loading its own copy.

Writes an SD checkpoint whose text encoder is CLIP-sized (hidden 768, 6 layers, ~170 MB in
float32; the rest is the tiny test model), starts a fresh local Ray cluster per run and, on
it, N replica actors running exactly what a `TextEncoder` deployment replica runs
(`deployments.block_host.BlockHost(TEXT_ENCODER, ...)`, with or without
`deployments.weight_pool.PooledWeights`). For N = 1 and N = 2, in both modes, it measures
every process of the cluster (raylet, registry, workers; those that start or exit in between
are left out) before the replicas load their weights and after they loaded them and encoded
one prompt (which touches every weight page), and prints the increase:

- USS (psutil's unique set size): private pages. Pages shared by two processes drop out of
  it, so it shows what each replica holds *privately*;
- PSS (proportional set size): shared pages split between the processes mapping them, so the
  sum counts every page once: the node's real memory.

Goal (issue 9): with the pool, two replicas' increase is < 1.3x one replica's. With
`--dtype float32` the private baseline shares too: the loader maps the float32 safetensors
file and the page cache holds it once; `--dtype float16` makes each private load convert,
i.e. hold its own copy, as any dtype change or a checkpoint on another node would. Run:

    python bench/weight_pool.py [--hidden 768] [--layers 6]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import psutil

MODEL = "bench"


def write_checkpoint(folder: Path, hidden: int, layers: int) -> Path:
    """The tiny SD checkpoint with a CLIP-sized text encoder (same tokenizer)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from blocks.stable_diffusion.tiny_model import write_tiny_sd

    path = write_tiny_sd(folder / "ckpt")
    small = json.loads((path / "text_encoder" / "config.json").read_text())
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=small["vocab_size"], hidden_size=hidden,
                            intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=hidden // 64,
                            max_position_embeddings=small["max_position_embeddings"],
                            bos_token_id=small["bos_token_id"],
                            eos_token_id=small["eos_token_id"],
                            pad_token_id=small["pad_token_id"])
    CLIPTextModel(config).save_pretrained(path / "text_encoder")
    return path


def cluster_memory() -> dict[int, tuple[str, int, int]]:
    """{pid: (name, USS, PSS)} of every process this driver's Ray cluster runs."""
    found = {}
    for process in psutil.Process().children(recursive=True):
        try:
            info = process.memory_full_info()
            name = " ".join(process.cmdline())[:60]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found[process.pid] = (name, info.uss, info.pss)
    return found


def run(path: Path, warmup: Path, dtype: str, replicas: int, pooled: bool) -> dict[str, int]:
    import ray

    from deployments.weight_pool import shutdown_registry
    from service.ray_placement import init_local_ray

    init_local_ray(num_cpus=2, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Replica:
            """What a TextEncoder deployment replica runs, one `BlockHost` per load."""

            def __init__(self) -> None:
                import torch

                torch.set_num_threads(1)
                self.hosts: list = []
                self.pool = None

            def load(self, path: str, dtype: str, pooled: bool) -> None:
                import torch

                from blocks.families import TEXT_ENCODER
                from deployments.block_host import BlockHost
                from deployments.weight_pool import PooledWeights, get_registry

                if pooled and self.pool is None:
                    self.pool = PooledWeights(get_registry(),
                                              ray.get_runtime_context().get_actor_id())
                models = {MODEL: {"path": path, "family": "sd", "dtype": dtype,
                                  "device": "cpu"}}
                host = BlockHost(TEXT_ENCODER, models, pool=self.pool if pooled else None)
                self.hosts.append(host)
                pipe = host.pipelines[MODEL]
                ids = torch.arange(8).unsqueeze(0) % pipe.components["tokenizer"].vocab_size
                with torch.inference_mode():  # touches every weight page
                    pipe.components["text_encoder"](ids)

        actors = [Replica.remote() for _ in range(replicas)]
        # Warm-up on the tiny checkpoint: imports, the registry, a loader task — costs a
        # replica pays whatever its weights, kept out of the measurement.
        ray.get([actor.load.remote(str(warmup), dtype, pooled) for actor in actors])
        time.sleep(2)  # let worker start-up settle
        gc.collect()
        before = cluster_memory()
        for actor in actors:  # one after the other: a replica joining a running node
            ray.get(actor.load.remote(str(path), dtype, pooled))
        time.sleep(2)  # the loader task's process exits
        after = cluster_memory()
        if os.environ.get("BENCH_VERBOSE"):
            for pid in sorted(set(before) | set(after)):
                name, uss0, pss0 = before.get(pid, ("", 0, 0))
                name, uss1, pss1 = after.get(pid, (name, 0, 0))
                if abs(pss1 - pss0) > 2**20 or abs(uss1 - uss0) > 2**20:
                    print(f"   {pid} {name}: USS {(uss1 - uss0) / 2**20:+.1f} "
                          f"PSS {(pss1 - pss0) / 2**20:+.1f} MiB")
        # Processes that started or exited meanwhile (Ray's idle workers; the loader task's
        # one-shot worker) are left out: they would count a worker's start-up, not weights.
        both = set(before) & set(after)
        return {key: sum(after[pid][i] - before[pid][i] for pid in both)
                for i, key in ((1, "uss"), (2, "pss"))}
    finally:
        shutdown_registry()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="the replicas' dtype (float16: a private load converts, so it "
                             "can't map the checkpoint file)")
    args = parser.parse_args()
    from blocks.stable_diffusion.tiny_model import write_tiny_sd

    with tempfile.TemporaryDirectory() as folder:
        warmup = write_tiny_sd(Path(folder) / "warmup")
        path = write_checkpoint(Path(folder), args.hidden, args.layers)
        weights = sum(f.stat().st_size for f in (path / "text_encoder").glob("*.safetensors"))
        print(f"text encoder weights: {weights / 2**20:.1f} MiB on disk (float32); "
              f"replicas load them as {args.dtype}")
        results = {}
        for pooled in (True, False):
            for replicas in (1, 2):
                results[(pooled, replicas)] = run(path, warmup, args.dtype, replicas, pooled)
                mode = "pool" if pooled else "private"
                delta = results[(pooled, replicas)]
                print(f"{mode:8s} replicas={replicas}: +USS {delta['uss'] / 2**20:7.1f} MiB  "
                      f"+PSS {delta['pss'] / 2**20:7.1f} MiB", flush=True)
    print()
    print("increase with 2 replicas / with 1 replica (goal with the pool: < 1.3)")
    for pooled in (True, False):
        one, two = results[(pooled, 1)], results[(pooled, 2)]
        mode = "pool" if pooled else "private"
        print(f"{mode:8s} USS {two['uss'] / one['uss']:.2f}x   PSS {two['pss'] / one['pss']:.2f}x")


if __name__ == "__main__":
    main()
