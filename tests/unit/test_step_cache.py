"""Step caching (`blocks.step_cache`) on the real denoiser classes at tiny size: hooks change
nothing while caching is off, cached forwards skip the blocks they should (counted), and
requests with different decisions sharing a step give each request the bytes it gets alone.

The loops here are minimal flow-matching / noise-prediction loops driving the models
directly, so that only the caching is under test; pipeline-level behaviour is tested with the
step scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel, UNet2DConditionModel

import blocks.flux2
import blocks.stable_diffusion  # noqa: F401 - registers the UNet's hooks
from blocks.batch_invariance import batch_invariant
from blocks.flux2.tiny_model import write_tiny_flux2_klein
from blocks.pipeline import ModularPipeline
from blocks.step_cache import (
    CachedMember,
    InvalidStepCache,
    StepCache,
    cache_methods,
    install_cache_hooks,
    remove_cache_hooks,
    run_cached,
    step_cache_config,
    step_caching,
)

STEPS = 5
pytestmark = pytest.mark.usefixtures("quiet_diffusers")


@pytest.fixture(autouse=True)
def _inference() -> Iterator[None]:
    # One thread: these tiny forwards are fastest so, and a busy machine makes OpenMP's
    # thread team wait for a free core on every op.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(previous)


def test_config_checks_name_the_field_and_the_allowed_values() -> None:
    assert step_cache_config("off") is None and step_cache_config(None) is None
    config = step_cache_config({"method": "fbcache", "threshold": 0.05})
    assert config.method == "fbcache" and config.get("threshold") == 0.05
    assert step_cache_config("deepcache").get("interval") == 3  # defaults filled in
    with pytest.raises(InvalidStepCache, match=r"step_cache: unknown method 'tea'; allowed: "
                                               r"off, fbcache, teacache, deepcache"):
        step_cache_config("tea")
    with pytest.raises(InvalidStepCache, match=r"m\.step_cache: unknown method 'deepcache'; "
                                               r"allowed: off, fbcache"):
        step_cache_config("deepcache", owner="m.step_cache", allowed=("fbcache",))
    with pytest.raises(InvalidStepCache, match=r"step_cache\.interval: 0 is out of range"):
        step_cache_config({"method": "deepcache", "interval": 0})
    with pytest.raises(InvalidStepCache, match=r"unknown parameter 'interval' for fbcache"):
        step_cache_config({"method": "fbcache", "interval": 2})


# -- FLUX.2 transformer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer() -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(
        in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    return model.eval()


def _flux_request(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(1, 16, 16, generator=generator),
            "prompt": torch.randn(1, 8, 32, generator=generator)}


def _ids(count: int, axis: int) -> torch.Tensor:
    ids = torch.zeros(count, 4)
    ids[:, axis] = torch.arange(count)
    return ids


def _flux_forward(model: Flux2Transformer2DModel, requests: list[dict], sigmas: list[float],
                  outputs: dict[int, torch.Tensor]) -> Callable[[list[int]], None]:
    def call(indices: list[int]) -> None:
        hidden = torch.cat([requests[i]["latents"] for i in indices])
        out = model(hidden_states=hidden,
                    encoder_hidden_states=torch.cat([requests[i]["prompt"] for i in indices]),
                    timestep=torch.tensor([sigmas[i] for i in indices]),
                    img_ids=_ids(16, 2), txt_ids=_ids(8, 3), return_dict=False)[0]
        for i, part in zip(indices, out.split(1), strict=True):
            outputs[i] = part.clone()
    return call


def _run_flux(model, requests: list[dict], caches: list[StepCache | None],
              starts: list[int]) -> tuple[list[torch.Tensor], list[list]]:
    """Denoise the requests with Euler steps, request r joining at step `starts[r]`; each
    global step runs the members present as one group. Returns final latents and the
    sub-forwards of each step."""
    requests = [dict(r) for r in requests]
    made = []
    for tick in range(max(starts) + STEPS):
        live = [r for r in range(len(requests)) if starts[r] <= tick < starts[r] + STEPS]
        sigmas = [1.0 - (tick - starts[r]) / STEPS for r in live]
        outputs: dict[int, torch.Tensor] = {}
        members = [CachedMember(caches[r], "cond", 1) for r in live]
        made.append(run_cached(model, members,
                               _flux_forward(model, [requests[r] for r in live], sigmas,
                                             outputs)))
        for k, r in enumerate(live):
            requests[r]["latents"] = requests[r]["latents"] - outputs[k] / STEPS
    return [r["latents"] for r in requests], made


def _count_calls(module: torch.nn.Module) -> list[int]:
    """A one-element list counting `module`'s calls (the hook stays for the module's tests;
    each test reads its own list)."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_hooks_change_nothing_while_caching_is_off(transformer) -> None:
    request = _flux_request(0)
    plain, _ = _run_flux(transformer, [request], [None], [0])
    install_cache_hooks(transformer)
    hooked, made = _run_flux(transformer, [request], [None], [0])
    assert torch.equal(plain[0], hooked[0])
    assert all(sub.method is None for step in made for sub in step)
    assert cache_methods(transformer) == ("fbcache", "teacache")


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
def test_cached_flux_steps_skip_the_blocks(transformer, method) -> None:
    install_cache_hooks(transformer)
    last_single = _count_calls(transformer.single_transformer_blocks[-1].attn)
    second_double = _count_calls(transformer.transformer_blocks[1].attn)
    first_double = _count_calls(transformer.transformer_blocks[0].attn)
    cache = StepCache(step_cache_config({"method": method, "threshold": 100.0}), total=STEPS)
    latents, made = _run_flux(transformer, [_flux_request(1)], [cache], [0])
    # The first step must run fully (nothing to reuse), teacache's last one too; every other
    # step reuses: the later blocks run only in the full forwards.
    full = 2 if method == "teacache" else 1
    assert (cache.full, cache.cached) == (full, STEPS - full)
    assert last_single[0] == second_double[0] == full
    # fbcache's probe runs the first block once per step and the forward replays it;
    # teacache's probe stops before it and its cached forwards skip it too.
    assert first_double[0] == (STEPS if method == "fbcache" else full)
    assert [sub.mode for step in made for sub in step].count("cached") == STEPS - full
    assert torch.isfinite(latents[0]).all()
    assert all(s.probe is None and s.replay is None for s in cache.slots.values())


