"""The app's OpenAPI document: FastAPI's, plus the request bodies the image routes parse
themselves, narrowed to this deployment (model names, sizes and schedulers as enums).

FastAPI documents a 422 for validation errors; this API answers 400 in OpenAI's shape
instead, so those entries are dropped.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.registry import ModelRegistry
from service.schemas import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageVariationRequest,
    JobRequest,
)

_BINARY = {"type": "string", "format": "binary"}


def _restrict(prop: dict[str, Any], values: list[str]) -> None:
    """Give the string branch of an optional string property an enum."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "string":
            branch.pop("pattern", None)
            branch["enum"] = values


def build_openapi(app: FastAPI, registry: ModelRegistry) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ImageGenerationRequest, ImageEditRequest, ImageVariationRequest, JobRequest):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas[model.__name__] = body
    # The multipart forms: the JSON bodies with files where the images go.
    for json_name, form_name in (("ImageEditRequest", "ImageEditForm"),
                                 ("ImageVariationRequest", "ImageVariationForm")):
        form = copy.deepcopy(schemas[json_name])
        form["title"] = form_name
        form["properties"].pop("images", None)
        form["properties"]["image"] = {**_BINARY, "description": "The image (`image[]`, "
                                       "repeated, for several reference images)."}
        if "mask" in form["properties"]:
            form["properties"]["mask"] = {**_BINARY, "description": "Where to edit "
                                          "(transparent)."}
        # Form fields are strings: a form carries its adapters as JSON text.
        form["properties"]["loras"] = {"type": "string", "description": "Extension: LoRA "
                                       'adapters as JSON, e.g. [{"name": "ink", "scale": 0.8}].'}
        form["required"] = sorted({*form.get("required", []), "image"})
        schemas[form_name] = form

    configs = [registry.config(name) for name in registry.names]
    sizes = [*sorted({size for c in configs for size in c.allowed_sizes}), "auto"]
    schedulers = sorted({s for c in configs for s in c.family_info.schedulers})
    for name in ("ImageGenerationRequest", "ImageEditRequest", "ImageEditForm",
                 "ImageVariationRequest", "ImageVariationForm", "JobRequest"):
        properties = schemas[name]["properties"]
        _restrict(properties["model"], registry.models.names_and_aliases())
        _restrict(properties["size"], sizes)
        _restrict(properties["scheduler"], schedulers)

    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema
