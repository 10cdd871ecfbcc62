"""Text views of blocks: `repr(blocks)` (the tree) and `blocks.doc` (inputs and outputs)."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blocks.block import ModularPipelineBlocks


def type_name(type_hint: Any) -> str:
    if type_hint is None:
        return "Any"
    if isinstance(type_hint, type):
        return type_hint.__name__
    return str(type_hint).replace("typing.", "")


def distinct_defaults(param: Any) -> list[Any]:
    """The different defaults the branches of a conditional block give an input, in order."""
    distinct: list[Any] = []
    for value in (param.defaults_by_block or {}).values():
        if value not in distinct:
            distinct.append(value)
    return distinct


def _indent(text: str, spaces: int) -> str:
    return textwrap.indent(text, " " * spaces)


def render_block(block: ModularPipelineBlocks) -> str:
    """Class, description, components, configs and the sub-block tree."""
    lines = [f"{type(block).__name__}(", f"  Class: {_base_name(block)}"]
    if block.description:
        lines.append(f"  Description: {block.description}")
    if block.expected_components:
        lines.append("  Components:")
        for spec in block.expected_components:
            source = f" from {spec.pretrained_model_name_or_path}" if spec.load_id else ""
            lines.append(f"      {spec.name} ({type_name(spec.type_hint)}){source}")
    if block.expected_configs:
        lines.append("  Configs:")
        for config in block.expected_configs:
            lines.append(f"      {config.name} (default: {config.default!r})")
    sub_blocks = getattr(block, "sub_blocks", None)
    if sub_blocks:
        lines.append("  Sub-Blocks:")
        for i, (name, child) in enumerate(sub_blocks.items()):
            lines.append(f"    [{i}] {name} ({type(child).__name__})")
            if child.description:
                lines.append(_indent(f"Description: {child.description}", 8))
    lines.append(")")
    return "\n".join(lines)


def _base_name(block: ModularPipelineBlocks) -> str:
    """The framework class this block derives from (e.g. `AutoPipelineBlocks`)."""
    for base in type(block).__mro__:
        framework = base.__module__ in ("blocks.block", "blocks.composites")
        if framework and base.__name__ != "CompositeBlocks":
            return base.__name__
    return "ModularPipelineBlocks"


def render_doc(block: ModularPipelineBlocks) -> str:
    """A docstring-style listing of inputs (type, required/default, description) and outputs."""
    lines = [f"class {type(block).__name__}", ""]
    if block.description:
        lines += [_indent(block.description, 2), ""]
    lines.append("  Inputs:")
    for param in block.inputs:
        if param.required:
            flag = "*required*"
        elif param.defaults_by_block:
            distinct = " or ".join(str(v) for v in distinct_defaults(param))
            flag = f"*optional*, defaults to {distinct}, depending on the workflow"
        elif param.default is not None:
            flag = f"*optional*, defaults to {param.default}"
        else:
            flag = "*optional*"
        lines.append(f"    {param.key} (`{type_name(param.type_hint)}`, {flag}):")
        if param.description:
            lines.append(_indent(param.description, 8))
    lines.append("")
    lines.append("  Outputs:")
    for param in block.outputs:
        lines.append(f"    {param.name} (`{type_name(param.type_hint)}`):")
        if param.description:
            lines.append(_indent(param.description, 8))
    return "\n".join(lines)
