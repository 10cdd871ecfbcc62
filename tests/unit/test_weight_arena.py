"""`deployments.weight_arena`: a module split into a meta skeleton and one byte arena comes
back exactly (every dtype, buffers, tied weights), shares the arena's memory instead of
copying it, and holds no bytes once released; equal component folders have equal digests."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from blocks.stable_diffusion.tiny_model import write_tiny_sd
from deployments.weight_arena import (
    ALIGNMENT,
    assign_tensors,
    folder_digest,
    pack_module,
    release_tensors,
    resident_bytes,
)


def _clip(dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=16)
    return CLIPTextModel(config).to(dtype).eval()


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 5)
        self.head = torch.nn.Linear(5, 7, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor([3.0]), persistent=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact_for_every_dtype(dtype: torch.dtype) -> None:
    original = _clip(dtype)
    reference = copy.deepcopy(original)
    packed, arena = pack_module(original)
    assert resident_bytes(original) == {}  # packing leaves the source on the meta device
    assert arena.dtype == np.uint8 and packed.arena_bytes == arena.size
    assert all(slot.offset % ALIGNMENT == 0 for slot in packed.slots)

    rebuilt = packed.build()
    assign_tensors(rebuilt, packed.slots, arena)
    for (name, a), (other, b) in zip(reference.state_dict().items(),
                                     rebuilt.state_dict().items(), strict=True):
        assert name == other and a.dtype == b.dtype == (dtype if a.is_floating_point()
                                                        else a.dtype)
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        assert torch.equal(reference(ids).last_hidden_state, rebuilt(ids).last_hidden_state)


def test_cpu_tensors_are_views_of_the_arena_not_copies() -> None:
    packed, arena = pack_module(_clip())
    rebuilt = packed.build()
    assign_tensors(rebuilt, packed.slots, arena)
    start, end = arena.ctypes.data, arena.ctypes.data + arena.size
    for tensor in [*rebuilt.parameters(), *rebuilt.buffers()]:
        assert start <= tensor.data_ptr() < end
    assert sum(resident_bytes(rebuilt).values()) <= arena.size


def test_tied_weights_stay_tied_and_non_persistent_buffers_come_back() -> None:
    module = _Tied()
    weight = module.embed.weight.detach().clone()
    packed, arena = pack_module(module)
    assert len({slot.tensor_index for slot in packed.slots}) == 2  # one tied weight + buffer
    rebuilt = packed.build()
    assign_tensors(rebuilt, packed.slots, arena)
    assert rebuilt.head.weight is rebuilt.embed.weight
    assert torch.equal(rebuilt.embed.weight, weight)
    assert torch.equal(rebuilt.scale, torch.tensor([3.0]))


def test_release_drops_every_byte_and_assign_brings_them_back() -> None:
    packed, arena = pack_module(_clip())
    module = packed.build()
    assign_tensors(module, packed.slots, arena)
    held = resident_bytes(module)["cpu"]
    release_tensors(module, packed.slots)
    assert resident_bytes(module) == {}
    assert all(t.device.type == "meta" for t in module.parameters())
    assign_tensors(module, packed.slots, arena)
    assert resident_bytes(module) == {"cpu": held}


def test_folder_digest_sees_byte_identical_components(tmp_path) -> None:
    first = write_tiny_sd(tmp_path / "a", seed=0)
    second = write_tiny_sd(tmp_path / "b", seed=1)
    assert folder_digest(first / "unet") != folder_digest(second / "unet")
    shutil.rmtree(second / "vae")
    shutil.copytree(first / "vae", second / "vae")
    assert folder_digest(first / "vae") == folder_digest(second / "vae")
    assert folder_digest(tmp_path / "missing") is None


def test_an_unpickled_transformers_model_still_returns_hidden_states() -> None:
    # transformers fills a per-class registry in the constructor that unpickling skips; a
    # replica that never constructed the class (FLUX.2's Qwen3 text encoder) got no hidden
    # states back. Simulate that process by dropping the class's registration.
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=32)
    packed, arena = pack_module(Qwen3ForCausalLM(config).eval())
    for key in [k for k in _CAN_RECORD_REGISTRY if "Qwen3" in k]:
        del _CAN_RECORD_REGISTRY[key]
    rebuilt = packed.build()
    assign_tensors(rebuilt, packed.slots, arena)
    with torch.inference_mode():
        output = rebuilt(torch.tensor([[1, 2, 3]]), output_hidden_states=True, use_cache=False)
    assert output.hidden_states is not None and len(output.hidden_states) == 3
