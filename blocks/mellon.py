"""Describing pipelines to Mellon, the node-based visual workflow editor: which nodes a pipeline
offers and which parameters each node shows, in the `mellon_pipeline_config.json` format of
diffusers' `mellon_node_utils`, so Mellon's diffusers nodes work with blockserve pipelines
unchanged.

    config = MellonPipelineConfig.from_blocks(Flux2KleinAutoBlocks())   # a family
    config = MellonPipelineConfig.from_custom_block(MyBlock())          # one custom block
    config.save("my-pipeline")                    # writes mellon_pipeline_config.json
    MellonPipelineConfig.load("my-pipeline").node_params == config.node_params

A node spec lists `MellonParam`s under `inputs` (values), `model_inputs` (components) and
`outputs`, plus `required_inputs`, `required_model_inputs` and the `block_name` of the sub-block
the node runs. `from_blocks` keeps, from a template (default: text encoder, VAE encoder,
denoise, decoder nodes), the nodes whose block the pipeline has and the parameters that block
declares (`required_block_params`). `node_params` is what Mellon reads: per node a flat
`params` map (required ones labelled with " *"; an output named like an input gets `out_`),
the input, model-input and output names, `block_name` and `node_type`.

Not handled here: running nodes (Mellon calls the pipeline's blocks), uploading to the Hub.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from blocks.specs import InputParam, OutputParam

CONFIG_FILE = "mellon_pipeline_config.json"
REQUIRED_MARK = " *"
SEED_MAX = 4294967295


def _label(name: str) -> str:
    """`num_inference_steps` -> "Num Inference Steps"."""
    return name.replace("_", " ").title()


def _connection(name: str, type_: str, display: str) -> MellonParam:
    """A parameter Mellon shows as a socket of `type_` (an input or an output)."""
    return MellonParam(name=name, label=_label(name), type=type_, display=display)


def _model(label: str, required: list[str] | None = None) -> dict[str, Any]:
    return {"label": label, "type": "diffusers_auto_model", "display": "input",
            "required_block_params": required}


def _unit_float(label: str, default: float, param: str) -> dict[str, Any]:
    return {"label": label, "type": "float", "default": default, "min": 0.0, "max": 1.0,
            "step": 0.01, "required_block_params": [param]}


# The standard parameters Mellon's diffusers nodes know, by template name. The values are
# Mellon's interface (labels, widget types, ranges), identical to diffusers' so that the same
# pipeline gives Mellon the same nodes.
TEMPLATES: dict[str, dict[str, Any]] = {
    "image": {"label": "Image", "type": "image", "display": "input",
              "required_block_params": ["image"]},
    "images": {"label": "Images", "type": "image", "display": "output",
               "required_block_params": ["images"]},
    "control_image": {"label": "Control Image", "type": "image", "display": "input",
                      "required_block_params": ["control_image"]},
    "latents": {"label": "Latents", "type": "latents", "display": "input",
                "required_block_params": ["latents"]},
    "image_latents": {"label": "Image Latents", "type": "latents", "display": "input",
                      "required_block_params": ["image_latents"]},
    "first_frame_latents": {"label": "First Frame Latents", "type": "latents",
                            "display": "input", "required_block_params": ["first_frame_latents"]},
    "latents_preview": {"label": "Latents Preview", "type": "latent", "display": "output"},
    "image_latents_with_strength": {
        "name": "image_latents", "label": "Image Latents", "type": "latents", "display": "input",
        "onChange": {"false": ["height", "width"], "true": ["strength"]},
        "required_block_params": ["image_latents", "strength"],
    },
    "embeddings": {"label": "Text Embeddings", "type": "embeddings", "display": "output"},
    "image_embeds": {"label": "Image Embeddings", "type": "image_embeds", "display": "output",
                     "required_block_params": ["image_embeds"]},
    "prompt": {"label": "Prompt", "type": "string", "display": "textarea", "default": "",
               "required_block_params": ["prompt"]},
    "negative_prompt": {"label": "Negative Prompt", "type": "string", "display": "textarea",
                        "default": "", "required_block_params": ["negative_prompt"]},
    "guidance_scale": {"label": "Guidance Scale", "type": "float", "display": "slider",
                       "default": 5.0, "min": 1.0, "max": 30.0, "step": 0.1},
    "strength": {"label": "Strength", "type": "float", "default": 0.5, "min": 0.0, "max": 1.0,
                 "step": 0.01, "required_block_params": ["strength"]},
    "height": {"label": "Height", "type": "int", "default": 1024, "min": 64, "step": 8,
               "required_block_params": ["height"]},
    "width": {"label": "Width", "type": "int", "default": 1024, "min": 64, "step": 8,
              "required_block_params": ["width"]},
    "seed": {"label": "Seed", "type": "int", "default": 0, "min": 0, "max": SEED_MAX,
             "display": "random", "required_block_params": ["generator"]},
    "num_inference_steps": {"label": "Steps", "type": "int", "default": 25, "min": 1,
                            "max": 100, "display": "slider",
                            "required_block_params": ["num_inference_steps"]},
    "num_frames": {"label": "Frames", "type": "int", "default": 81, "min": 1, "max": 480,
                   "display": "slider", "required_block_params": ["num_frames"]},
    "layers": {"label": "Layers", "type": "int", "default": 4, "min": 1, "max": 10,
               "display": "slider", "required_block_params": ["layers"]},
    "output_type": {"label": "Output Type", "type": "dropdown", "default": "np",
                    "options": ["np", "pil", "pt"]},
    "controlnet_conditioning_scale": _unit_float(
        "Controlnet Conditioning Scale", 0.5, "controlnet_conditioning_scale"),
    "control_guidance_start": _unit_float("Control Guidance Start", 0.0,
                                          "control_guidance_start"),
    "control_guidance_end": _unit_float("Control Guidance End", 1.0, "control_guidance_end"),
    "videos": {"label": "Videos", "type": "video", "display": "output",
               "required_block_params": ["videos"]},
    "vae": _model("VAE", ["vae"]),
    "image_encoder": _model("Image Encoder", ["image_encoder"]),
    "unet": _model("Denoise Model"),
    "scheduler": _model("Scheduler"),
    "controlnet": _model("ControlNet Model", ["controlnet"]),
    "text_encoders": {"label": "Text Encoders", "type": "diffusers_auto_models",
                      "display": "input", "required_block_params": ["text_encoder"]},
    # A bare string, not a list: matched character by character, so no block satisfies it and
    # the bundle is never kept by `from_blocks` (Mellon adds it through its ControlNet node).
    "controlnet_bundle": {"label": "ControlNet", "type": "custom_controlnet", "display": "input",
                          "required_block_params": "controlnet_image"},
    "ip_adapter": {"label": "IP Adapter", "type": "custom_ip_adapter", "display": "input"},
    "guider": {"label": "Guider", "type": "custom_guider", "display": "input",
               "onChange": {False: ["guidance_scale"], True: []}},
    "doc": {"label": "Doc", "type": "string", "display": "output"},
}


class _Templates(type):
    """Lets `MellonParam.seed()` / `MellonParam.prompt(default="a cat")` build a template."""

    def __getattr__(cls, name: str) -> Any:
        if name not in TEMPLATES:
            raise AttributeError(f"MellonParam has no template {name!r}; "
                                 f"templates: {', '.join(TEMPLATES)}")

        def build(default: Any = None, **overrides: Any) -> MellonParam:
            fields = {"name": name, **TEMPLATES[name], **overrides}
            if default is not None:
                fields["default"] = default
            return cls(**fields)

        return build


@dataclass(frozen=True)
class MellonParam(metaclass=_Templates):
    """One parameter of a Mellon node. From a template: `MellonParam.seed()`; for custom
    blocks: `MellonParam.Input.slider("scale", default=1.0, min=0.0, max=2.0)`,
    `MellonParam.Output.image("result")`; or fully by hand: `MellonParam(name=..., label=...,
    type=...)`. `required_block_params` (not sent to Mellon) names what a block must declare
    for `from_blocks` to keep the parameter."""

    name: str
    label: str
    type: str
    display: str | None = None
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Any = None
    value: Any = None
    fieldOptions: dict[str, Any] | None = None
    onChange: Any = None
    onSignal: Any = None
    required_block_params: str | list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """What Mellon reads: the set fields, without `name` and `required_block_params`."""
        return {key: value for key, value in asdict(self).items()
                if value is not None and key not in ("name", "required_block_params")}

    class Input:
        """Input widgets for custom blocks."""

        @staticmethod
        def image(name: str) -> MellonParam:
            return _connection(name, "image", "input")

        @staticmethod
        def textbox(name: str, default: str = "") -> MellonParam:
            return MellonParam(name=name, label=_label(name), type="string", display="textarea",
                               default=default)

        @staticmethod
        def dropdown(name: str, options: list[str] | None = None,
                     default: str | None = None) -> MellonParam:
            default = default or (options[0] if options else "")
            return MellonParam(name=name, label=_label(name), type="string",
                               options=options or [default], value=default)

        @staticmethod
        def slider(name: str, default: float = 0, min: float | None = None,
                   max: float | None = None, step: float | None = None) -> MellonParam:
            is_float = isinstance(default, float) or isinstance(step, float)
            return MellonParam(
                name=name, label=_label(name), type="float" if is_float else "int",
                display="slider", default=default,
                min=default if min is None else min, max=default if max is None else max,
                step=step if step is not None else (0.01 if is_float else 1),
            )

        @staticmethod
        def number(name: str, default: float = 0, min: float | None = None,
                   max: float | None = None, step: float | None = None) -> MellonParam:
            is_float = isinstance(default, float) or isinstance(step, float)
            return MellonParam(name=name, label=_label(name), type="float" if is_float else "int",
                               default=default, min=min, max=max, step=step)

        @staticmethod
        def seed(name: str = "seed", default: int = 0) -> MellonParam:
            return MellonParam(name=name, label=_label(name), type="int", display="random",
                               default=default, min=0, max=SEED_MAX)

        @staticmethod
        def checkbox(name: str, default: bool = False) -> MellonParam:
            return MellonParam(name=name, label=_label(name), type="boolean", value=default)

        @staticmethod
        def custom_type(name: str, type: str) -> MellonParam:
            return _connection(name, type, "input")

        @staticmethod
        def model(name: str) -> MellonParam:
            return _connection(name, "diffusers_auto_model", "input")

    class Output:
        """Output widgets for custom blocks."""

        @staticmethod
        def image(name: str) -> MellonParam:
            return _connection(name, "image", "output")

        @staticmethod
        def video(name: str) -> MellonParam:
            return _connection(name, "video", "output")

        @staticmethod
        def text(name: str) -> MellonParam:
            return _connection(name, "string", "output")

        @staticmethod
        def custom_type(name: str, type: str) -> MellonParam:
            return _connection(name, type, "output")

        @staticmethod
        def model(name: str) -> MellonParam:
            return _connection(name, "diffusers_auto_model", "output")


def input_param_to_mellon_param(param: InputParam) -> MellonParam:
    """The widget for a block input: its `metadata["mellon"]` (a `MellonParam`, or one of
    image, textbox, dropdown, slider, number, seed, checkbox, model); else a connection."""
    chosen = (param.metadata or {}).get("mellon")
    if isinstance(chosen, MellonParam):
        return chosen
    name, default, widgets = param.name, param.default, MellonParam.Input
    by_kind = {
        "image": lambda: widgets.image(name),
        "textbox": lambda: widgets.textbox(name, default=default or ""),
        "dropdown": lambda: widgets.dropdown(name, default=default or ""),
        "slider": lambda: widgets.slider(name, default=default or 0),
        "number": lambda: widgets.number(name, default=default or 0),
        "seed": lambda: widgets.seed(name, default=default or 0),
        "checkbox": lambda: widgets.checkbox(name, default=default or False),
        "model": lambda: widgets.model(name),
    }
    make = by_kind.get(chosen)
    return make() if make is not None else widgets.custom_type(name, type="custom")


def output_param_to_mellon_param(param: OutputParam) -> MellonParam:
    """The widget for a block output: its `metadata["mellon"]` (image, video, text, model);
    else a connection."""
    chosen = (param.metadata or {}).get("mellon")
    widgets = MellonParam.Output
    by_kind = {"image": widgets.image, "video": widgets.video, "text": widgets.text,
               "model": widgets.model}
    make = by_kind.get(chosen)
    return make(param.name) if make is not None else widgets.custom_type(param.name, "custom")


def _default_node_specs() -> dict[str, dict[str, Any] | None]:
    """Mellon's standard diffusers nodes, each tied to the sub-block it runs."""
    p = MellonParam
    return {
        "controlnet": None,
        "denoise": {
            "inputs": [
                p.embeddings(display="input"), p.width(), p.height(), p.seed(),
                p.num_inference_steps(), p.num_frames(), p.guidance_scale(), p.strength(),
                p.image_latents_with_strength(), p.image_latents(), p.first_frame_latents(),
                p.controlnet_bundle(display="input"),
            ],
            "model_inputs": [p.unet(), p.guider(), p.scheduler()],
            "outputs": [p.latents(display="output"), p.latents_preview(), p.doc()],
            "required_inputs": ["embeddings"],
            "required_model_inputs": ["unet", "scheduler"],
            "block_name": "denoise",
        },
        "vae_encoder": {
            "inputs": [p.image()],
            "model_inputs": [p.vae()],
            "outputs": [p.image_latents(display="output"), p.doc()],
            "required_inputs": ["image"],
            "required_model_inputs": ["vae"],
            "block_name": "vae_encoder",
        },
        "text_encoder": {
            "inputs": [p.prompt(), p.negative_prompt()],
            "model_inputs": [p.text_encoders()],
            "outputs": [p.embeddings(display="output"), p.doc()],
            "required_inputs": ["prompt"],
            "required_model_inputs": ["text_encoders"],
            "block_name": "text_encoder",
        },
        "decoder": {
            "inputs": [p.latents(display="input")],
            "model_inputs": [p.vae()],
            "outputs": [p.images(), p.videos(), p.doc()],
            "required_inputs": ["latents"],
            "required_model_inputs": ["vae"],
            "block_name": "decode",
        },
    }


