"""`PooledWeights` against a real registry on a local Ray cluster (no Serve): a memory budget
offloads the smallest set of idle components that makes room and brings them back from the
pool on use; a component in use is never dropped, and a budget too small for what is in use
fails with an error naming the budget and what is held."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed (pip install '.[ray]')")

from blocks.stable_diffusion.tiny_model import write_tiny_sd  # noqa: E402
from deployments.weight_arena import resident_bytes  # noqa: E402
from deployments.weight_pool import PooledWeights, get_registry, shutdown_registry  # noqa: E402
from service.ray_placement import init_local_ray  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    path = write_tiny_sd(tmp_path_factory.mktemp("budget") / "ckpt")
    init_local_ray(num_cpus=1, log_to_driver=False)
    try:
        yield str(path)
    finally:
        shutdown_registry()
        ray.shutdown()


def test_budget_offloads_lru_idle_components_and_the_pool_brings_them_back(checkpoint) -> None:
    registry = get_registry(heartbeat_s=0.5)
    probe = PooledWeights(registry, "probe")
    for name in ("unet", "vae", "text_encoder"):
        probe.load("m", checkpoint, name)
    sizes = {name: held["bytes"] for name, held in  # arena bytes: what the budget counts
             ((key.split("/")[1], held) for key, held in probe.describe().items())}
    probe.close()
    # Room for the UNet and one of the two small ones, not for all three.
    budget = sizes["unet"] + max(sizes["vae"], sizes["text_encoder"])
    pool = PooledWeights(registry, "replica", memory_budget_bytes=budget, heartbeat_s=0.5)
    try:
        vae = pool.load("m", checkpoint, "vae")
        text_encoder = pool.load("m", checkpoint, "text_encoder")
        # The UNet needs exactly the text encoder's bytes more: the smallest idle set that
        # frees enough is the text encoder alone.
        unet = pool.load("m", checkpoint, "unet")
        assert resident_bytes(text_encoder) == {}
        assert resident_bytes(unet) and resident_bytes(vae)
        assert pool.resident_bytes() <= budget

        loads = ray.get(registry.stats.remote())["loads"]
        with pool.using("m", ["text_encoder"]):  # back from the pool; the idle VAE makes room
            assert resident_bytes(text_encoder)
            assert resident_bytes(vae) == {}
            with torch.inference_mode():
                text_encoder(torch.tensor([[1, 2, 3]]))
        assert ray.get(registry.stats.remote())["loads"] == loads  # no disk read
        assert pool.offloads == 2

        # Everything in use at once doesn't fit: a clear error, nothing dropped or leaked.
        with pool.using("m", ["unet", "text_encoder"]):
            with (pytest.raises(MemoryError, match=r"memory_budget_bytes is \d+.*unet.*in use"),
                  pool.using("m", ["vae"])):
                pass
            assert resident_bytes(unet) and resident_bytes(text_encoder)
        assert pool.describe()["m/vae"]["in_use"] == 0
    finally:
        pool.close()
