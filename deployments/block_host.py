"""`BlockHost`: the models of one heavy role (text encoder, denoiser, VAE), with only that
role's components loaded, running the blocks the router sends.

This is what a deployment replica (`deployments.heavy`) runs; it needs no Ray, so it is tested
in-process. `models` is plain data, {name: {"path", "family", "dtype", "device"}}. Which
components a replica loads comes from the role's blocks in the model's checkpoint (which
blocks have the role is its family's declaration, `Family.heavy_blocks`); which block runs is the
one each call carries (`BlockCall.block_def`, what the router's pipeline holds): the router's
pipeline is the one source of truth for what a remote block is, custom blocks included.

A call runs with the model's pipeline behind a `ComponentsView` that puts the call's weight-free
components (the request's scheduler) in front and, with the weight pool, holds the pooled
modules resident while a block uses them. Every model call runs under the batch-invariant CPU
kernels (`blocks.batch_invariance`), as in embedded mode: the same bytes in both modes.
`task` makes a call a `DenoiseTask` for the replica's step scheduler (the denoise block).

LoRA adapters: a model whose entry lists `loras` (the models file's allowed adapters, plain
data) gets a `LoraCache` here when this role holds a model adapters apply to (text encoders,
UNet or transformer): a call's adapters (`BlockCall.adapters` for a whole block,
`TaskOptions.adapters` for a denoise task) are loaded on first use — only this role's part of
the file, its tensors from the weight pool when there is one — pinned while the call or task
runs, and at most `max_loaded_loras` stay loaded. A whole block runs under the call's
adapters (none if it names none); a task's apply to its rows in the step scheduler's shared
forwards. With the pool, the caches' loads and evictions are counted by the pool's client
(`PooledWeights.lora_events`), whose heartbeat brings them to the router's `/metrics`; without
it they are only logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from blocks import ModularPipeline
from blocks.batch_invariance import batch_invariant
from blocks.composites import SequentialPipelineBlocks
from blocks.dtypes import DTYPES
from blocks.families import HeavyRole, get_family
from blocks.latent_rgb import LatentRGB, fit_latent_rgb
from blocks.lora import adapters_for_call
from blocks.lora.keys import COMPONENT_PREFIXES
from blocks.stepping import ComponentsView
from deployments.lora_cache import AdapterEntry, LoraCache, PipelineLoraLoader
from deployments.remote_block import BlockCall, BlockResult, ReceivedCall, run_call
from deployments.step_scheduler import DenoiseTask, StepReport, TaskListener, TaskOptions

logger = logging.getLogger(__name__)


class BlockHost:
    """The models of one role, with only that role's components loaded."""

    def __init__(self, role: HeavyRole, models: dict[str, dict[str, Any]],
                 pool: Any = None) -> None:
        """`pool`: a `weight_pool.PooledWeights` to build the weights from (Ray mode); None
        loads them from the checkpoints into this process."""
        self.role = role
        self.pool = pool
        self.pipelines: dict[str, ModularPipeline] = {}
        self.devices: dict[str, str] = {}
        self.loras: dict[str, LoraCache] = {}  # models with adapters for this role's models
        for model, config in models.items():
            # The whole family's pipeline, so every spec (and so every model's config, e.g.
            # the VAE's scale factor in a Denoiser) is known; only this role's weights load.
            pipe = ModularPipeline.from_pretrained(config["path"])
            family_blocks = pipe.blocks
            mine = {name: family_blocks.sub_blocks[name]
                    for name in get_family(config["family"]).heavy_block_names(role)
                    if name in getattr(family_blocks, "sub_blocks", {})}
            if not mine:
                continue
            needed = SequentialPipelineBlocks.from_blocks_dict(mine).component_names
            pretrained = [name for name in needed if pipe.component_specs[name]
                          .default_creation_method == "from_pretrained"]
            dtype = config.get("dtype", "float32")
            # Modules come from the pool; tokenizers and the like are small: loaded here.
            pooled = [name for name in pretrained if pool is not None
                      and _is_module_type(pipe.component_specs[name].type_hint)]
            private = [name for name in pretrained if name not in pooled]
            if private:
                pipe.load_components(names=private, dtype=DTYPES[dtype], strict=True)
                pipe.to(config.get("device", "cpu"))
            for name in pooled:
                module = pool.load(model, config["path"], name, dtype,
                                   config.get("device", "cpu"))
                pipe.update_components(**{name: module})
            pipe.set_progress_bar_config(disable=True)
            adapted = [name for name in needed if name in COMPONENT_PREFIXES]
            if config.get("loras") and adapted:
                self.loras[model] = LoraCache(
                    model, {name: AdapterEntry(**entry) for name, entry in config["loras"].items()},
                    self._lora_loader(model, pipe, adapted), config["max_loaded_loras"],
                    observer=pool.lora_events if pool is not None else None)
            self.pipelines[model] = pipe
            self.devices[model] = config.get("device", "cpu")
            logger.info("%s: model %s ready (%s)", role, model, ", ".join(mine))

    def _lora_loader(self, model: str, pipe: ModularPipeline,
                     adapted: list[str]) -> PipelineLoraLoader:
        """Loads `adapted`'s part of an adapter file into `pipe`; the file's tensors come
        from the pool (one copy per node) when there is one."""
        if self.pool is None:
            return PipelineLoraLoader(pipe, adapted)
        pool = self.pool
        return PipelineLoraLoader(
            pipe, adapted,
            read=lambda name, entry: pool.adapter_file(model, name, entry.source,
                                                       entry.weight_name),
            forget=lambda name: pool.drop_adapter(model, name))

    def loaded(self) -> dict[str, list[str]]:
        """{model: [components loaded here]}."""
        return {model: [n for n, c in pipe.components.items() if c is not None]
                for model, pipe in self.pipelines.items()}

    def components(self, call: BlockCall) -> ComponentsView:
        """What `call`'s block runs with: the model's pipeline, the call's weight-free
        components in front, pooled modules held resident while a block uses them, and the
        model's device as the execution device."""
        if call.model not in self.pipelines:
            raise ValueError(f"{self.role}: model {call.model!r} is not hosted here; hosted: "
                             f"{', '.join(sorted(self.pipelines)) or '(none)'}")
        pipe = self.pipelines[call.model]
        # The device the model runs on, said once: a pipeline infers it from its first
        # module's parameters, which are on the meta device while the pool has them offloaded
        # (a block that uses no module, e.g. setting timesteps, would put tensors there).
        overrides = {"_execution_device": torch.device(self.devices[call.model]),
                     **call.components}
        if self.pool is not None:
            pool, model = self.pool, call.model

            @contextlib.contextmanager
            def use_components(names: Any) -> Iterator[None]:
                with pool.using(model, names), pipe.use_components(names):
                    yield

            overrides["use_components"] = use_components
        return ComponentsView(pipe, overrides)

    def latent_rgb(self, model: str) -> LatentRGB | None:
        """`model`'s preview map, fitted on the VAE hosted here (None: no VAE here)."""
        pipe = self.pipelines.get(model)
        if pipe is None or pipe.components.get("vae") is None:
            return None
        held = self.pool.using(model, ["vae"]) if self.pool is not None \
            else contextlib.nullcontext()
        with held:
            return fit_latent_rgb(pipe.components["vae"])

    def run(self, call: BlockCall) -> BlockResult:
        """Run `call`'s block whole, here and now (under the call's adapters, if any)."""
        components = self.components(call)
        cache = self.loras.get(call.model)
        names = list(call.adapters or {}) if cache is not None else []
        if names:
            cache.acquire(names)  # type: ignore[union-attr]
        try:
            # No adapters unless the call names them (a loaded adapter is its models' active
            # set, which must not reach a call that named none).
            with adapters_for_call(call.adapters or {}), \
                    batch_invariant(self.devices[call.model]):
                return run_call(call.block_def, call.block, components, call)
        finally:
            if names:
                cache.release(names)  # type: ignore[union-attr]

    def task(self, call: BlockCall, options: TaskOptions,
             listener: TaskListener) -> tuple[DenoiseTask, ReceivedCall]:
        """`call`'s block as a task for a step scheduler, and the received call (whose
        `result(state)` is what goes back when the task finishes)."""
        components = self.components(call)
        received = ReceivedCall.of(call)
        names = [name for name, _ in options.adapters]
        if names:
            cache = self.loras.get(call.model)
            if cache is None:
                raise ValueError(f"{self.role}: model {call.model!r} has no LoRA adapters here "
                                 f"(asked for {', '.join(names)})")
            # Loaded now (call this between steps) and pinned until the task ends.
            cache.acquire(names)
            listener = _Releasing(listener, lambda: cache.release(names))
        task = DenoiseTask(call.block_def, call.block, components, received.state, listener,
                           options, self.devices[call.model])
        return task, received


class _Releasing:
    """A task's listener that releases the task's adapters once it has finished or failed."""

    def __init__(self, listener: TaskListener, release: Any) -> None:
        self.listener = listener
        self._release = release

    def _done(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def step(self, report: StepReport) -> None:
        self.listener.step(report)

    def finished(self, state: Any) -> None:
        self._done()
        self.listener.finished(state)

    def failed(self, error: BaseException) -> None:
        self._done()
        self.listener.failed(error)

    def stopped(self) -> bool:
        return self.listener.stopped()


def _is_module_type(type_hint: Any) -> bool:
    return isinstance(type_hint, type) and issubclass(type_hint, torch.nn.Module)
