"""ComponentsManager: sharing, lookup, accounting, and offloading under a budget.

Offloading runs on the CPU with `device="cpu"` (see the module docstring of
`blocks.components_manager`): the manager's residency record, eviction choice, errors and log
are the same code a GPU runs; only the copies are no-ops. The one CUDA test checks what the CPU
can't — weights come back from the device bit-identical — and runs wherever a GPU is present.
"""

from __future__ import annotations

import random
import re
import threading
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from blocks.components_manager import ComponentOutOfMemoryError, ComponentsManager, OffloadRecord
from blocks.eviction import EvictionCandidate, plan_eviction

# ---------------------------------------------------------------------- tiny real components


def tiny_vae(seed: int = 0, scaling_factor: float = 0.18215) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=scaling_factor,
    )


def tiny_clip(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    return CLIPTextModel(config)


def linear(nbytes: int, seed: int) -> torch.nn.Linear:
    """A float32 Linear of exactly `nbytes` bytes, with seeded (so distinct) weights."""
    module = torch.nn.Linear(nbytes // 4, 1, bias=False)
    with torch.no_grad():
        module.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return module


class FlakyLinear(torch.nn.Linear):
    """A real Linear whose first `failures` moves raise the way a full GPU does."""

    def __init__(self, nbytes: int, failures: int) -> None:
        super().__init__(nbytes // 4, 1, bias=False)
        self.failures = failures

    def to(self, *args: Any, **kwargs: Any) -> FlakyLinear:
        if self.failures:
            self.failures -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return super().to(*args, **kwargs)


def pool(*sizes: int, budget: int | None = None, **kwargs) -> tuple[ComponentsManager, list[str]]:
    """A manager holding one seeded Linear per size (named m0, m1, ...), auto offload on CPU."""
    manager = ComponentsManager()
    ids = [manager.add(f"m{i}", linear(size, seed=i)) for i, size in enumerate(sizes)]
    if budget is not None or kwargs:
        manager.enable_auto_offload("cpu", memory_budget=budget, **kwargs)
    return manager, ids


def load(manager: ComponentsManager, *ids: str) -> None:
    """Use and release components, leaving them resident (idle) under the budget."""
    for component_id in ids:
        with manager.using([component_id]):
            pass


def resident(manager: ComponentsManager) -> set[str]:
    return {i for i in manager.search("*") if manager.is_resident(i)}


# ---------------------------------------------------------------------- sharing


def test_ids_are_stable_and_the_same_object_is_held_once() -> None:
    manager = ComponentsManager()
    vae = tiny_vae()
    first = manager.add("vae", vae)
    assert first == "vae_1"
    assert manager.add("vae", vae, collection="sd") == first
    assert manager.add("vae", tiny_vae(seed=1)) == "vae_2"
    assert len(manager) == 2
    assert manager.get(first) is vae and vae in manager and first in manager
    assert manager.collections == {"sd": {first}}


def test_same_load_id_and_dtype_returns_the_existing_entry() -> None:
    manager = ComponentsManager()
    load_id = "tiny/sd|vae|null|main"
    vae = tiny_vae(seed=0)
    first = manager.add("vae", vae, collection="a", load_id=load_id)
    again = manager.add("vae", tiny_vae(seed=5), collection="b", load_id=load_id)
    assert again == first and len(manager) == 1
    assert manager.get(again) is vae  # the caller drops its copy and uses this one
    assert manager.collections == {"a": {first}, "b": {first}}


def test_same_load_id_in_another_dtype_is_another_entry() -> None:
    manager = ComponentsManager()
    load_id = "tiny/sd|vae|null|main"
    fp32 = manager.add("vae", tiny_vae(), load_id=load_id)
    fp16 = manager.add("vae", tiny_vae().to(torch.float16), load_id=load_id)
    assert fp16 != fp32 and len(manager) == 2
    assert manager.get_one(load_id=load_id, name=fp16).dtype == torch.float16


def test_identical_weights_from_different_places_are_one_entry() -> None:
    manager = ComponentsManager()
    encoder = tiny_clip(seed=3)
    first = manager.add("text_encoder", encoder, collection="a", load_id="repo_a|text_encoder||")
    copy = tiny_clip(seed=3)  # same weights, another object, another folder and name
    shared = manager.add("text_encoder_2", copy, collection="b", load_id="repo_b|te||")
    assert shared == first and len(manager) == 1
    assert manager.get_components_by_names(["text_encoder_2"], collection="b") == {
        "text_encoder_2": encoder
    }
    assert manager.get_one(load_id="repo_b|te||") is encoder


def test_content_identity_includes_config_and_every_weight() -> None:
    manager = ComponentsManager()
    base = manager.add("vae", tiny_vae(seed=0))
    other_weights = manager.add("vae", tiny_vae(seed=1))
    other_config = manager.add("vae", tiny_vae(seed=0, scaling_factor=0.5))
    assert len({base, other_weights, other_config}) == 3


def test_a_held_module_converted_since_it_was_added_is_no_longer_a_match() -> None:
    manager = ComponentsManager()
    held = tiny_clip(seed=3)
    assert manager.add("text_encoder", held, load_id="repo|text_encoder||") == "text_encoder_1"
    held.to(torch.float16)
    assert manager.add("text_encoder", tiny_clip(seed=3)) == "text_encoder_2"
    assert manager.add("te", tiny_clip(seed=4), load_id="repo|text_encoder||") == "te_1"


def test_objects_that_are_not_modules_share_by_load_id_only() -> None:
    manager = ComponentsManager()
    scheduler = EulerDiscreteScheduler()
    first = manager.add("scheduler", scheduler, load_id="tiny/sd|scheduler||")
    assert (
        manager.add("scheduler", EulerDiscreteScheduler(), load_id="tiny/sd|scheduler||") == first
    )
    assert manager.add("scheduler", EulerDiscreteScheduler()) == "scheduler_2"
    assert manager.component_bytes(first) == 0 and manager.device_of(first) is None


# ---------------------------------------------------------------------- lookup and removal


@pytest.fixture
def catalogue() -> ComponentsManager:
    manager = ComponentsManager()
    manager.add("unet", linear(8, seed=1), collection="sd")
    manager.add("vae", linear(8, seed=2), collection="sd")
    manager.add("text_encoder", linear(8, seed=3), collection="sd")
    manager.add("text_encoder_2", linear(8, seed=4), collection="xl")
    manager.add("vae", linear(8, seed=5), collection="xl")
    return manager


def test_search_globs_alternatives_and_negation(catalogue: ComponentsManager) -> None:
    assert catalogue.search("vae") == ["vae_1", "vae_2"]
    assert catalogue.search("text_encoder*") == ["text_encoder_1", "text_encoder_2_1"]
    assert catalogue.search("unet|vae", collection="xl") == ["vae_2"]
    assert catalogue.search("!vae|unet") == ["text_encoder_1", "text_encoder_2_1"]
    assert catalogue.search("vae_2") == ["vae_2"]  # ids match too
    assert catalogue.search("nothing*") == []
    with pytest.raises(ValueError, match="empty alternative"):
        catalogue.search("vae|")


def test_get_one_requires_exactly_one_match(catalogue: ComponentsManager) -> None:
    assert catalogue.get_one(name="vae", collection="xl") is catalogue.get("vae_2")
    with pytest.raises(ValueError, match=r"2 components match name='vae': vae_1, vae_2"):
        catalogue.get_one(name="vae")
    with pytest.raises(ValueError, match=r"no component matches name='clip'; held: unet_1, vae_1"):
        catalogue.get_one(name="clip")


def test_get_components_by_names_within_a_collection(catalogue: ComponentsManager) -> None:
    found = catalogue.get_components_by_names(["unet", "vae"], collection="sd")
    assert found == {"unet": catalogue.get("unet_1"), "vae": catalogue.get("vae_1")}
    with pytest.raises(ValueError, match=r"expected one component named 'vae', found vae_1, vae_2"):
        catalogue.get_components_by_names(["vae"])
    with pytest.raises(ValueError, match=r"named 'unet' in collection 'xl', found none"):
        catalogue.get_components_by_names(["unet"], collection="xl")


def test_a_new_component_replaces_its_namesake_in_a_collection(
    catalogue: ComponentsManager,
) -> None:
    new_vae = catalogue.add("vae", linear(8, seed=6), collection="sd")
    assert catalogue.collections["sd"] == {"unet_1", "text_encoder_1", new_vae}
    assert "vae_1" in catalogue  # still pooled; remove() drops it


def test_remove_and_remove_from_collection(catalogue: ComponentsManager) -> None:
    catalogue.remove_from_collection("vae_1", "sd")
    assert "vae_1" not in catalogue.collections["sd"] and "vae_1" in catalogue
    with pytest.raises(ValueError, match="vae_1 is not in collection 'sd'; it is in no collection"):
        catalogue.remove_from_collection("vae_1", "sd")
    module = catalogue.get("unet_1")
    with catalogue.using(["unet_1"]), pytest.raises(RuntimeError, match="unet_1 is in use"):
        catalogue.remove("unet_1")
    assert catalogue.remove("unet_1") is module
    assert "unet_1" not in catalogue and module not in catalogue and len(catalogue) == 4
    with pytest.raises(ValueError, match="unknown component id 'unet_1'"):
        catalogue.get("unet_1")


# ---------------------------------------------------------------------- accounting


def test_bytes_are_counted_per_component_and_device() -> None:
    manager = ComponentsManager()
    fc = manager.add("fc", torch.nn.Linear(10, 20))  # (200 + 20) float32
    half = manager.add("half", torch.nn.Linear(10, 20).half())
    norm = manager.add("norm", torch.nn.BatchNorm1d(5))  # 2 params, 2 stats (+ int64 counter)
    manager.add("scheduler", EulerDiscreteScheduler())
    assert manager.component_bytes(fc) == 880
    assert manager.component_bytes(half) == 440
    assert manager.component_bytes(norm) == 4 * 5 * 4 + 8
    assert manager.bytes_by_device() == {"cpu": 880 + 440 + 88}
    assert manager.device_of(fc) == torch.device("cpu")


def test_summary_lists_every_component() -> None:
    manager = ComponentsManager()
    manager.add("vae", tiny_vae(), collection="sd")
    manager.add("fc", torch.nn.Linear(10, 20).half(), collection="xl")
    manager.add("scheduler", EulerDiscreteScheduler(), collection="sd")
    manager.enable_auto_offload("cpu", memory_budget=4096)
    with manager.using(["fc_1"]):
        text = repr(manager)
    lines = text.splitlines()
    assert lines[0].startswith("ComponentsManager: 3 components (cpu: ")
    assert "budget 4.0 KiB, reserve 0 B, resident 440 B [fc_1]" in lines[0]
    assert lines[1].split() == [
        "id",
        "class",
        "device",
        "dtype",
        "bytes",
        "collections",
        "last",
        "used",
    ]
    assert re.match(r"vae_1 +AutoencoderKL +cpu +float32 +\d+\.\d KiB +sd +never$", lines[2])
    assert re.match(r"fc_1 +Linear +cpu +float16 +440 B +xl +in use \(1\)$", lines[3])
    assert re.match(r"scheduler_1 +EulerDiscreteScheduler +- +- +- +sd +never$", lines[4])
    assert re.search(r"^fc_1 .* \d+\.\ds ago$", manager.summary(), flags=re.MULTILINE)


# ---------------------------------------------------------------------- offloading


def test_using_places_modules_and_evicts_the_smallest_sufficient_set() -> None:
    manager, (a, b, c, d, e) = pool(400, 300, 200, 100, 260, budget=1000)
    load(manager, a, b, c, d)
    assert manager.resident_bytes() == 1000
    with manager.using([e]) as (module,):  # needs 260: {b} frees 300, the least that suffices
        assert module is manager.get(e)
        assert resident(manager) == {a, c, d, e}
    assert [(r.component_id, r.reason) for r in manager.offload_log[-2:]] == [
        (b, "evict"),
        (e, "load"),
    ]
    assert manager.resident_bytes() == 960 and manager.use_count(e) == 0


def test_equal_sized_choices_go_to_the_least_recently_used() -> None:
    manager, (a, b, c, d) = pool(300, 300, 300, 300, budget=900)
    load(manager, b, a, c)  # b is the oldest
    with manager.using([d]):
        assert resident(manager) == {a, c, d}
    load(manager, b)  # now a is the least recently used of the idle ones
    assert resident(manager) == {b, c, d}


def test_eviction_plan_is_minimal_not_greedy() -> None:
    candidates = [EvictionCandidate("big", 500, 0), EvictionCandidate("x", 260, 1),
                  EvictionCandidate("y", 250, 2)]
    assert plan_eviction(candidates, 480) == ["big"]  # LRU greedy would take "big" anyway
    assert plan_eviction(candidates, 510) == ["x", "y"]  # 510 < 760, and beats big + y
    assert plan_eviction(candidates, 250) == ["y"]
    assert plan_eviction(candidates, 1011) is None
    assert plan_eviction(candidates, 0) == []


def test_a_module_in_use_is_never_evicted() -> None:
    manager, (a, b, c) = pool(300, 600, 300, budget=1000)
    with manager.using([a]):
        load(manager, b)
        with manager.using([c]):  # a (300 B) would be the smallest fit, but it is in use
            assert resident(manager) == {a, c}
        with manager.using([a]):  # re-entrant
            assert manager.use_count(a) == 2
        assert manager.use_count(a) == 1
    assert manager.use_count(a) == 0


def test_out_of_memory_names_what_was_needed_and_what_is_held() -> None:
    manager, (a, b, c) = pool(600, 300, 500, budget=1100, reserve=100)
    load(manager, b)
    with manager.using([a]):
        before = manager.offload_log
        with pytest.raises(ComponentOutOfMemoryError) as caught, manager.using([c]):
            pass
        assert manager.offload_log == before  # refused before moving anything
    error = caught.value
    assert error.needed == {c: 500} and error.budget == 1100 and error.room == 100
    assert error.held == [("m0_1", 600, True), ("m1_1", 300, False)]
    assert str(error) == (
        "cannot place m2_1 (500 B) on cpu: budget 1.1 KiB, reserve 100 B, room 100 B even after "
        "offloading every idle component; held: m0_1 (600 B, in use), m1_1 (300 B, idle)"
    )
    assert manager.use_count(c) == 0 and resident(manager) == {a, b}


def test_components_of_one_call_are_placed_together() -> None:
    manager, (a, b, c) = pool(400, 400, 400, budget=1000)
    load(manager, a)
    with manager.using([b, c]):  # 800 more: a goes, neither b nor c is chosen to make room
        assert resident(manager) == {b, c}
    needed = r"cannot place m0_1 .* m1_1 .* m2_1"
    with pytest.raises(ComponentOutOfMemoryError, match=needed), manager.using([a, b, c]):
        pass
    assert all(manager.use_count(i) == 0 for i in (a, b, c))


def test_a_real_out_of_memory_offloads_every_idle_module_and_retries_once() -> None:
    manager, (a, b) = pool(200, 200, budget=10_000)
    flaky = manager.add("flaky", FlakyLinear(400, failures=1))
    load(manager, a, b)
    with manager.using([flaky]):
        assert resident(manager) == {flaky}
    reasons = [(r.component_id, r.reason) for r in manager.offload_log[2:]]
    assert reasons == [(a, "evict-oom"), (b, "evict-oom"), (flaky, "load-retry")]


def test_a_second_real_out_of_memory_rolls_back_and_raises() -> None:
    manager, (a,) = pool(200, budget=10_000)
    flaky = manager.add("flaky", FlakyLinear(400, failures=2))
    with (
        manager.using([a]),
        pytest.raises(ComponentOutOfMemoryError, match="cannot place flaky_1") as caught,
        manager.using([flaky]),
    ):
        pass
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert manager.offload_log[-1].reason == "rollback"
    assert resident(manager) == {a} and manager.use_count(flaky) == 0


def test_free_memory_of_the_device_also_limits_placement() -> None:
    other_processes = {"bytes": 0}
    capacity = 1000

    def free_memory() -> int:  # a fake device: what others use plus what we placed
        return capacity - other_processes["bytes"] - manager.resident_bytes()

    manager, (a, b, c) = pool(300, 300, 300, free_memory_fn=free_memory)
    load(manager, a, b, c)
    assert resident(manager) == {a, b, c}
    other_processes["bytes"] = 500
    load(manager, a)  # resident already: nothing moves
    d = manager.add("d", linear(200, seed=9))
    load(manager, d)  # room is -400: frees 600, the two least recently used
    assert resident(manager) == {a, d}


def test_budget_arguments_are_checked() -> None:
    manager = ComponentsManager()
    with pytest.raises(ValueError, match="cpu has no free-memory query"):
        manager.enable_auto_offload("cpu")
    with pytest.raises(ValueError, match=r"fractional memory_budget needs .* cpu doesn't"):
        manager.enable_auto_offload("cpu", memory_budget=0.5)
    with pytest.raises(ValueError, match=r"fraction of device memory in \(0, 1\], got 2.0"):
        manager.enable_auto_offload("cpu", memory_budget=2.0)
    with pytest.raises(ValueError, match=r"reserve must be in \[0, budget\)"):
        manager.enable_auto_offload("cpu", memory_budget=100, reserve=100)
    with pytest.raises(TypeError, match="memory_budget must be bytes"):
        manager.enable_auto_offload("cpu", memory_budget=True)


def test_fractional_budget_is_a_share_of_total_device_memory(monkeypatch) -> None:
    monkeypatch.setattr("blocks.components_manager._device_total_memory", lambda device: 10_000)
    manager, (a, b) = pool(600, 600)
    manager.enable_auto_offload("cpu", memory_budget=0.05)
    with pytest.raises(ComponentOutOfMemoryError, match="budget 500 B"):
        load(manager, a)
    manager.enable_auto_offload("cpu", memory_budget=0.1)
    load(manager, a, b)
    assert resident(manager) == {b}


def test_without_auto_offload_using_only_tracks_use() -> None:
    manager, (a,) = pool(400)
    scheduler = EulerDiscreteScheduler()
    with manager.using([a, scheduler, None]) as objects:
        assert objects == [manager.get(a), scheduler, None]  # unheld non-modules pass through
        assert manager.use_count(a) == 1
    assert manager.offload_log == [] and not manager.is_resident(a)
    assert "never" not in manager.summary().splitlines()[2]
    unheld = torch.nn.Linear(2, 2)
    with (
        pytest.raises(TypeError, match="a Linear that this manager doesn't hold"),
        manager.using([unheld]),
    ):
        pass


def test_disable_and_re_enable() -> None:
    manager, (a, b) = pool(400, 400, budget=1000)
    load(manager, a, b)
    manager.enable_auto_offload("cpu", memory_budget=500)  # same placement: residency is kept
    assert resident(manager) == {a, b}
    load(manager, a)  # over the new budget already; using something resident moves nothing
    c = manager.add("c", linear(100, seed=7))
    load(manager, c)  # room 500 - 800 = -300, so 400 B must go: one idle 400 B module
    assert manager.resident_bytes() == 500
    manager.disable_auto_offload()
    assert resident(manager) == set() and manager.resident_bytes() == 0


def test_offload_log_records_every_move() -> None:
    manager, (a, b) = pool(400, 400, budget=500)
    load(manager, a, b)
    log = manager.offload_log
    assert all(isinstance(r, OffloadRecord) for r in log)
    assert [(r.component_id, r.reason, r.is_load, r.resident_bytes) for r in log] == [
        (a, "load", True, 400),
        (a, "evict", False, 0),
        (b, "load", True, 400),
    ]
    assert {(r.from_device, r.to_device, r.bytes) for r in log} == {("cpu", "cpu", 400)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_round_trip_through_cuda_keeps_weights_and_respects_the_budget() -> None:
    manager = ComponentsManager()
    vae, clip = tiny_vae(), tiny_clip()
    originals = {k: v.clone() for k, v in vae.state_dict().items()}
    ids = [manager.add("vae", vae), manager.add("clip", clip)]
    budget = max(manager.component_bytes(i) for i in ids) + 1
    manager.enable_auto_offload("cuda", memory_budget=budget)
    for component_id in ids * 2:
        with manager.using([component_id]) as (module,):
            assert next(module.parameters()).is_cuda
    assert next(vae.parameters()).device.type == "cpu"
    assert all(torch.equal(v, originals[k]) for k, v in vae.state_dict().items())
    assert max(r.resident_bytes for r in manager.offload_log) <= budget


# ---------------------------------------------------------------------- concurrency


def test_concurrent_users_never_break_the_budget_or_the_books() -> None:
    sizes = [400, 800, 1200, 1600, 2000, 2400]
    # One thread takes pairs, three take singles: at most five in use, and any five fit.
    budget = sum(sorted(sizes)[1:])
    manager, ids = pool(*sizes, budget=budget)
    errors: list[BaseException] = []

    def worker(seed: int, per_call: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                chosen = rng.sample(ids, per_call)
                with manager.using(chosen) as modules:
                    for component_id, module in zip(chosen, modules, strict=True):
                        assert manager.is_resident(component_id)
                        module(torch.ones(1, module.in_features))
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(0, 2))]
    threads += [threading.Thread(target=worker, args=(seed, 1)) for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    log = manager.offload_log
    assert sum(not r.is_load for r in log) > 10  # the budget really forced evictions
    assert max(r.resident_bytes for r in log) <= budget
    replayed: set[str] = set()
    for record in log:
        (replayed.add if record.is_load else replayed.discard)(record.component_id)
    assert replayed == resident(manager)
    assert manager.resident_bytes() == sum(manager.component_bytes(i) for i in replayed)
    assert all(manager.use_count(i) == 0 for i in ids)
