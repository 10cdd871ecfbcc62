"""The HTTP routes, one module per area: images, models, health (with metrics)."""
