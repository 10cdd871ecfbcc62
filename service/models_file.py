"""The models file: which models the service serves, and what each one allows.

A YAML mapping from a model name (the `model` of a request) to its configuration, validated
by pydantic so a bad file fails at start with every problem named:

    models:
      my-model:
        family: my-family               # a family registered in blocks (blocks.families)
        path: ${BLOCKSERVE_CACHE_DIR:-~/.cache/blockserve}/my-model  # folder or Hub repo id
        create_tiny: my-family          # write the family's tiny checkpoint at `path` if missing
        dtype: float32                  # float32 | float16 | bfloat16
        device: cpu                     # cpu | cuda | cuda:N | mps
        defaults: {steps: 4, guidance_scale: 7.5, size: 64x64}
        sizes: [32x32, 64x64]           # what requests may ask for
        limits: {max_steps: 50, max_n: 4, max_prompt_length: 1000, max_guidance_scale: 20}
        max_batch_size: 8               # optional: most images per model forward for this
                                        # model (memory; 1 = never batch); default: the
                                        # BLOCKSERVE_MAX_BATCH_SIZE setting
        scheduling: step                # optional: step | request; default: the
                                        # BLOCKSERVE_SCHEDULING setting
        aliases: [gpt-image-1]          # optional: other names requests may use (clients
                                        # that hard-code a model name)
        step_cache: {method: deepcache, interval: 3}   # optional: the step caching requests
                                        # get unless they say `step_cache: "off"` or name a
                                        # method (`blocks.step_cache` lists methods, params)
        loras:                          # optional: LoRA adapters requests may ask for by name
          ink: {source: ./loras/ink.safetensors, scale: 0.8}   # file, folder or Hub repo id;
                                        # scale: what a request that gives none gets;
                                        # weight_name: the file in a folder or repo
        max_loaded_loras: 4             # adapters kept loaded (least recently used go first)

The first model is the default for requests that name none. Only these models can ever be
requested, and only the adapters listed under `loras`: a request never names a path or repo
id. In `path` and a LoRA's `source`, `${VAR}` and `${VAR:-default}` are replaced from the
environment and `~` is expanded; a relative path is relative to the models file's folder (a
missing local LoRA file is an error at start). Loading the models is `service.registry`'s job,
not this module's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from blocks.dtypes import DtypeName
from blocks.families import Family, get_family
from blocks.step_cache import InvalidStepCache, StepCacheConfig, step_cache_config

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MAX_SIDE = 4096
MAX_N = 10  # OpenAI's bound on `n`
MAX_LORA_SCALE = 10.0
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ModelsFileError(ValueError):
    """The models file is missing, not YAML, or invalid; the message names each problem."""


def parse_size(text: str) -> tuple[int, int]:
    """`"640x480"` -> `(640, 480)` (width, height); ValueError when malformed."""
    match = SIZE_PATTERN.match(text.strip().lower())
    if match is None:
        raise ValueError(f"size must look like 512x512 (WIDTHxHEIGHT), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def expand_env(text: str, environ: dict[str, str] | None = None) -> str:
    """Replace `${VAR}` / `${VAR:-default}` (default when unset or empty), then expand `~`."""
    env = os.environ if environ is None else environ

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set and has no default")

    return os.path.expanduser(_ENV_REFERENCE.sub(substitute, text))


class ModelDefaults(BaseModel):
    """What a request gets for a field it leaves out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(4, ge=1, le=1000, description="num_inference_steps.")
    guidance_scale: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="None: the pipeline's own default."
    )
    size: str = Field("64x64", description="WIDTHxHEIGHT.")
    strength: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="image2image; None: the blocks'."
    )
    scheduler: str | None = Field(None, description="None: the checkpoint's scheduler.")


class ModelLimits(BaseModel):
    """Upper bounds on what one request may ask of this model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int = Field(50, ge=1, le=1000)
    max_n: int = Field(4, ge=1, le=MAX_N)
    max_prompt_length: int = Field(1000, ge=1, le=32_000, description="In characters.")
    max_guidance_scale: float = Field(20.0, ge=0, le=100, allow_inf_nan=False)


class LoraEntry(BaseModel):
    """A LoRA adapter a model allows (`loras: {NAME: {source, scale}}`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="A LoRA file, a folder holding one, or a "
                        "Hub repo id (diffusers/peft or kohya keys).")
    weight_name: str | None = Field(None, min_length=1, description="The file in a folder "
                                    "or repo; default: pytorch_lora_weights.safetensors.")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False,
                         description="The scale of a request that gives none.")


