"""Progress previews' latent -> RGB map per loaded model, fitted once on its VAE and cached.

The map and its fitting live in the library (`blocks.latent_rgb`); here `factors_for(model)`
fits it on the model's own VAE on first use and keeps it while the VAE lives. In Ray mode the
router holds no VAE: the placement's runner asks the VAE deployment instead
(`service.ray_placement.RayRunner.preview_map`).

Not handled here: which latents to preview (the scheduler's estimate of the clean latents:
`deployments.step_scheduler.StepReport`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from blocks.latent_rgb import PIXELS, LatentRGB, fit_latent_rgb

logger = logging.getLogger(__name__)

_cache: weakref.WeakKeyDictionary[Any, LatentRGB] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def factors_for(model: Any) -> LatentRGB | None:
    """The preview map of a loaded model (`service.registry.LoadedModel`, or anything with a
    `base` pipeline): fitted on its VAE on first use, then cached while the VAE lives.
    None when the VAE can't be fitted (the reason is logged once)."""
    vae = model.base.components.get("vae")
    if vae is None:
        return PIXELS
    with _lock:  # one fit per VAE, even when two requests ask at once
        if vae not in _cache:
            try:
                _cache[vae] = fit_latent_rgb(vae)
            except Exception as error:  # e.g. a VAE without `encode`: no previews, no crash
                logger.warning("model %s: no latent previews (%s: %s)", model.name,
                               type(error).__name__, error)
                _cache[vae] = None  # type: ignore[assignment]
        return _cache[vae]
