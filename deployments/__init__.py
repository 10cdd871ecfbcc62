"""Where the denoiser runs, and distributed mode's Ray Serve side: the step scheduler that
batches denoise loops step by step (`step_scheduler`, no Ray: embedded mode runs it in-process
too), a deployment per heavy block role (`heavy`), the `RemoteBlock` that stands in for a heavy
block inside a router's pipeline (`remote_block`), and the application's typed arguments
(`app_config`).

Imports `blocks` (and `ray` where a module needs it), never `service` or anything HTTP; the
HTTP ingress that composes these is `service.ray_placement`.
"""