def test_mixed_decisions_in_one_step_equal_each_request_alone(transformer) -> None:
    install_cache_hooks(transformer)
    configs = [{"method": "fbcache", "threshold": 100.0}, {"method": "fbcache", "threshold": 0.0},
               None, {"method": "teacache", "threshold": 0.5}]
    requests = [_flux_request(seed) for seed in range(10, 14)]
    starts = [0, 1, 0, 2]

    def caches() -> list[StepCache | None]:
        return [None if c is None else StepCache(step_cache_config(c), total=STEPS)
                for c in configs]

    with batch_invariant():
        together_caches = caches()
        together, made = _run_flux(transformer, requests, together_caches, starts)
        alone_caches = caches()
        alone = [_run_flux(transformer, [requests[r]], [alone_caches[r]], [0])[0][0]
                 for r in range(len(requests))]
    for r in range(len(requests)):
        assert torch.equal(together[r], alone[r]), f"request {r}"
    assert [(c.full, c.cached) for c in together_caches if c is not None] == \
        [(c.full, c.cached) for c in alone_caches if c is not None]
    # Some step really split one group into a cached and a full sub-forward.
    assert any({"cached", "full"} <= {sub.mode for sub in step} for step in made)
    assert together_caches[1].cached == 0 and together_caches[0].cached > 0


# -- SD UNet -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4)
    return model.eval()


