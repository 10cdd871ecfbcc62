"""FLUX.2 modules under their original (Black Forest Labs) names, for kohya-style LoRA files.

kohya and ai-toolkit name FLUX.2's modules as BFL's reference code does (`double_blocks.0.
img_attn.qkv`), not as diffusers' `Flux2Transformer2DModel` does (`transformer_blocks.0.attn.
to_q`, `.to_k`, `.to_v`). This maps each BFL name to diffusers' module(s); a fused `qkv`
LoRA becomes three LoRAs sharing its down weight, each taking its rows of the up weight
(exact: the fused projection's output is the three outputs side by side).

Not handled here: reading the files (`blocks.lora.keys`, which asks for these names through
`register_module_names`).
"""

from __future__ import annotations

from torch import nn

from blocks.lora.keys import ModuleTarget

_GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "final_layer_linear": "proj_out",
}
_DOUBLE = {  # BFL name inside double_blocks.<i> -> diffusers' inside transformer_blocks.<i>
    "img_attn_proj": "attn.to_out.0",
    "txt_attn_proj": "attn.to_add_out",
    "img_mlp_0": "ff.linear_in",
    "img_mlp_2": "ff.linear_out",
    "txt_mlp_0": "ff_context.linear_in",
    "txt_mlp_2": "ff_context.linear_out",
}
_DOUBLE_FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}


def bfl_module_names(model: nn.Module) -> dict[str, list[ModuleTarget]]:
    """BFL names (underscore-joined) of `model`'s modules -> diffusers' paths and up rows."""
    modules = dict(model.named_modules())
    names: dict[str, list[ModuleTarget]] = {
        bfl: [(path, None)] for bfl, path in _GLOBAL.items() if path in modules}
    for i in range(len(getattr(model, "transformer_blocks", []))):
        block = f"transformer_blocks.{i}"
        for bfl, path in _DOUBLE.items():
            names[f"double_blocks_{i}_{bfl}"] = [(f"{block}.{path}", None)]
        for bfl, paths in _DOUBLE_FUSED.items():
            targets, start = [], 0
            for path in paths:
                rows = modules[f"{block}.{path}"].out_features
                targets.append((f"{block}.{path}", slice(start, start + rows)))
                start += rows
            names[f"double_blocks_{i}_{bfl}"] = targets
    for i in range(len(getattr(model, "single_transformer_blocks", []))):
        for bfl, path in _SINGLE.items():
            names[f"single_blocks_{i}_{bfl}"] = [(f"single_transformer_blocks.{i}.{path}", None)]
    return names
