"""`BlockHost`: the blocks of one heavy role (text encoder, denoiser, VAE) for every model,
with only their components loaded, and the batching of compatible calls.

This is what a deployment replica (`deployments.heavy`) runs; it needs no Ray, so it is tested
in-process. `models` is plain data, {name: {"path", "dtype", "device"}}.

Batching (`run_many`): calls that are compatible (`batch_key`: same model and block — only
`denoise` merges —, equal scalar inputs such as steps, guidance, size and strength, the same
scheduler config, tensor inputs of equal trailing shape, one generator per image) run as one
block call on concatenated inputs, and each gets its own rows and generator states back.
Per-image generators and batch-invariant CPU kernels (`blocks.batch_invariance`, as in
embedded mode) make an image the same alone or batched, bit for bit. Edits (an image posterior or
mask in the inputs) and caller-given latents run alone, as in embedded mode.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import torch

from blocks import ModularPipeline
from blocks.batch_invariance import batch_invariant
from blocks.composites import SequentialPipelineBlocks
from deployments.remote_block import BlockCall, BlockResult, GeneratorState, run_call

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROLE_BLOCKS = {
    "TextEncoder": ("text_encoder",),
    "Denoiser": ("denoise",),
    "VAE": ("vae_encoder", "decode"),
}
# Denoise outputs that are the same for every member of a batch (not split by rows).
SHARED_OUTPUTS = frozenset({"timesteps", "num_inference_steps", "sigmas", "height", "width"})
ALONE_INPUTS = frozenset({"image_posterior", "mask", "masked_image_posterior", "latents"})


class _CallComponents:
    """The replica's pipeline as the block sees it, with the call's weight-free components
    (e.g. the request's scheduler) in front."""

    def __init__(self, pipeline: ModularPipeline, overrides: dict[str, Any]) -> None:
        self._pipeline = pipeline
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        overrides = self.__dict__["_overrides"]
        if name in overrides:
            return overrides[name]
        return getattr(self.__dict__["_pipeline"], name)


class BlockHost:
    """The blocks of one role, for every model, with only their components loaded."""

    def __init__(self, role: str, models: dict[str, dict[str, Any]], pool: Any = None) -> None:
        """`pool`: a `weight_pool.PooledWeights` to build the weights from (Ray mode); None
        loads them from the checkpoints into this process."""
        self.role = role
        self.pool = pool
        self.blocks: dict[tuple[str, str], Any] = {}
        self.pipelines: dict[str, ModularPipeline] = {}
        self.devices: dict[str, str] = {}
        self.block_components: dict[tuple[str, str], list[str]] = {}
        for model, config in models.items():
            # The whole family's pipeline, so every spec (and so every model's config, e.g.
            # the VAE's scale factor in a Denoiser) is known; only this role's weights load.
            pipe = ModularPipeline.from_pretrained(config["path"])
            family_blocks = pipe.blocks
            mine = {name: family_blocks.sub_blocks[name] for name in ROLE_BLOCKS[role]
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
            self.pipelines[model] = pipe
            self.devices[model] = config.get("device", "cpu")
            for name, block in mine.items():
                self.blocks[(model, name)] = block
                self.block_components[(model, name)] = block.component_names
            logger.info("%s: model %s ready (%s)", role, model, ", ".join(mine))

    def loaded(self) -> dict[str, list[str]]:
        """{model: [components loaded here]}."""
        return {model: [n for n, c in pipe.components.items() if c is not None]
                for model, pipe in self.pipelines.items()}

    def run(self, call: BlockCall) -> BlockResult:
        key = (call.model, call.block)
        if key not in self.blocks:
            raise ValueError(f"{self.role}: no block {call.block!r} for model {call.model!r}; "
                             f"hosted: {sorted(self.blocks)}")
        components = _CallComponents(self.pipelines[call.model], call.components)
        with batch_invariant(self.devices[call.model]):
            if self.pool is None:
                return run_call(self.blocks[key], call.block, components, call)
            with self.pool.using(call.model, self.block_components[key]):
                return run_call(self.blocks[key], call.block, components, call)

    def run_many(self, calls: list[BlockCall]) -> list[BlockResult | Exception]:
        """Run `calls`, merging compatible ones; an error fails only its group."""
        groups: dict[Any, list[int]] = collections.defaultdict(list)
        for index, call in enumerate(calls):
            groups[batch_key(call, index)].append(index)
        results: list[Any] = [None] * len(calls)
        for members in groups.values():
            try:
                if len(members) == 1:
                    outs = [self.run(calls[members[0]])]
                else:
                    outs = self._run_merged([calls[i] for i in members])
            except Exception as error:
                outs = [error] * len(members)
            for index, out in zip(members, outs, strict=True):
                results[index] = out
        return results

    def _run_merged(self, calls: list[BlockCall]) -> list[BlockResult]:
        rows = [call.input_values()["batch_size"] for call in calls]
        merged_inputs = []
        for position, (name, value, kind) in enumerate(calls[0].inputs):
            values = [call.inputs[position][1] for call in calls]
            if name == "batch_size":
                value = sum(values)
            elif isinstance(value, torch.Tensor):
                value = torch.cat(values)
            elif isinstance(value, list):
                value = [item for each in values for item in each]
            merged_inputs.append((name, value, kind))
        merged = BlockCall(calls[0].model, calls[0].block, merged_inputs, calls[0].components)
        result = self.run(merged)
        total = sum(rows)
        starts = [sum(rows[:i]) for i in range(len(rows))]
        outs = []
        gen_offset = 0
        for start, count in zip(starts, rows, strict=True):
            outputs = []
            for name, value, kind in result.outputs:
                if (name not in SHARED_OUTPUTS and isinstance(value, torch.Tensor)
                        and value.ndim > 0 and value.shape[0] == total):
                    value = value[start:start + count].clone()
                outputs.append((name, value, kind))
            states = result.generator_states[gen_offset:gen_offset + count]
            gen_offset += count
            outs.append(BlockResult(outputs, states))
        return outs


def _is_module_type(type_hint: Any) -> bool:
    return isinstance(type_hint, type) and issubclass(type_hint, torch.nn.Module)


def _scalar_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape[1:]), str(value.dtype))
    if isinstance(value, list):
        return ("list", len(value) and type(value[0]).__name__)
    return repr(value)


def batch_key(call: BlockCall, index: int) -> Any:
    """Calls with equal keys can run as one merged call; a unique key means alone."""
    values = call.input_values()
    generators = values.get("generator")
    rows = values.get("batch_size")
    per_image = (isinstance(generators, list) and isinstance(rows, int)
                 and len(generators) == rows
                 and all(isinstance(g, GeneratorState) for g in generators))
    if call.block != "denoise" or not per_image or ALONE_INPUTS & set(values):
        return ("alone", index)
    scalars = tuple((name, _scalar_key(value)) for name, value, _ in call.inputs
                    if name not in ("batch_size", "generator"))
    components = tuple((name, type(c).__name__, repr(getattr(c, "config", c)))
                       for name, c in sorted(call.components.items()))
    return (call.model, call.block, scalars, components)
