"""Ray Serve layer of blockserve (distributed mode). Imports `blocks`, never `service`.

Nothing is deployed from here yet: the embedded mode in `service` is the only runtime today.
"""