class ModelConfig(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    family: str = Field(description="A family registered in `blocks.families`.")
    path: str | None = Field(None, description="Checkpoint folder or Hub repo id.")
    dtype: DtypeName = "float32"
    device: str = Field("cpu", pattern=r"^(cpu|mps|cuda(:\d{1,2})?)$")
    defaults: ModelDefaults = ModelDefaults()
    sizes: tuple[str, ...] = Field((), description="Allowed sizes; empty: only the default.")
    limits: ModelLimits = ModelLimits()
    create_tiny: str | None = Field(
        None, description="The family's name: write its tiny checkpoint at `path` if missing."
    )
    max_batch_size: int | None = Field(
        None, ge=1, le=256,
        description="Most images per model forward; None: the process setting; 1: no batching.",
    )
    scheduling: Literal["step", "request"] | None = Field(
        None, description="How its requests share the denoiser; None: the process setting.",
    )
    aliases: tuple[str, ...] = Field(
        (), description="Other names requests may use for this model (e.g. gpt-image-1)."
    )
    step_cache: str | dict[str, Any] | None = Field(
        None, description="Default step caching: a method name or {method: ..., params}; "
                          "None or 'off': none. Checked against the denoiser when loaded.",
    )

    @field_validator("step_cache")
    @classmethod
    def _step_cache(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        try:
            step_cache_config(value)
        except InvalidStepCache as error:
            raise ValueError(str(error)) from None
        return value

    @property
    def step_cache_config(self) -> StepCacheConfig | None:
        """The default step caching, with its parameters' defaults filled in."""
        return step_cache_config(self.step_cache)
    loras: dict[str, LoraEntry] = Field(
        default_factory=dict, description="LoRA adapters requests may name, by name.")
    max_loaded_loras: int = Field(
        4, ge=1, le=256, description="Adapters kept loaded at once; the least recently used "
        "unused one is unloaded to make room.")

    @field_validator("loras")
    @classmethod
    def _lora_names(cls, value: dict[str, LoraEntry]) -> dict[str, LoraEntry]:
        for name in value:
            if not re.match(MODEL_NAME_PATTERN, name):
                raise ValueError(f"lora name {name!r} must match {MODEL_NAME_PATTERN}")
        return value

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for alias in value:
            if not re.match(MODEL_NAME_PATTERN, alias):
                raise ValueError(f"alias {alias!r} must match {MODEL_NAME_PATTERN}")
        return value

    @field_validator("sizes", mode="before")
    @classmethod
    def _normalise_sizes(cls, value: object) -> object:
        if isinstance(value, (list, tuple)):
            return tuple(str(v).strip().lower() for v in value)
        return value

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        get_family(value)  # ValueError naming the known families
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        family = self.family_info
        if family.needs_checkpoint and not self.path:
            raise ValueError(f"family {self.family!r} needs a `path` (checkpoint or repo id)")
        if not family.needs_checkpoint and (self.path or self.create_tiny):
            raise ValueError(f"family {self.family!r} is built in: give no path or create_tiny")
        if self.create_tiny is not None and self.create_tiny != self.family:
            raise ValueError(
                f"create_tiny {self.create_tiny!r} does not match family {self.family!r}"
            )
        if self.create_tiny is not None and family.tiny_writer is None:
            raise ValueError(f"family {self.family!r} has no tiny checkpoint: drop create_tiny")
        for size in (self.defaults.size, *self.sizes):
            width, height = parse_size(size)
            factor = family.size_multiple
            if not (factor <= width <= MAX_SIDE and factor <= height <= MAX_SIDE):
                raise ValueError(f"size {size}: sides must be in {factor}..{MAX_SIDE}")
            if width % factor or height % factor:
                raise ValueError(
                    f"size {size}: width and height must be multiples of {factor} "
                    f"for family {self.family!r}"
                )
        if self.loras and not family.needs_checkpoint:
            raise ValueError(f"family {self.family!r} takes no LoRA adapters")
        if self.sizes and self.defaults.size not in self.sizes:
            raise ValueError(
                f"defaults.size {self.defaults.size} is not in sizes: {', '.join(self.sizes)}"
            )
        if self.defaults.steps > self.limits.max_steps:
            raise ValueError(
                f"defaults.steps {self.defaults.steps} exceeds limits.max_steps "
                f"{self.limits.max_steps}"
            )
        guidance = self.defaults.guidance_scale
        if guidance is not None and guidance > self.limits.max_guidance_scale:
            raise ValueError(
                f"defaults.guidance_scale {guidance} exceeds limits.max_guidance_scale "
                f"{self.limits.max_guidance_scale}"
            )
        scheduler = self.defaults.scheduler
        if scheduler is not None and scheduler not in family.schedulers:
            raise ValueError(
                f"defaults.scheduler {scheduler!r} is not one of {', '.join(family.schedulers)}"
            )
        return self

    @property
    def allowed_sizes(self) -> tuple[str, ...]:
        return self.sizes or (self.defaults.size,)

    @property
    def family_info(self) -> Family:
        """What `blocks` declares about this model's family (serving facts included)."""
        return get_family(self.family)

    @property
    def size_factor(self) -> int:
        return self.family_info.size_multiple


class ModelsFile(BaseModel):
    """The whole file: models in order; the first is the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            models = {}
            for name, entry in data["models"].items():
                if isinstance(entry, dict):
                    if "name" in entry and entry["name"] != name:
                        raise ValueError(f"models.{name}: `name` must match its key")
                    entry = {**entry, "name": str(name)}
                models[str(name)] = entry
            data = {**data, "models": models}
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> ModelsFile:
        owners: dict[str, str] = {name: name for name in self.models}
        for name, config in self.models.items():
            for alias in config.aliases:
                if alias in owners:
                    raise ValueError(f"models.{name}.aliases: {alias!r} already names "
                                     f"{'a model' if owners[alias] == alias else 'an alias of'}"
                                     f" {owners[alias]!r}")
                owners[alias] = name
        return self

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    def resolve(self, name: str) -> str | None:
        """The configured model `name` is, or an alias of; None when neither."""
        if name in self.models:
            return name
        for model_name, config in self.models.items():
            if name in config.aliases:
                return model_name
        return None

    def names_and_aliases(self) -> list[str]:
        return [*self.models, *(a for config in self.models.values() for a in config.aliases)]


def parse_models(data: object, base_dir: Path, source: str = "models file") -> ModelsFile:
    """Validate parsed YAML; expand and resolve each `path` against `base_dir`."""
    try:
        models_file = ModelsFile.model_validate(data)
    except ValidationError as error:
        problems = "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
            for e in error.errors()
        )
        raise ModelsFileError(f"{source} is invalid:\n{problems}") from None
    resolved = {}
    for name, config in models_file.models.items():
        if config.path is None:
            resolved[name] = config
            continue
        try:
            path = resolve_model_path(expand_env(config.path), base_dir, config.create_tiny)
        except ValueError as error:
            raise ModelsFileError(f"{source}: models.{name}.path: {error}") from None
        loras = {}
        for lora, entry in config.loras.items():
            field = f"models.{name}.loras.{lora}.source"
            try:
                lora_source = resolve_model_path(expand_env(entry.source), base_dir, None)
            except ValueError as error:
                raise ModelsFileError(f"{source}: {field}: {error}") from None
            if Path(lora_source).is_absolute() and not Path(lora_source).exists():
                raise ModelsFileError(f"{source}: {field}: no such file or folder: "
                                      f"{lora_source}")
            loras[lora] = entry.model_copy(update={"source": lora_source})
        resolved[name] = config.model_copy(update={"path": path, "loras": loras})
    return ModelsFile.model_construct(models=resolved)


def resolve_model_path(path: str, base_dir: Path, create_tiny: str | None) -> str:
    """A local folder (absolute) when the path is one, else the path as a Hub repo id.

    Explicitly local spellings (`/`, `./`, `../`) and `create_tiny` paths are always folders;
    anything else is a folder if it exists there, else a repo id.
    """
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    explicit = path.startswith(("/", "./", "../")) or create_tiny is not None
    if explicit or candidate.exists():
        return str(candidate.resolve())
    return path


def load_models_file(path: str | Path) -> ModelsFile:
    """Read and validate a models file; `ModelsFileError` names every problem."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ModelsFileError(f"cannot read models file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ModelsFileError(f"{path} is not valid YAML: {error}") from None
    return parse_models(data, path.parent.resolve(), source=str(path))
