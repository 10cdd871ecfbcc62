"""LoRA adapters for pipelines: diffusers' loading API, and an adapter set per batch row.

- `ModularPipeline.load_lora_weights / set_adapters / fuse_lora / unfuse_lora /
  disable_lora / unload_lora_weights` (`blocks.lora.pipeline_methods`), for diffusers/peft
  and kohya files (`blocks.lora.keys`), with diffusers' semantics and images;
- `adapters_for_call({name: scale})` and `adapters_per_sample([...])`
  (`blocks.lora.selection`): which adapters a call uses, per call or per batch row, without
  touching the models' active sets (how a server gives each request its own adapters inside
  one batched forward; `blocks.lora.layers` says how the rows' deltas are computed).

Not handled here: which adapters a server allows, loads or evicts (the service's LoRA cache).
"""

from blocks.lora.files import LoraFile, LoraFileError, read_lora_file, write_lora_file
from blocks.lora.keys import ModuleLora, lora_target_modules, parse_lora, register_module_names
from blocks.lora.layers import model_loras
from blocks.lora.selection import AdapterSet, adapters_for_call, adapters_per_sample

__all__ = [
    "AdapterSet",
    "LoraFile",
    "LoraFileError",
    "ModuleLora",
    "adapters_for_call",
    "adapters_per_sample",
    "lora_target_modules",
    "model_loras",
    "parse_lora",
    "read_lora_file",
    "register_module_names",
    "write_lora_file",
]