DEFAULT_NODE_SPECS = _default_node_specs()


def mark_required(label: str, marker: str = REQUIRED_MARK) -> str:
    return label if label.endswith(marker) else f"{label}{marker}"


def node_spec_to_mellon_dict(node_spec: dict[str, Any], node_type: str) -> dict[str, Any]:
    """One node spec in the form Mellon reads (see the module docstring)."""
    params: dict[str, Any] = {}
    names: dict[str, list[str]] = {"inputs": [], "model_inputs": [], "outputs": []}
    required = {"inputs": set(node_spec.get("required_inputs", [])),
                "model_inputs": set(node_spec.get("required_model_inputs", []))}
    for group in ("inputs", "model_inputs"):
        for param in node_spec.get(group, []):
            shown = param.to_dict()
            if param.name in required[group]:
                shown["label"] = mark_required(shown["label"])
            params[param.name] = shown
            names[group].append(param.name)
    for param in node_spec.get("outputs", []):
        name = f"out_{param.name}" if param.name in names["inputs"] else param.name
        params[name] = param.to_dict()
        names["outputs"].append(name)
    return {
        "params": params,
        "input_names": names["inputs"],
        "model_input_names": names["model_inputs"],
        "output_names": names["outputs"],
        "block_name": node_spec.get("block_name"),
        "node_type": node_type,
    }


