"""Distributed mode's Ray Serve side: a deployment per heavy block role (`heavy`) and the
`RemoteBlock` that stands in for a heavy block inside a router's pipeline (`remote_block`).

Imports `blocks` and `ray`, never `service` or anything HTTP; the HTTP ingress that composes
these is `service.ray_placement`.
"""
