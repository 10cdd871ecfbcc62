"""Model cards for saved pipelines: the `README.md` that `ModularPipeline.save_pretrained` writes
beside the weights, so a folder uploaded to the Hub says what it runs.

`generate_modular_model_card_content(blocks)` returns the card's sections as a dict with the
keys diffusers' function of that name returns (`pipeline_name`, `model_description`,
`blocks_description`, `components_description`, `configs_section`,
`io_specification_section`, `trigger_inputs_section`, `tags`), so tools that assemble cards
from either library get the same pieces; the wording is ours.

Not handled here: uploading, or merging into an existing card (one that exists is kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blocks.rendering import distinct_defaults, type_name

CARD_FILE = "README.md"


def write_model_card(blocks: Any, folder: Path) -> None:
    """Write `folder/README.md` for `blocks` unless the folder already has one."""
    path = folder / CARD_FILE
    if path.exists():
        return
    path.write_text(render_model_card(generate_modular_model_card_content(blocks)))


def render_model_card(content: dict[str, Any]) -> str:
    tags = "\n".join(f"- {tag}" for tag in content["tags"])
    return (
        f"---\nlibrary_name: diffusers\ntags:\n{tags}\n---\n\n"
        f"# {content['pipeline_name']}\n\n{content['model_description']}\n\n"
        f"## Blocks\n\n{content['blocks_description']}\n{content['trigger_inputs_section']}\n"
        f"## Components\n\n{content['components_description']}{content['configs_section']}\n\n"
        f"{content['io_specification_section']}\n"
    )


def generate_modular_model_card_content(blocks: Any) -> dict[str, Any]:
    """The sections of a model card describing `blocks` (see the module docstring)."""
    class_name = type(blocks).__name__
    sub_blocks = dict(getattr(blocks, "sub_blocks", None) or {})
    description = getattr(blocks, "description", "") or "A modular diffusion pipeline."
    workflows = dict(getattr(blocks, "_workflow_map", None) or {})
    triggers = sorted(t for t in (_trigger_inputs(blocks) or []) if t is not None)
    return {
        "pipeline_name": class_name.replace("Blocks", " Pipeline"),
        "model_description": (
            f"A pipeline of {len(sub_blocks)} blocks (a {len(sub_blocks)}-block architecture) "
            f"built from `{class_name}`: {description}\n\nIts blocks can be replaced, "
            "inserted or removed; see the list below."
        ),
        "blocks_description": _blocks_section(sub_blocks),
        "components_description": _components_section(getattr(blocks, "expected_components", [])),
        "configs_section": _configs_section(getattr(blocks, "expected_configs", [])),
        "io_specification_section": _io_section(blocks, workflows),
        "trigger_inputs_section": _triggers_section(triggers) if not workflows else "",
        "tags": _tags(blocks, workflows, triggers),
    }


def _trigger_inputs(blocks: Any) -> list[str | None] | None:
    """The inputs a blocks object says select its branches (`trigger_inputs`), if it says."""
    return getattr(blocks, "trigger_inputs", None)


def _blocks_section(sub_blocks: dict[str, Any]) -> str:
    if not sub_blocks:
        return "This pipeline has no sub-blocks."
    lines = []
    for i, (name, block) in enumerate(sub_blocks.items(), start=1):
        lines.append(f"{i}. **{name}** (`{type(block).__name__}`)")
        summary = (getattr(block, "description", "") or "").split("\n")[0]
        if summary:
            lines.append(f"   - {summary}")
    return "\n".join(lines)


def _components_section(components: list[Any]) -> str:
    if not components:
        return "No specific components required: the blocks load none themselves."
    lines = []
    for i, spec in enumerate(components, start=1):
        line = f"{i}. {spec.name} (`{type_name(spec.type_hint)}`)"
        if spec.description:
            line += f": {spec.description}"
        source = getattr(spec, "pretrained_model_name_or_path", None)
        if source:
            line += f" [from {source}" + (f"/{spec.subfolder}]" if spec.subfolder else "]")
        lines.append(line)
    return "\n".join(lines)


def _configs_section(configs: list[Any]) -> str:
    if not configs:
        return ""
    lines = [f"- {c.name} (default: {c.default})" + (f": {c.description}" if c.description
                                                      else "") for c in configs]
    return "\n\n## Configuration Parameters\n\n" + "\n".join(lines)


def _params_list(params: list[Any], header: str | None) -> str:
    if not params:
        return ""
    lines = [f"**{header}:**\n"] if header else []
    for param in params:
        name = param.name if param.name is not None else f"**{param.kwargs_type}"
        line = f"- `{name}` (`{type_name(param.type_hint)}`"
        if hasattr(param, "required") and not param.required:
            line += ", *optional*"
            if getattr(param, "defaults_by_block", None):
                listed = " or ".join(f"`{v}`" for v in distinct_defaults(param))
                line += f", defaults to {listed} by workflow"
            elif param.default is not None:
                line += f", defaults to `{param.default}`"
        line += f"): {param.description or '(no description)'}"
        lines.append(line)
    return "\n".join(lines)


def _io_section(blocks: Any, workflows: dict[str, Any]) -> str:
    inputs = _params_list(list(getattr(blocks, "inputs", []) or []), "Inputs")
    outputs = _params_list(list(getattr(blocks, "outputs", []) or []), "Outputs")
    common = (
        "## Input/Output Specification\n\n"
        f"{inputs or 'No specific inputs defined by these blocks.'}\n\n"
        f"{outputs or 'Standard pipeline outputs (the final state).'}"
    )
    if not workflows:
        return common
    parts = ["## Workflows\n"]
    for name, triggers in workflows.items():
        first = triggers[0] if isinstance(triggers, tuple) else triggers
        try:
            params = [p for p in blocks.get_workflow(name).inputs if p.name in first]
            listing = _params_list(params, None) or "Nothing beyond the common inputs."
        except Exception as error:  # a card must still be written for broken workflows
            listing = f"(cannot resolve this workflow's blocks: {error})"
        parts.append(f"<details>\n<summary><strong>{name}</strong></summary>\n\n{listing}\n\n"
                     "</details>\n")
    return "\n".join(parts) + "\n" + common


def _triggers_section(triggers: list[str]) -> str:
    if not triggers:
        return ""
    listed = ", ".join(f"`{t}`" for t in triggers)
    return (f"\n### Conditional Execution\n\nBranches are chosen at run time by which of these "
            f"inputs are given: {listed}\n")


def _tags(blocks: Any, workflows: dict[str, Any], triggers: list[str]) -> list[str]:
    tags = ["modular-diffusers", "diffusers", "blockserve"]
    model_name = getattr(blocks, "model_name", None)
    if model_name:
        tags.append(model_name)
    if workflows:
        names = " ".join(workflows)
        rules = (("inpaint", "inpainting"), ("image2image", "image-to-image"),
                 ("controlnet", "controlnet"), ("text2image", "text-to-image"))
        tags += [tag for word, tag in rules if word in names]
    elif triggers:
        present = set(triggers)
        if present & {"mask", "mask_image"}:
            tags.append("inpainting")
        if present & {"image", "image_latents"}:
            tags.append("image-to-image")
        if present & {"control_image", "controlnet_cond"}:
            tags.append("controlnet")
        if not present & {"image", "mask", "image_latents", "mask_image"}:
            tags.append("text-to-image")
    else:
        tags.append("text-to-image")
    return tags
