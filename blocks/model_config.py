"""A model's config without needing the model loaded.

Sizes depend on model configs (the VAE's scale factor, the UNet's sample size), but a pipeline
that loads models on first use works out sizes before the VAE is needed, and a process that
hosts only some blocks (distributed mode) may never load it. So: the loaded model's config,
else its checkpoint's config file read without weights, else None.
"""

from __future__ import annotations

import functools
from typing import Any


def model_config(components: Any, name: str) -> dict[str, Any] | None:
    """The config of model `name` of a pipeline (`components`), loaded or not; None if unknown."""
    model = getattr(components, name, None)
    if model is not None:
        return dict(model.config)
    spec = (getattr(components, "component_specs", None) or {}).get(name)
    if spec is None or spec.pretrained_model_name_or_path is None:
        return None
    if not hasattr(spec.type_hint, "load_config"):
        return None
    return _read_config(
        spec.type_hint, spec.pretrained_model_name_or_path, spec.subfolder, spec.revision
    )


@functools.lru_cache(maxsize=64)
def _read_config(
    cls: type, source: str, subfolder: str, revision: str | None
) -> dict[str, Any]:
    return dict(cls.load_config(source, subfolder=subfolder or None, revision=revision))


def vae_scale_factor(components: Any, default: int) -> int:
    """Pixels per latent, 2 ** (levels - 1) of the VAE; `default` when nothing says."""
    config = model_config(components, "vae")
    if config is None:
        return default
    return 2 ** (len(config["block_out_channels"]) - 1)
