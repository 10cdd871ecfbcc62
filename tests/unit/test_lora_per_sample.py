"""Adapters per batch row: each row gets exactly its own adapters' deltas, bit for bit.

Under the batch-invariant kernels a row's output must not depend on what shares its batch:
a batch whose rows use different adapters (none, one, two combined, different scales) must
give each row the very bits it gets alone, or batched with rows of the same adapter. Checked
on the real denoisers at tiny size (SD's UNet with LoRA on every Linear and Conv2d, FLUX.2's
transformer on every Linear), and against the per-call selection.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Transformer2DModel, UNet2DConditionModel

from blocks.batch_invariance import batch_invariant
from blocks.flux2.tiny_model import write_tiny_flux2_klein
from blocks.lora import LoraFile, adapters_for_call, adapters_per_sample, model_loras, parse_lora
from blocks.lora.tiny_lora import random_lora
from blocks.stable_diffusion.tiny_model import write_tiny_sd

pytestmark = pytest.mark.usefixtures("quiet_diffusers")

ROWS = [{}, {"a": 1.0}, {"b": 0.7}, {"a": 0.5, "c": 1.2}, {"a": 1.0}, {"b": 0.7, "c": 0.3}]


def _every_module(path: str, module: torch.nn.Module) -> bool:
    return True


def _with_adapters(model: torch.nn.Module, component: str) -> torch.nn.Module:
    loras = model_loras(model, component, create=True)
    for seed, name in enumerate("abc"):
        tensors, metadata = random_lora({component: model}, rank=4, alpha=8, seed=seed,
                                        targets=_every_module)
        loras.add(name, parse_lora(LoraFile(tensors, metadata, name), {component: model})
                  [component])
    return model


@pytest.fixture(scope="module")
def unet_call(tmp_path_factory: pytest.TempPathFactory):
    path = write_tiny_sd(tmp_path_factory.mktemp("sd") / "ckpt")
    unet = _with_adapters(UNet2DConditionModel.from_pretrained(path, subfolder="unet"), "unet")
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(len(ROWS), 4, 8, 8, generator=generator)
    hidden = torch.randn(len(ROWS), 8, 32, generator=generator)
    timestep = torch.tensor([999, 999, 500, 500, 10, 10])

    def call(rows: list[int]) -> torch.Tensor:
        return unet(sample[rows], timestep[rows], hidden[rows], return_dict=False)[0]

    return call


@pytest.fixture(scope="module")
def flux_call(tmp_path_factory: pytest.TempPathFactory):
    path = write_tiny_flux2_klein(tmp_path_factory.mktemp("klein"))
    transformer = _with_adapters(
        Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer"), "transformer")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(ROWS), 16, 16, generator=generator)  # (B, tokens, channels)
    text = torch.randn(len(ROWS), 8, 96, generator=generator)
    image_ids = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(4), torch.arange(4),
                                           torch.arange(1), indexing="ij"), -1).reshape(16, 4)
    text_ids = torch.zeros(8, 4)
    text_ids[:, 3] = torch.arange(8)

    def call(rows: list[int]) -> torch.Tensor:
        return transformer(hidden_states=latents[rows], encoder_hidden_states=text[rows],
                           timestep=torch.full((len(rows),), 0.5), img_ids=image_ids,
                           txt_ids=text_ids, guidance=None, return_dict=False)[0]

    return call


@pytest.mark.parametrize("model", ["unet_call", "flux_call"])
def test_each_row_gets_its_own_adapters_bit_for_bit(model, request):
    call = request.getfixturevalue(model)
    with torch.inference_mode(), batch_invariant():
        with adapters_per_sample(ROWS):
            mixed = call(list(range(len(ROWS))))
        plain = call(list(range(len(ROWS))))
        for row, adapters in enumerate(ROWS):
            with adapters_per_sample([adapters]):
                alone = call([row])
            assert torch.equal(mixed[row], alone[0]), (row, adapters)
            with adapters_for_call(adapters):
                per_call = call([row])
            assert torch.allclose(per_call[0], alone[0], atol=1e-6, rtol=0), row
            if adapters:
                assert (mixed[row] - plain[row]).abs().max() > 1e-3  # the deltas are applied
            else:
                assert torch.equal(mixed[row], plain[row])
        # Rows of one adapter set batched together (how a one-adapter-per-batch server runs).
        with adapters_per_sample([ROWS[1], ROWS[4]]):
            same = call([1, 4])
        assert torch.equal(same[0], mixed[1]) and torch.equal(same[1], mixed[4])


def test_a_batch_of_the_wrong_size_is_refused(unet_call):
    with torch.inference_mode(), adapters_per_sample(ROWS[:2]), \
            pytest.raises(ValueError, match="a batch of 3 rows, but adapters were given per "
                                            "sample for 2"):
        unet_call([0, 1, 2])
