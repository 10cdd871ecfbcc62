"""Where heavy blocks run: the hook that turns the embedded app into the Ray Serve ingress.

Embedded mode has no placement (every block runs in this process). Ray mode
(`service.ray_placement.RayPlacement`) swaps each model's heavy blocks for remote ones and
brings the engine that runs jobs concurrently against the deployments. The app, routes and
registry are the same in both: one code path, two placements.
"""

from __future__ import annotations

from typing import Any, Protocol

from blocks import ModularPipelineBlocks


class Placement(Protocol):
    def transform_blocks(self, config: Any, blocks: ModularPipelineBlocks
                         ) -> ModularPipelineBlocks:
        """`blocks` as this placement runs them (heavy blocks remote)."""

    def make_engine(self, registry: Any, settings: Any, metrics: Any) -> Any:
        """The `Engine` that runs jobs in this placement."""

    def describe(self, model: str) -> dict[str, Any] | None:
        """Which deployment runs each heavy block of `model`, and its replicas."""

    def metric_collectors(self) -> list[Any]:
        """Prometheus collectors this placement adds to the app's /metrics."""
