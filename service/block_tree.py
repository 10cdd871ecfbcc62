"""A JSON view of a blocks tree, for `GET /v1/models/{id}`: every block with its kind,
description, inputs and outputs, and its children in order.

Built only from what blocks declare (`sub_blocks`, `inputs`, `intermediate_outputs`,
`expected_components`, trigger inputs); values that aren't JSON (tensors, classes) are shown
by name. It describes, it does not serialise: nothing can be rebuilt from it.
"""

from __future__ import annotations

from typing import Any

from blocks import (
    AutoPipelineBlocks,
    ConditionalPipelineBlocks,
    LoopSequentialPipelineBlocks,
    ModularPipelineBlocks,
    SequentialPipelineBlocks,
)

_JSON_SCALARS = (str, int, float, bool, type(None))


def _kind(block: ModularPipelineBlocks) -> str:
    if isinstance(block, LoopSequentialPipelineBlocks):
        return "loop"
    if isinstance(block, AutoPipelineBlocks):
        return "auto"
    if isinstance(block, ConditionalPipelineBlocks):
        return "conditional"
    if isinstance(block, SequentialPipelineBlocks):
        return "sequential"
    return "leaf"


def _type_name(type_hint: Any) -> str | None:
    if type_hint is None:
        return None
    return getattr(type_hint, "__name__", None) or str(type_hint)


def _json_value(value: Any) -> Any:
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _JSON_SCALARS) for v in value):
        return list(value)
    return repr(value)[:200]


def block_tree(block: ModularPipelineBlocks, name: str | None = None) -> dict[str, Any]:
    """`block` and its children as nested dicts (name, class, kind, inputs, outputs, ...)."""
    node: dict[str, Any] = {
        "name": name or type(block).__name__,
        "class": type(block).__name__,
        "kind": _kind(block),
        "description": block.description or "",
        "inputs": [
            {
                "name": param.name if param.name is not None else param.key,
                "type": _type_name(param.type_hint),
                "required": param.required,
                "default": _json_value(param.default),
                "description": param.description,
            }
            for param in block.inputs
        ],
        "outputs": [
            {"name": out.name, "type": _type_name(out.type_hint), "description": out.description}
            for out in block.intermediate_outputs
        ],
        "components": [spec.name for spec in block.expected_components],
    }
    if isinstance(block, ConditionalPipelineBlocks):
        node["trigger_inputs"] = list(block.trigger_names)
    sub_blocks = getattr(block, "sub_blocks", None)
    if sub_blocks:
        node["sub_blocks"] = [block_tree(child, child_name)
                              for child_name, child in sub_blocks.items()]
    return node