def _run_unet(model, requests: list[dict], caches: list[StepCache | None],
              starts: list[int]) -> tuple[list[torch.Tensor], list[list]]:
    """Guided noise-prediction loop (rows [uncond, cond] per request, as SD's denoiser)."""
    requests = [dict(r) for r in requests]
    made = []
    for tick in range(max(starts) + STEPS):
        live = [r for r in range(len(requests)) if starts[r] <= tick < starts[r] + STEPS]
        outputs: dict[int, torch.Tensor] = {}

        def call(indices: list[int], live=live, tick=tick, outputs=outputs) -> None:
            reqs = [requests[live[i]] for i in indices]
            sample = torch.cat([torch.cat([r["latents"]] * 2) for r in reqs])
            timesteps = torch.tensor([999 - 120 * (tick - starts[live[i]]) for i in indices
                                      for _ in range(2)])
            embeds = torch.cat([r["embeds"] for r in reqs])
            out = model(sample, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
            for i, part in zip(indices, out.split(2), strict=True):
                outputs[i] = part.clone()

        made.append(run_cached(model, [CachedMember(caches[r], "unet", 2) for r in live], call))
        for k, r in enumerate(live):
            uncond, cond = outputs[k].chunk(2)
            requests[r]["latents"] = requests[r]["latents"] - 0.1 * (uncond + 3 * (cond - uncond))
    return [r["latents"] for r in requests], made


def _unet_request(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(1, 4, 8, 8, generator=generator),
            "embeds": torch.randn(2, 8, 16, generator=generator)}


def test_deepcache_runs_the_deep_levels_every_interval_and_batches_like_alone(unet) -> None:
    plain, _ = _run_unet(unet, [_unet_request(0)], [None], [0])
    install_cache_hooks(unet)
    hooked, _ = _run_unet(unet, [_unet_request(0)], [None], [0])
    assert torch.equal(plain[0], hooked[0])  # caching off: the same bytes

    mid = _count_calls(unet.mid_block.attentions[0])
    outer = _count_calls(unet.up_blocks[-1].resnets[0])
    cache = StepCache(step_cache_config({"method": "deepcache", "interval": 3}))
    cached, _ = _run_unet(unet, [_unet_request(0)], [cache], [0])
    assert (cache.full, cache.cached) == (2, 3)  # steps 0 and 3 full
    assert (mid[0], outer[0]) == (2, STEPS)
    assert not torch.equal(cached[0], plain[0])

    configs = [{"method": "deepcache", "interval": 3}, None,
               {"method": "deepcache", "interval": 2, "branch": 2}]
    requests = [_unet_request(seed) for seed in (1, 2, 3)]
    with batch_invariant():
        caches = [None if c is None else StepCache(step_cache_config(c)) for c in configs]
        together, made = _run_unet(unet, requests, caches, [0, 1, 2])
        alone = [_run_unet(unet, [requests[r]], [None if c is None else
                                                 StepCache(step_cache_config(c))], [0])[0][0]
                 for r, c in enumerate(configs)]
    for r in range(3):
        assert torch.equal(together[r], alone[r]), f"request {r}"
    assert any({"cached", "full"} <= {sub.mode for sub in step} for step in made)
    remove_cache_hooks(unet)
    assert torch.equal(_run_unet(unet, [_unet_request(0)], [None], [0])[0][0], plain[0])


# -- in a pipeline -------------------------------------------------------------------------------


def test_step_caching_a_pipeline_changes_nothing_when_off(tmp_path) -> None:
    pipe = ModularPipeline.from_pretrained(str(write_tiny_flux2_klein(tmp_path / "klein")))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def image() -> np.ndarray:
        return pipe(prompt="a red circle", generator=torch.Generator().manual_seed(3),
                    num_inference_steps=STEPS, height=32, width=32, output_type="np",
                    output="images")

    plain = image()
    with step_caching(pipe.transformer, "off") as off:
        assert off is None
        assert np.array_equal(image(), plain)
    blocks_run = _count_calls(pipe.transformer.single_transformer_blocks[-1].attn)
    with step_caching(pipe.transformer, {"method": "fbcache", "threshold": 100.0},
                      total=STEPS) as cache:
        cached = image()
    assert (cache.full, cache.cached) == (1, STEPS - 1) and blocks_run[0] == 1
    assert list(cache.slots) == ["cond"]  # the loop's pass name keys the memory
    assert not np.array_equal(cached, plain)
    assert np.array_equal(image(), plain)  # outside the block: unchanged again
    with pytest.raises(InvalidStepCache, match=r"unknown method 'deepcache'; allowed: off, "
                                               r"fbcache, teacache"), \
            step_caching(pipe.transformer, "deepcache"):
        pass
