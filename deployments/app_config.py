"""The Ray Serve application's arguments, typed: one place for their meaning and defaults.

`deployments/serve_config.yaml` and `k8s/rayservice.yaml` pass these as the application's
`args`; `service.ray_placement.build_app` reads them once with `ServeAppConfig.parse` (an
unknown key is an error naming the valid ones) and hands each deployment its part:

    args:
      models_file: null          # the models file (null: BLOCKSERVE_MODELS_FILE, else built in)
      concurrency: 16            # images per model and size a router keeps in flight
      max_batch_size: null       # images per forward (null: BLOCKSERVE_MAX_BATCH_SIZE)
      scheduling: null           # step | request (null: BLOCKSERVE_SCHEDULING / models file)
      batch_window_ms: null      # request scheduling's batching window (null: the setting)
      weight_pool: {enabled: true, idle_offload_s: 600, memory_budget_bytes: null,
                    heartbeat_s: 2}
      deployments: [...]         # `blockserve serve --ray` only: Serve's per-deployment options

Settings that the embedded service has too (`max_batch_size`, `scheduling`,
`batch_window_ms`) default to `service.settings.Settings`' values: left null here, the
environment or those defaults apply, exactly as in embedded mode.

No Ray here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class WeightPoolConfig(BaseModel):
    """The shared weight pool (`deployments.weight_pool`) as each heavy replica uses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Build modules from the node's pooled copy.")
    idle_offload_s: float | None = Field(
        600.0, gt=0, description="Drop a replica's copy after this long unused; null: never.")
    memory_budget_bytes: int | None = Field(
        None, ge=0, description="Weight bytes one replica may hold; idle ones make room.")
    heartbeat_s: float = Field(2.0, gt=0, description="How often replicas report what they "
                                                      "hold.")


class ServeAppConfig(BaseModel):
    """The application's `args` (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models_file: str | None = Field(None, description="The models file; null: the setting.")
    concurrency: int = Field(16, ge=1, le=4096,
                             description="Images per model and size a router keeps in flight "
                                         "to the Denoiser; more wait in its queue.")
    max_batch_size: int | None = Field(None, ge=1, le=256,
                                       description="Images per forward; null: the setting.")
    scheduling: Literal["step", "request"] | None = Field(
        None, description="step | request; null: the setting.")
    batch_window_ms: float | None = Field(
        None, ge=0, le=10_000, description="Request scheduling's window; null: the setting.")
    weight_pool: WeightPoolConfig = WeightPoolConfig()
    deployments: list[dict[str, Any]] | None = Field(
        None, description="Per-deployment Serve options (name, num_replicas, ...) that "
                          "`blockserve serve --ray` applies; `serve run` applies the YAML's.")

    @classmethod
    def parse(cls, args: dict[str, Any] | None) -> ServeAppConfig:
        """The validated arguments; ValueError naming each bad or unknown key and the valid
        ones."""
        try:
            return cls.model_validate(args or {})
        except ValidationError as error:
            problems = []
            for item in error.errors():
                where = ".".join(map(str, item["loc"])) or "(args)"
                if item["type"] == "extra_forbidden":
                    owner = WeightPoolConfig if item["loc"][0] == "weight_pool" else cls
                    problems.append(f"{where}: unknown key; valid: "
                                    f"{', '.join(owner.model_fields)}")
                else:
                    problems.append(f"{where}: {item['msg']}")
            raise ValueError("invalid Serve application args: " + "; ".join(problems)) from None

    def settings_overrides(self) -> dict[str, Any]:
        """The service settings these arguments set (None: left to the environment)."""
        return {"models_file": self.models_file, "max_batch_size": self.max_batch_size,
                "scheduling": self.scheduling, "batch_window_ms": self.batch_window_ms}