class MellonPipelineConfig:
    """The Mellon nodes of one pipeline, saved as `mellon_pipeline_config.json`."""

    config_name = CONFIG_FILE

    def __init__(
        self,
        node_specs: dict[str, dict[str, Any] | None],
        label: str = "",
        default_repo: str = "",
        default_dtype: str = "",
    ) -> None:
        self.node_specs: dict[str, dict[str, Any] | None] | None = node_specs
        self.label = label
        self.default_repo = default_repo
        self.default_dtype = default_dtype
        self._node_params: dict[str, Any] = {}

    @property
    def node_params(self) -> dict[str, Any]:
        """Per node type, what Mellon reads (None for a node the pipeline doesn't offer)."""
        if self.node_specs is None:  # read back from JSON: already in Mellon's form
            return self._node_params
        return {
            node_type: None if spec is None else node_spec_to_mellon_dict(spec, node_type)
            for node_type, spec in self.node_specs.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "default_repo": self.default_repo,
                "default_dtype": self.default_dtype, "node_params": self.node_params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MellonPipelineConfig:
        config = cls({}, data.get("label", ""), data.get("default_repo", ""),
                     data.get("default_dtype", ""))
        config.node_specs = None
        config._node_params = data.get("node_params", {})
        return config

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json_string(), encoding="utf-8")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MellonPipelineConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def save(self, save_directory: str | os.PathLike) -> Path:
        """Write `mellon_pipeline_config.json` into `save_directory` (made if missing)."""
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"MellonPipelineConfig.save: {folder} is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.config_name
        self.to_json_file(path)
        return path

    @classmethod
    def load(cls, pretrained_model_name_or_path: str | os.PathLike,
             **hub_kwargs: Any) -> MellonPipelineConfig:
        """Read a config from a file, a folder, or a Hub repo (through the HF cache)."""
        source = Path(pretrained_model_name_or_path).expanduser()
        if source.is_file():
            path = source
        elif source.is_dir():
            path = source / cls.config_name
            if not path.is_file():
                raise FileNotFoundError(f"{source}: no {cls.config_name}")
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(pretrained_model_name_or_path), cls.config_name,
                                        **hub_kwargs))
        try:
            return cls.from_json_file(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a valid JSON Mellon config: {error}") from error

    @classmethod
    def from_blocks(
        cls,
        blocks: Any,
        template: dict[str, dict[str, Any] | None] | None = None,
        label: str = "",
        default_repo: str = "",
        default_dtype: str = "bfloat16",
    ) -> MellonPipelineConfig:
        """The nodes of `template` (default: `DEFAULT_NODE_SPECS`) that `blocks` can run:
        each node whose `block_name` is one of its sub-blocks, with the parameters that
        sub-block declares."""
        template = DEFAULT_NODE_SPECS if template is None else template
        sub_blocks = dict(blocks.sub_blocks)
        node_specs: dict[str, dict[str, Any] | None] = {}
        for node_type, spec in template.items():
            block = sub_blocks.get(spec.get("block_name")) if spec is not None else None
            node_specs[node_type] = None if block is None else _fit_to_block(spec, block)
        return cls(node_specs, label or getattr(blocks, "model_name", "") or "",
                   default_repo, default_dtype)

    @classmethod
    def from_custom_block(
        cls,
        block: Any,
        node_label: str | None = None,
        input_types: dict[str, Any] | None = None,
        output_types: dict[str, Any] | None = None,
    ) -> MellonPipelineConfig:
        """One `custom` node for `block`: every named input and output, with the widget its
        `metadata["mellon"]` (or `input_types` / `output_types`, by name) asks for, each
        component as a model input, and a `doc` output."""
        if node_label is None:
            node_label = "".join(f" {c}" if c.isupper() else c for c in type(block).__name__)
            node_label = node_label.strip()
        input_types, output_types = input_types or {}, output_types or {}
        inputs, required = [], []
        for param in block.inputs:
            if param.name is None:
                continue
            if param.name in input_types:
                param = _with_mellon_type(param, input_types[param.name])
            if param.required:
                required.append(param.name)
            inputs.append(input_param_to_mellon_param(param))
        outputs = []
        for param in block.outputs:
            if param.name is None:
                continue
            if param.name in output_types:
                param = _with_mellon_type(param, output_types[param.name])
            outputs.append(output_param_to_mellon_param(param))
        outputs.append(MellonParam.doc())
        spec = {
            "inputs": inputs,
            "model_inputs": [MellonParam.Input.model(name) for name in block.component_names],
            "outputs": outputs,
            "required_inputs": required,
            "required_model_inputs": [],
            "block_name": "custom",
        }
        return cls({"custom": spec}, label=node_label)

    def __repr__(self) -> str:
        lines = [f"MellonPipelineConfig(label={self.label!r}, default_repo="
                 f"{self.default_repo!r}, default_dtype={self.default_dtype!r})"]
        for node_type, params in self.node_params.items():
            if params is None:
                lines.append(f"  {node_type}: None")
                continue
            lines += [f"  {node_type}:", f"    inputs: {params['input_names']}",
                      f"    model_inputs: {params['model_input_names']}",
                      f"    outputs: {params['output_names']}"]
        return "\n".join(lines)


def _with_mellon_type(param: Any, kind: Any) -> Any:
    """`param` with its Mellon widget set, whatever else its metadata says."""
    try:
        return replace(param, metadata={"mellon": kind})
    except TypeError:  # not a dataclass (a duck-typed param): copy and set
        changed = copy.copy(param)
        changed.metadata = {"mellon": kind}
        return changed


def _fit_to_block(spec: dict[str, Any], block: Any) -> dict[str, Any]:
    """`spec` keeping only the parameters `block` declares (its inputs, outputs, components)."""
    declared = {
        "inputs": set(block.input_names),
        "model_inputs": set(block.component_names),
        "outputs": set(block.intermediate_output_names),
    }

    def kept(group: str) -> list[MellonParam]:
        return [p for p in spec.get(group, []) if p.required_block_params is None
                or all(name in declared[group] for name in p.required_block_params)]

    fitted: dict[str, Any] = {group: kept(group) for group in declared}
    names = {group: {p.name for p in fitted[group]} for group in ("inputs", "model_inputs")}
    fitted["required_inputs"] = [n for n in spec.get("required_inputs", [])
                                 if n in names["inputs"]]
    fitted["required_model_inputs"] = [n for n in spec.get("required_model_inputs", [])
                                       if n in names["model_inputs"]]
    fitted["block_name"] = spec.get("block_name")
    return fitted
